"""DenseIndex: build for each index family, save / mmap-load, shard merging, recall, auto rule."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from corpusforge.index.dense import DenseIndex, merge_topk, recall_at_k, shard_offsets
from corpusforge.index.factory import FLAT_MAX, choose_factory, hnsw_memory_bytes, ivf_nlist, pq_m
from corpusforge.spec import DenseIndexConfig


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Normalised vectors around 50 gaussian centres (structure IVF/PQ can exploit)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(6000, 32)


@pytest.mark.parametrize("factory,min_recall", [
    ("Flat", 1.0),
    ("HNSW32,Flat", 0.95),
    ("IVF32,PQ16x4", 0.3),
    ("IVF32,PQ16x4,RFlat", 0.6),
])
def test_build_save_mmap_load_roundtrip(tmp_path, data, factory, min_recall):
    cfg = DenseIndexConfig(factory=factory, train_sample=3000, recall_sample_queries=100, ivf_nprobe=8)
    index = DenseIndex.build(data, cfg, progress=False)
    rep = index.report()
    assert rep["factory"] == factory and rep["ntotal"] == 6000 and rep["dim"] == 32
    assert rep["recall_queries"] == 100 and min_recall <= rep["recall_at_10"] <= 1.0
    assert rep["build_seconds"] > 0

    q = data[:40] + 0.01
    before = index.search(q, 10)
    out = index.save(tmp_path / "dense")
    assert sorted(p.name for p in out.iterdir()) == ["dense.json", "shard-00000.faiss"]
    meta = json.loads((out / "dense.json").read_text())
    assert meta["recall_at_10"] == rep["recall_at_10"] and meta["factory"] == factory

    loaded = DenseIndex.load(out, mmap=True)
    assert loaded.load_modes == ["mmap_ifc"]  # every family here is mapped, not read
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    assert after[0].dtype == np.float32 and after[1].dtype == np.int64
    assert loaded.report()["recall_at_10"] == rep["recall_at_10"]


def test_search_params_change_results_per_call(data):
    index = DenseIndex.build(data, DenseIndexConfig(factory="IVF64,Flat", train_sample=3000, ivf_nprobe=64),
                             progress=False)
    q = data[:50]
    exact = faiss.knn(q, data, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    full = recall_at_k(index.search(q, 10)[1], exact)            # nprobe=64 = all lists: exact
    narrow = recall_at_k(index.search(q, 10, nprobe=1)[1], exact)
    assert full == 1.0 and narrow < full
    assert recall_at_k(index.search(q, 10)[1], exact) == 1.0  # per-call value did not stick


def test_shards_merge_equals_single_exact_search(tmp_path, data):
    single = DenseIndex.build(data, DenseIndexConfig(factory="Flat"), progress=False)
    sharded = DenseIndex.build(data, DenseIndexConfig(factory="Flat", shards=3), progress=False)
    assert sharded.report()["shard_offsets"] == [0, 2000, 4000, 6000]
    q = clustered(30, 32, seed=9)
    s1, r1 = single.search(q, 15)
    s3, r3 = sharded.search(q, 15)
    np.testing.assert_array_equal(r1, r3)
    np.testing.assert_allclose(s1, s3, rtol=1e-6)
    assert r3.max() > 4000  # hits really come from the last shard, offset back to global rows

    sharded.save(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "dense.json", "shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"]
    np.testing.assert_array_equal(DenseIndex.load(tmp_path / "d").search(q, 15)[1], r1)


def test_k_beyond_corpus_pads_with_minus_one():
    x = clustered(7, 8)
    index = DenseIndex.build(x, DenseIndexConfig(factory="Flat", shards=2), progress=False)
    scores, rows = index.search(x[:2], 10)
    assert rows.shape == (2, 10)
    assert sorted(rows[0, :7].tolist()) == list(range(7)) and (rows[:, 7:] == -1).all()
    assert np.isneginf(scores[:, 7:]).all()


def test_merge_topk_by_hand():
    s, r = merge_topk([np.array([[0.9, 0.5]], np.float32), np.array([[0.7, -np.inf]], np.float32)],
                      [np.array([[1, 0]]), np.array([[12, -1]])], 3)
    assert r.tolist() == [[1, 12, 0]] and s.tolist()[0][:2] == pytest.approx([0.9, 0.7])
    assert shard_offsets(10, 3).tolist() == [0, 3, 6, 10]


def test_recall_is_measured_against_exact_search(data):
    index = DenseIndex.build(data, DenseIndexConfig(factory="IVF64,Flat", train_sample=3000, ivf_nprobe=1,
                                                    recall_sample_queries=50), progress=False)
    recall, nq = index.measure_recall(data, 50)
    assert nq == 50 and recall == index.report()["recall_at_10"] and recall < 1.0


def test_bad_inputs_are_refused(data):
    with pytest.raises(ValueError, match="2-D"):
        DenseIndex.build(data[0], DenseIndexConfig(factory="Flat"), progress=False)
    bad = data.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DenseIndex.build(bad, DenseIndexConfig(factory="Flat"), progress=False)
    with pytest.raises(ValueError, match="factory string"):
        DenseIndex.build(data, DenseIndexConfig(factory="NotAnIndex"), progress=False)
    with pytest.raises(ValueError, match="nlist=4096"):
        DenseIndex.build(data, DenseIndexConfig(factory="IVF4096,Flat", train_sample=3000), progress=False)
    index = DenseIndex.build(data, DenseIndexConfig(factory="Flat"), progress=False)
    with pytest.raises(ValueError, match="dimension 16"):
        index.search(np.zeros((1, 16), np.float32), 5)


def test_auto_factory_rule():
    assert choose_factory(FLAT_MAX - 1, 384, 4096) == "Flat"
    assert choose_factory(1_000_000, 384, 4096) == "HNSW32,Flat"   # ~1.96 GB fits 4 GB
    assert choose_factory(1_000_000, 384, 1024) == "IVF4096,PQ48x8"
    assert choose_factory(10_000_000, 768, 8192) == "IVF16384,PQ96x8"
    assert hnsw_memory_bytes(1_000_000, 384) == int(1_000_000 * (1536 + 256 + 16) * 1.1)
    assert ivf_nlist(100_000) == 1024 and ivf_nlist(1_000) == 25  # capped at n // 39
    assert pq_m(384) == 48 and pq_m(100) == 10 and pq_m(4) == 1
    with pytest.raises(ValueError):
        choose_factory(0, 384, 100)


def test_auto_builds_flat_for_small_corpora(data):
    index = DenseIndex.build(data, DenseIndexConfig(), progress=False)
    rep = index.report()
    assert rep["factory"] == "Flat" and rep["factory_requested"] == "auto" and rep["recall_at_10"] == 1.0


def write_embeddings(path, x: np.ndarray, rows_per_file: int, rows_per_group: int):
    """An embeddings dataset of `x` in several files and row groups."""
    import pyarrow as pa

    from corpusforge.data.datasets import DatasetWriter
    from corpusforge.data.schemas import embeddings_schema

    dim = x.shape[1]
    with DatasetWriter(path, embeddings_schema(dim), rows_per_group=rows_per_group, rows_per_file=rows_per_file) as w:
        w.write_rows({"chunk_id": f"c{i}", "vector": v} for i, v in enumerate(x.tolist()))
        w.commit({"dim": dim})
    return path


def test_dataset_vectors_read_any_range_and_gather_rows_across_files_and_groups(tmp_path, data):
    from corpusforge.index.vectors import DatasetVectors

    x = data[:1000]
    source = DatasetVectors(write_embeddings(tmp_path / "emb", x, rows_per_file=300, rows_per_group=70))
    assert (source.n, source.dim) == (1000, 32) and len(source.files) == 3  # 350 rows each: whole groups
    for lo, hi in [(0, 1000), (0, 1), (69, 71), (299, 301), (250, 951), (999, 1000), (500, 500)]:
        np.testing.assert_array_equal(source.read(lo, hi), x[lo:hi])
    rows = np.array([0, 69, 70, 299, 300, 301, 650, 999])
    np.testing.assert_array_equal(source.gather(rows), x[rows])


@pytest.mark.parametrize("factory,shards", [("Flat", 2), ("IVF16,PQ8x8", 3), ("IVF16,Flat", 1)])
def test_build_from_a_dataset_block_by_block_writes_the_files_of_the_in_memory_build(tmp_path, data, monkeypatch,
                                                                                     factory, shards):
    """The index stage's streaming build (one block of vectors at a time, each shard written as it is
    done): the files `build` + `save` write, and the same recall, measured block by block."""
    from corpusforge.index import dense as dense_module
    from corpusforge.index.vectors import DatasetVectors

    monkeypatch.setattr(dense_module, "ADD_BLOCK", 450)  # several blocks per shard, boundaries off the files'
    x = data[:2000]
    source = DatasetVectors(write_embeddings(tmp_path / "emb", x, rows_per_file=700, rows_per_group=128))
    cfg = DenseIndexConfig(factory=factory, shards=shards, train_sample=1000, recall_sample_queries=60)
    reads, gathers = [], []

    class Recorded:  # the dataset, with the size of every read
        n, dim = source.n, source.dim

        def read(self, lo, hi):
            reads.append(hi - lo)
            return source.read(lo, hi)

        def gather(self, rows):
            gathers.append(len(rows))
            return source.gather(rows)

    streamed = DenseIndex.build_from(Recorded(), cfg, directory=tmp_path / "streamed", progress=False)
    assert max(reads) <= 450 and sum(reads) == 2000  # one block at a time, each row once
    assert gathers == ([1000] if factory != "Flat" else []) + [60]  # the training sample, the probe's queries
    DenseIndex.build(x, cfg, progress=False).save(tmp_path / "memory")
    names = sorted(p.name for p in (tmp_path / "memory").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streamed").iterdir())
    for name in names:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    assert streamed.load_modes == ["mmap_ifc"] * shards  # the written files, mapped: not held in memory
    assert streamed.info["recall_at_10"] == json.loads((tmp_path / "memory" / "dense.json").read_text())["recall_at_10"]
    exact = DenseIndex.build(x, DenseIndexConfig(factory="Flat"), progress=False)
    if factory == "Flat":  # block-merged exact top-k and the shards' merged search agree with one flat index
        assert streamed.info["recall_at_10"] == 1.0
        assert [a.tolist() for a in streamed.search(x[:15], 7)][1] == [a.tolist() for a in exact.search(x[:15], 7)][1]


def test_build_from_refuses_bad_vectors_and_leaves_nothing_behind(tmp_path, data):
    from corpusforge.index.vectors import DatasetVectors

    x = data[:600].copy()
    x[555, 3] = np.nan  # found while the second shard is added (a Flat index samples nothing)
    source = DatasetVectors(write_embeddings(tmp_path / "emb", x, rows_per_file=300, rows_per_group=100))
    with pytest.raises(ValueError, match="NaN or infinite"):
        DenseIndex.build_from(source, DenseIndexConfig(factory="Flat", shards=2), directory=tmp_path / "out",
                              progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]
