"""Training data: the dev split, and that no test query or judgment reaches training, mining or selection."""

from __future__ import annotations

import pytest

from corpusforge.index.bm25 import BM25Index
from corpusforge.pipeline import Pipeline
from corpusforge.stages.model import load_vectors
from corpusforge.spec import load_spec
from corpusforge.train.data import load_test_split, load_training_data, split_dev
from corpusforge.train.mining import MiningConfig, mine_hard_negatives
from tests.train_corpus import write_corpus, write_spec


def test_split_dev_is_seeded_disjoint_and_sized():
    qids = [f"q{i}" for i in range(40)]
    train, dev = split_dev(qids, 0.1, seed=7)
    assert (train, dev) == split_dev(list(reversed(qids)), 0.1, seed=7)  # order of input is irrelevant
    assert len(dev) == 4 and not set(train) & set(dev) and set(train) | set(dev) == set(qids)
    assert split_dev(qids, 0.1, seed=8)[1] != dev
    with pytest.raises(ValueError, match="dev fraction"):
        split_dev(qids, 1.5, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        split_dev(["q1"], 0.5, seed=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny corpus built up to the index with the base model."""
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus")
    spec = load_spec(write_spec(root / "spec.yaml", corpus, root / "ws"))
    pipe = Pipeline(spec, progress=False)
    pipe.run(until="index")
    return spec, pipe


def test_no_test_query_or_judgment_reaches_training_mining_or_selection(tiny, tmp_path):
    from corpusforge.encoding.encoder import Encoder
    from corpusforge.index.dense import DenseIndex
    from corpusforge.data import datasets
    from corpusforge.train.biencoder import BiEncoderConfig, BiEncoderTrainer, DevPool

    spec, pipe = tiny
    # Poison the well: a training query that the test qrels also judge must be dropped, not used.
    test_q, test_qrels = load_test_split(spec.source_uri)
    test_ids = set(test_qrels)
    test_docs = {d for docs in test_qrels.values() for d in docs}
    data = load_training_data(spec.source_uri, pipe.ws.dataset("chunks"), 0.25, 13)
    assert test_ids and not test_ids & set(data.queries)
    assert not test_ids & (set(data.train_qrels) | set(data.dev_qrels))
    assert not test_docs & {d for docs in data.train_qrels.values() for d in docs}
    assert not any(t in data.queries.values() for t in test_q.values())

    ids, vectors = load_vectors(pipe.ws.dataset("embeddings"))
    chunk_docs = datasets.read_table(pipe.ws.dataset("chunks"), columns=["doc_id"]).column("doc_id").to_pylist()
    enc = Encoder(spec.model)
    bm25 = BM25Index.load(pipe.ws.index_dir / "bm25")
    dense = DenseIndex.load(pipe.ws.index_dir / "dense")
    mined = mine_hard_negatives(data.queries, data.train_qrels, chunk_docs, vectors, enc.encode_queries,
                                bm25.search, dense.search, MiningConfig(n=2, depth=5))
    assert mined.num_rows > 0
    assert set(mined.column("query_id").to_pylist()) <= set(data.train_qrels)

    cfg = BiEncoderConfig(epochs=1, batch_size=4, max_passage_length=32, max_steps=2, checkpoint_every=0, threads=2)
    trainer = BiEncoderTrainer(cfg, data.queries, data.passages, tmp_path / "bi")
    pool = DevPool(data.dev_qrels, {}, depth=5)
    trainer.train(data.pairs(), {}, {}, dev_eval=pool)
    # every query the model ever encoded (training batches and dev selection) is a train/dev query
    assert set(trainer._q_ids) <= set(data.train_qrels) | set(data.dev_qrels)
    assert not set(trainer._q_ids) & test_ids
    assert set(pool.qrels) == set(data.dev_qrels)


def test_training_queries_judged_by_test_are_dropped(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    with (corpus / "qrels" / "test.tsv").open("a") as f:
        f.write("q0\tpos0\t1\n")  # q0 is a training query; now the test split judges it too

    spec = load_spec(write_spec(tmp_path / "s.yaml", corpus, tmp_path / "ws"))
    pipe = Pipeline(spec, progress=False)
    pipe.run(until="chunk")
    data = load_training_data(spec.source_uri, pipe.ws.dataset("chunks"), 0.25, 13)
    assert data.dropped_overlap == ["q0"]
    assert "q0" not in data.queries and "q0" not in data.train_qrels and "q0" not in data.dev_qrels
