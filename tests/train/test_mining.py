"""Hard-negative mining: positives never come back, the margin filter drops near-positives."""

from __future__ import annotations

import numpy as np

from corpusforge.data import datasets
from corpusforge.index.bm25 import BM25Index
from corpusforge.index.dense import DenseIndex
from corpusforge.spec import Bm25Config, DenseIndexConfig
from corpusforge.train.mining import MINED, MiningConfig, mine_hard_negatives, negatives_by_query, select_negatives

TEXTS = ["apple pie recipe with cinnamon", "apple orchard harvest season", "apple juice and cider",
         "banana bread baking", "pear and apple tart", "car engine repair"]
DOCS = ["d0", "d1", "d2", "d3", "d4", "d5"]


def _unit(rows):
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# query vector e0; similarities: d0 1.0 (positive), d1 0.99 (near-duplicate of the positive),
# d2 0.8, d3 0.6, d4 0.9, d5 0.1
VECS = _unit([[1, 0], [0.99, 0.141], [0.8, 0.6], [0.6, 0.8], [0.9, 0.436], [0.1, 0.995]])


def _mine(cfg, tmp_path=None):
    bm25 = BM25Index.build(TEXTS, Bm25Config(stopwords=None))
    dense = DenseIndex.build(VECS, DenseIndexConfig(factory="Flat"), progress=False)
    return mine_hard_negatives({"q": "apple"}, {"q": {"d0": 1}}, DOCS, VECS,
                               lambda texts: np.tile(np.array([[1.0, 0.0]], np.float32), (len(texts), 1)),
                               bm25.search, dense.search, cfg, out_path=tmp_path and tmp_path / "neg")


def test_positives_excluded_and_margin_applied(tmp_path):
    table = _mine(MiningConfig(n=10, depth=6, margin=0.95), tmp_path)
    negs = table.column("doc_id").to_pylist()
    assert "d0" not in negs  # the positive
    assert "d1" not in negs  # 0.99 > 0.95 * 1.0: a likely false negative
    assert set(negs) == {"d2", "d3", "d4", "d5"}
    assert all(s <= 0.95 * p + 1e-6 for s, p in zip(table.column("score").to_pylist(),
                                                    table.column("positive_score").to_pylist()))
    # a tighter margin drops more
    tight = _mine(MiningConfig(n=10, depth=6, margin=0.85)).column("doc_id").to_pylist()
    assert set(tight) == {"d3", "d5", "d2"}
    # written as a Parquet dataset with the declared schema
    on_disk = datasets.read_table(tmp_path / "neg")
    assert on_disk.schema.names == MINED.names and on_disk.num_rows == table.num_rows


def test_n_per_query_and_both_sources():
    assert _mine(MiningConfig(n=2, depth=6, margin=1.0)).num_rows == 2
    table = _mine(MiningConfig(n=10, depth=6, margin=1.0))
    assert table.num_rows == 5  # everything but the positive
    sources = dict(zip(table.column("doc_id").to_pylist(), table.column("source").to_pylist()))
    assert sources["d3"] == "dense" and sources["d5"] == "dense"  # no 'apple': only dense finds them
    assert "bm25" in sources.values()
    assert negatives_by_query(table) == {"q": table.column("doc_id").to_pylist()}


def test_select_negatives_interleaves_and_skips_seen():
    sims = {"a": 0.1, "b": 0.2, "c": 0.3, "p": 1.0}
    out = select_negatives({"p"}, {"bm25": ["p", "a", "b"], "dense": ["a", "c"]}, sims.__getitem__, 1.0,
                           MiningConfig(n=5, depth=3, margin=0.9))
    # rank 1: bm25's 'p' is the positive, dense's 'a'; rank 2: bm25's 'a' already taken, dense's 'c'; rank 3: 'b'
    assert [d for d, *_ in out] == ["a", "c", "b"]
