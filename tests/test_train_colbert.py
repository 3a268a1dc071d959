"""Late interaction: MaxSim by hand, query/document marking and padding, fusion weight tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corpusforge.models import load_tokenizer
from corpusforge.train.colbert import ColBERTTokenizer, fuse, maxsim, maxsim_pairs, tune_fusion_weight


def test_maxsim_hand_checked():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one query, two tokens
    d = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [9.0, 9.0]],  # doc 0; third token is padding
                      [[0.0, 0.2], [0.3, 0.0], [0.0, 0.0]]])  # doc 1
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s = maxsim(q, d, mask)
    # doc 0: token0 max(0.5, 1.0) = 1.0; token1 max(0.5, 0.0) = 0.5 (padding's 9.0 ignored) -> 1.5
    # doc 1: token0 max(0, 0.3, 0) = 0.3; token1 max(0.2, 0, 0) = 0.2 -> 0.5
    assert torch.allclose(s, torch.tensor([[1.5, 0.5]]))
    assert torch.allclose(maxsim_pairs(q[0], d, mask), torch.tensor([1.5, 0.5]))


def test_query_marker_and_mask_padding_document_marker():
    tok = ColBERTTokenizer(load_tokenizer("default"), query_length=12, doc_length=8)
    ids, mask = tok.queries(["hello world"])
    assert ids.shape == (1, 12) and mask.sum() == 12  # fixed length, [MASK] padding attended
    row = ids[0].tolist()
    assert row[:2] == [tok.cls, tok.q_id] and row[row.index(tok.sep) + 1:] == [tok.mask] * (11 - row.index(tok.sep))
    dids, dmask = tok.documents(["a b", "one two three four five six seven eight nine"])
    assert dids[0, :2].tolist() == [tok.cls, tok.d_id] and dids.shape[1] == 8  # truncated to doc_length
    assert dmask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and dmask[1].sum() == 8


def test_fusion_and_dev_tuning():
    assert np.allclose(fuse(np.array([1.0, 0.0]), np.array([0.0, 2.0]), 0.0), [1.0, 0.0])
    assert np.allclose(fuse(np.array([1.0, 0.0]), np.array([0.0, 2.0]), 1.0), [0.0, 1.0])
    # first stage puts the relevant doc 2nd, the reranker puts it 1st: tuning picks a reranker-heavy weight
    cands = {"q": [("x", 1.0, 0.1), ("rel", 0.9, 0.9)]}
    w, grid = tune_fusion_weight(cands, {"q": {"rel": 1}})
    assert w > 0.5 and grid[0.0] < grid[w] == 1.0


def test_training_lowers_loss_and_reranker_serves_from_precomputed_vectors(tmp_path):
    import pyarrow as pa  # noqa: F401

    from corpusforge import datasets
    from corpusforge.schemas import CHUNKS
    from corpusforge.search import Hit
    from corpusforge.train.colbert import ColBERTConfig, LateInteraction, train_colbert
    from corpusforge.train.rerank import Reranker, add_reranker_to_build
    from test_train_biencoder import tiny_data

    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)
    cfg = ColBERTConfig(query_length=16, doc_length=32, batch_size=8, epochs=1, learning_rate=1e-4,
                        checkpoint_every=0, threads=2, seed=2)
    li = LateInteraction(cfg)
    log = train_colbert(li, queries, passages, pairs, negatives, {}, tmp_path / "ck")
    assert log["steps"] == 3 and log["losses"][-1] < log["losses"][0]
    model_dir = li.save(tmp_path / "rr", extra={"note": "test"})

    ids = sorted(passages)
    rows = [{"chunk_id": f"c-{d}", "doc_id": d, "ordinal": 0, "text": passages[d], "n_tokens": 1, "char_start": 0,
             "char_end": 1, "acl": [], "metadata": "{}"} for d in ids]
    with datasets.DatasetWriter(tmp_path / "chunks", CHUNKS) as w:
        w.write_rows(rows)
        w.commit()
    out = add_reranker_to_build(tmp_path / "build", model_dir, tmp_path / "chunks", fusion_weight=1.0, depth=10)
    tokens = np.load(out / "doc_tokens.npy")
    offsets = np.load(out / "doc_offsets.npy")
    assert tokens.dtype == np.float16 and tokens.shape[1] == 128

    # The stored vectors are the fp32 model's, rounded once to float16 (relative error <= 2^-11 per
    # component), whatever precision the model trains or encodes queries in: computed in bf16 they
    # would be off by ~2^-8, and by more where bf16 kernels depend on the batch's shape.
    exact = LateInteraction.load(model_dir, device="cpu")
    exact.cfg.precision = "fp32"
    for i in (0, 7, len(ids) - 1):
        with torch.no_grad():
            ref, mask = exact.encode_documents([passages[ids[i]]])
        ref = ref[0, : int(mask.sum())].numpy()
        stored = tokens[offsets[i]:offsets[i + 1]].astype(np.float32)
        assert stored.shape == ref.shape
        assert np.all(np.abs(stored - ref) <= 2.0 ** -11 * np.abs(ref) + 1e-6), ids[i]

    hits = [Hit(d, f"c-{d}", 1.0 - i / 10, passages[d], "{}", i + 1) for i, d in enumerate(ids[:6])]
    served = Reranker(out)
    fresh = Reranker(model_dir, fusion_weight=1.0)  # no precomputed vectors: encodes the hit texts
    query = queries["q0"]
    # served and fresh differ only by the float16 storage: per query token the best inner product
    # with unit document vectors moves by at most 2^-11, so the score by at most query_length * 2^-11
    # (plus fp32 rounding)
    bound = cfg.query_length * 2.0 ** -11 + 1e-5
    assert np.max(np.abs(served.scores(query, hits) - fresh.scores(query, hits))) <= bound
    top = served.rerank(query, hits, k=3)
    assert [h.rank for h in top] == [1, 2, 3] and len(top) == 3
    assert top[0].doc_id == ids[int(np.argmax(served.scores(query, hits)))]
