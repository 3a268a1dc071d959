"""Late interaction: MaxSim by hand, query/document marking and padding, fusion weight tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corpusforge.evaluation.metrics import evaluate
from corpusforge.encoding.models import load_tokenizer
from corpusforge.retrieval.late_interaction import ColBERTTokenizer, fuse, maxsim, maxsim_pairs
from corpusforge.train.colbert import tune_fusion_weight
from corpusforge.train.core import TrainingBudgetExceeded
from tests.train_corpus import cpu_burner


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


def test_fusion_tuning_scores_with_the_evaluate_module():
    # a tie in the fused scores: trec_eval (corpusforge.evaluation.metrics) ranks the larger doc id first
    cands = {"q": [("a", 1.0, 0.5), ("b", 1.0, 0.5), ("c", 0.0, 0.0)], "r": [("x", 0.2, 0.9), ("y", 0.8, 0.1)]}
    qrels = {"q": {"a": 1}, "r": {"x": 2}}
    _, grid = tune_fusion_weight(cands, qrels)
    for w, got in grid.items():
        run = {q: dict(zip([r[0] for r in rows], fuse(np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                                                      w).tolist())) for q, rows in cands.items()}
        assert got == evaluate(run, qrels, ["ndcg@10"]).mean["ndcg@10"]
    assert grid[0.0] == pytest.approx((1 / np.log2(3) + 1 / np.log2(3)) / 2)


def _short_run(tmp_path, name: str, **over):
    """3 reranker steps (fp32, 2 threads) on the tiny corpus; returns the log and dev scores of the result."""
    from corpusforge.retrieval.late_interaction import ColBERTConfig, LateInteraction
    from corpusforge.train.colbert import train_colbert
    from tests.train.test_biencoder import tiny_data

    queries, passages, train, dev, negatives = tiny_data()
    pairs = sorted((q, d) for q, docs in train.items() for d in docs)
    cfg = ColBERTConfig(**{"query_length": 12, "doc_length": 24, "batch_size": 4, "max_steps": 3,
                           "learning_rate": 1e-4, "checkpoint_every": 0, "threads": 2, "seed": 4, "precision": "fp32",
                           **over})
    li = LateInteraction(cfg)
    log = train_colbert(li, queries, passages, pairs, negatives, {}, tmp_path / name)
    with torch.no_grad():  # the dev task: each dev query against its positive and its parrot
        q = li.encode_queries([queries[x] for x in sorted(dev)])
        d, mask = li.encode_documents([passages[f"{kind}{x[1:]}"] for x in sorted(dev) for kind in ("pos", "par")])
    scores = maxsim(q, d, mask).numpy()
    cands = {x: [(f"{kind}{x[1:]}", 0.0, float(scores[i, 2 * i + j])) for j, kind in enumerate(("pos", "par"))]
             for i, x in enumerate(sorted(dev))}
    return log, scores, tune_fusion_weight(cands, dev)[1]


def test_same_seed_gives_the_same_losses_and_dev_metrics_even_under_cpu_load(tmp_path):
    quiet, quiet_scores, quiet_dev = _short_run(tmp_path, "quiet")
    with cpu_burner():
        loaded, loaded_scores, loaded_dev = _short_run(tmp_path, "loaded", max_seconds=3600)
    assert quiet["steps"] == loaded["steps"] == quiet["planned_steps"] == 3 and not loaded["truncated"]
    assert np.allclose(quiet["losses"], loaded["losses"], rtol=0, atol=1e-6)
    assert np.allclose(quiet_scores, loaded_scores, rtol=0, atol=1e-6)
    assert list(quiet_dev) == list(loaded_dev) and np.allclose(list(quiet_dev.values()), list(loaded_dev.values()),
                                                                rtol=0, atol=1e-6)


def test_time_guard_fails_the_run_or_truncates_it(tmp_path):
    with pytest.raises(TrainingBudgetExceeded, match="reranker: time guard max_train_seconds"):
        _short_run(tmp_path, "fail", max_seconds=1e-9, threads=1)
    log, _, _ = _short_run(tmp_path, "stop", max_seconds=1e-9, on_budget="stop", threads=1)
    assert log["truncated"] is True and log["steps"] == 1 < log["planned_steps"] == 3


def test_training_lowers_loss_and_reranker_serves_from_precomputed_vectors(tmp_path):
    from corpusforge.data import datasets
    from corpusforge.data.schemas import CHUNKS
    from corpusforge.retrieval.search import Hit
    from corpusforge.retrieval.late_interaction import ColBERTConfig, LateInteraction
    from corpusforge.train.colbert import train_colbert
    from corpusforge.retrieval.rerank import Reranker, add_reranker_to_build
    from tests.train.test_biencoder import tiny_data

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
