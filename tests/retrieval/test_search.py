"""Searcher: dense / bm25 / hybrid modes, doc aggregation, fusion by hand, filters, ACL, batch."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from corpusforge.data.datasets import DatasetWriter
from corpusforge.index.bm25 import BM25Index
from corpusforge.index.dense import DenseIndex
from corpusforge.data.schemas import CHUNKS
from corpusforge.retrieval.search import UNRESTRICTED, Hit, Searcher, rrf_fuse, weighted_fuse
from corpusforge.spec import Bm25Config, DenseIndexConfig, SearchConfig

VOCAB = ["cat", "dog", "bird", "fish", "tree", "car", "sun", "rain", "book", "song",
         "milk", "road", "moon", "star", "lake", "hill", "bread", "salt", "wind", "snow"]
_PROJ = np.random.default_rng(42).standard_normal((len(VOCAB), 16)).astype(np.float32)


def encode(texts: list[str]) -> np.ndarray:
    """A deterministic bag-of-words encoder: word counts times a fixed random projection."""
    counts = np.zeros((len(texts), len(VOCAB)), np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            if w in VOCAB:
                counts[i, VOCAB.index(w)] += 1
    v = counts @ _PROJ
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def make_chunks(rows: list[tuple[str, str, list[str], dict]]) -> pa.Table:
    """chunks table from (doc_id, text, acl, metadata) tuples, in the CHUNKS schema."""
    ordinals: dict[str, int] = {}
    out = []
    for doc_id, text, acl, meta in rows:
        o = ordinals[doc_id] = ordinals.get(doc_id, -1) + 1
        out.append({"chunk_id": f"{doc_id}#{o}", "doc_id": doc_id, "ordinal": o, "text": text,
                    "n_tokens": len(text.split()), "char_start": 0, "char_end": len(text),
                    "acl": acl, "metadata": json.dumps(meta)})
    return pa.Table.from_pylist(out, schema=CHUNKS)


TINY = [
    ("d1", "cat cat", [], {"lang": "en", "year": 2020}),
    ("d1", "cat dog", [], {"lang": "en"}),
    ("d2", "dog dog bird", ["team-a"], {"lang": "fr", "tags": ["x", "y"]}),
    ("d3", "bird cat", ["team-b"], {"lang": "en"}),
    ("d4", "fish tree", [], {"lang": "de"}),
    ("d5", "cat fish", ["team-a", "team-b"], {}),
    ("d6", "moon star", [], {"lang": "en"}),
    ("d7", "naïve café ☕ 🐟 fish", [], {"lang": "fr", "note": "été"}),
]


def build(rows, cfg: SearchConfig | None = None) -> Searcher:
    chunks = make_chunks(rows)
    texts = chunks.column("text").to_pylist()
    dense = DenseIndex.build(encode(texts), DenseIndexConfig(factory="Flat"), progress=False)
    bm25 = BM25Index.build(texts, Bm25Config())
    return Searcher(chunks, dense, bm25, encode, cfg or SearchConfig(candidates=50))


@pytest.fixture(scope="module")
def tiny() -> Searcher:
    return build(TINY)


def exact(query: str, texts: list[str]) -> np.ndarray:
    return (encode(texts) @ encode([query])[0]).astype(np.float64)


def test_dense_chunk_level_matches_brute_force(tiny):
    hits = tiny.search("cat", k=8, mode="dense", level="chunk", acl=UNRESTRICTED)
    sims = exact("cat", [t for _, t, _, _ in TINY])
    assert [h.rank for h in hits] == list(range(1, 9))
    assert [h.score for h in hits] == pytest.approx(sorted(sims, reverse=True), abs=1e-5)
    top = hits[0]
    assert isinstance(top, Hit) and top.chunk_id == "d1#0" and top.doc_id == "d1" and top.text == "cat cat"
    assert top.metadata == {"lang": "en", "year": 2020}
    fish = tiny.search("fish", k=8, mode="bm25", level="chunk", acl=UNRESTRICTED)
    d7 = next(h for h in fish if h.doc_id == "d7")  # multi-byte UTF-8 text comes back intact
    assert d7.text == "naïve café ☕ 🐟 fish" and d7.metadata == {"lang": "fr", "note": "été"}


def test_doc_level_aggregates_by_max(tiny):
    chunk_hits = tiny.search("cat dog", k=8, mode="dense", level="chunk", acl=UNRESTRICTED)
    best: dict[str, float] = {}
    for h in chunk_hits:
        best[h.doc_id] = max(best.get(h.doc_id, -9.0), h.score)
    doc_hits = tiny.search("cat dog", k=3, mode="dense", acl=UNRESTRICTED)  # level='doc' default
    expected = sorted(best.items(), key=lambda kv: -kv[1])[:3]
    assert [(h.doc_id, round(h.score, 5)) for h in doc_hits] == [(d, round(s, 5)) for d, s in expected]
    assert len({h.doc_id for h in doc_hits}) == 3
    d1 = next(h for h in doc_hits if h.doc_id == "d1")
    assert d1.chunk_id == "d1#1"  # 'cat dog' is d1's best chunk for this query


def test_bm25_mode_follows_the_bm25_index(tiny):
    hits = tiny.search("bird", k=5, mode="bm25", level="chunk", acl=UNRESTRICTED)
    _, rows = tiny.bm25.search(["bird"], 5)
    chunk_ids = make_chunks(TINY).column("chunk_id").to_pylist()
    assert [h.chunk_id for h in hits] == [chunk_ids[r] for r in rows[0] if r >= 0]
    assert len(hits) == 2  # only two chunks contain 'bird': no padding hits


def test_rrf_and_weighted_fusion_by_hand():
    s, r = rrf_fuse([np.array([5, 7, 9]), np.array([7, 2])], rrf_k=60)
    expected = {5: 1 / 61, 7: 1 / 62 + 1 / 61, 9: 1 / 63, 2: 1 / 62}
    assert r.tolist() == [7, 5, 2, 9]
    assert s.tolist() == pytest.approx([expected[i] for i in [7, 5, 2, 9]])
    s, r = weighted_fuse([np.array([0.9, 0.5, 0.1]), np.array([10.0, 4.0])],
                         [np.array([5, 7, 9]), np.array([7, 2])], [0.25, 0.75])
    # dense normalised: 5->1, 7->0.5, 9->0 ; bm25 normalised: 7->1, 2->0
    assert r.tolist() == [7, 5, 2, 9]
    assert s.tolist() == pytest.approx([0.25 * 0.5 + 0.75, 0.25, 0.0, 0.0])


def test_hybrid_search_uses_the_fused_order(tiny):
    q = "cat bird"
    ds, dr = tiny.dense.search(encode([q]), 8)
    bs, br = tiny.bm25.search([q], 8)
    keep = br[0] >= 0
    _, rrf_rows = rrf_fuse([dr[0], br[0][keep]], 60)
    hits = tiny.search(q, k=4, mode="hybrid", level="chunk", acl=UNRESTRICTED, fusion="rrf")
    ids = [make_chunks(TINY).column("chunk_id")[int(r)].as_py() for r in rrf_rows[:4]]
    assert [h.chunk_id for h in hits] == ids
    _, w_rows = weighted_fuse([ds[0], bs[0][keep]], [dr[0], br[0][keep]], [0.5, 0.5])
    hits = tiny.search(q, k=4, mode="hybrid", level="chunk", acl=UNRESTRICTED, fusion="weighted")
    assert [h.chunk_id for h in hits] == [make_chunks(TINY).column("chunk_id")[int(r)].as_py() for r in w_rows[:4]]


def test_metadata_filters(tiny):
    en = tiny.search("cat", k=10, level="chunk", filters={"lang": "en"}, acl=UNRESTRICTED)
    assert {h.chunk_id for h in en} == {"d1#0", "d1#1", "d3#0", "d6#0"}
    anyof = tiny.search("cat", k=10, level="chunk", filters={"lang": ["fr", "de"]}, acl=UNRESTRICTED)
    assert {h.doc_id for h in anyof} == {"d2", "d4", "d7"}
    tagged = tiny.search("dog", k=10, mode="bm25", filters={"tags": "y"}, acl=UNRESTRICTED)
    assert [h.doc_id for h in tagged] == ["d2"]
    both = tiny.search("cat", k=10, level="chunk", filters={"lang": "en", "year": 2020}, acl=UNRESTRICTED)
    assert [h.chunk_id for h in both] == ["d1#0"]


def test_acl_rule_on_tiny_corpus(tiny):
    public = {h.doc_id for h in tiny.search("cat dog bird fish", k=10, level="chunk")}
    assert public == {"d1", "d4", "d6", "d7"}  # acl=None: a caller without tags sees public chunks only
    a = {h.doc_id for h in tiny.search("cat dog bird fish", k=10, level="chunk", acl=["team-a"])}
    assert a == {"d1", "d2", "d4", "d5", "d6", "d7"}  # d3 is team-b only
    for mode in ("dense", "bm25", "hybrid"):
        seen = {h.doc_id for h in tiny.search("bird cat", k=10, mode=mode, acl=["team-b"])}
        assert "d2" not in seen and "d3" in seen


def test_acl_isolation_with_overfetch():
    rng = np.random.default_rng(7)
    rows = []
    for d in range(150):
        for _ in range(int(rng.integers(1, 4))):
            text = " ".join(rng.choice(VOCAB, size=4))
            u = rng.random()
            acl = [] if u < 0.05 else (["team-a"] if u < 0.12 else ["team-b"])
            rows.append((f"doc{d}", text, acl, {"n": d % 3}))
    searcher = build(rows, SearchConfig(candidates=8))
    visible = np.array([not acl or "team-a" in acl for _, _, acl, _ in rows])
    assert visible.sum() > 10
    texts = [t for _, t, _, _ in rows]
    for q in ["cat dog", "moon star lake", "bread"]:
        for mode in ("dense", "bm25", "hybrid"):
            hits = searcher.search(q, k=10, mode=mode, level="chunk", acl=["team-a"])
            idx = [searcher._chunk_id.to_pylist().index(h.chunk_id) for h in hits]
            assert all(visible[i] for i in idx), f"{mode}: leaked a chunk outside the caller's acl"
            if mode == "dense":  # every visible chunk is a dense candidate: exactly 10 come back
                sims = exact(q, texts)[visible]
                assert [h.score for h in hits] == pytest.approx(sorted(sims, reverse=True)[:10], abs=1e-5)
            elif mode == "bm25":
                n_match = sum(1 for i, t in enumerate(texts) if visible[i] and set(q.split()) & set(t.split()))
                assert len(hits) == min(10, n_match)
            else:
                assert len(hits) == 10
        docs = searcher.search(q, k=10, acl=["team-a"])
        assert len(docs) == 10 and len({h.doc_id for h in docs}) == 10
        assert all(visible[searcher._chunk_id.to_pylist().index(h.chunk_id)] for h in docs)


def test_with_encoder_swaps_only_the_query_side(tiny):
    flipped = tiny.with_encoder(lambda texts: -encode(texts))  # ranks passages in reverse
    assert flipped.dense is tiny.dense and flipped.bm25 is tiny.bm25 and tiny.encoder is encode
    got = [h.chunk_id for h in flipped.search("cat", k=3, mode="dense", level="chunk", acl=["team-a"])]
    want = [h.chunk_id for h in tiny.search("cat", k=3, mode="dense", level="chunk", acl=["team-a"])]
    assert got and got != want
    assert flipped.search("cat", k=3, mode="bm25", acl=["team-a"]) == tiny.search("cat", k=3, mode="bm25", acl=["team-a"])


def test_batch_equals_single(tiny):
    queries = ["cat", "dog bird", "fish tree", "moon"]
    for mode in ("dense", "bm25", "hybrid"):
        for level in ("doc", "chunk"):
            batch = tiny.search_batch(queries, k=3, mode=mode, level=level, acl=["team-a"])
            single = [tiny.search(q, k=3, mode=mode, level=level, acl=["team-a"]) for q in queries]
            assert [[(h.chunk_id, round(h.score, 6), h.rank) for h in hs] for hs in batch] == \
                   [[(h.chunk_id, round(h.score, 6), h.rank) for h in hs] for hs in single]


def test_load_from_directory_and_errors(tmp_path, tiny):
    tiny.dense.save(tmp_path / "idx" / "dense")
    tiny.bm25.save(tmp_path / "idx" / "bm25")
    with DatasetWriter(tmp_path / "chunks", CHUNKS) as w:
        w.write_table(make_chunks(TINY))
        w.commit()
    loaded = Searcher.load(tmp_path / "idx", tmp_path / "chunks", encode, SearchConfig())
    assert [h.chunk_id for h in loaded.search("cat", 5, mode="hybrid", acl=UNRESTRICTED)] == \
           [h.chunk_id for h in Searcher(make_chunks(TINY), tiny.dense, tiny.bm25, encode, SearchConfig())
            .search("cat", 5, mode="hybrid", acl=UNRESTRICTED)]
    with pytest.raises(ValueError, match="unknown search mode"):
        tiny.search("cat", mode="sparse")
    with pytest.raises(ValueError, match="needs a dense index"):
        Searcher(make_chunks(TINY), None, tiny.bm25, encode).search("cat", mode="hybrid")
    with pytest.raises(ValueError, match="8 rows"):
        Searcher(make_chunks(TINY[:3]), tiny.dense, None, encode)


def test_acl_mask_cache_is_safe_across_threads():
    """Many distinct caller tag sets from many threads: the bounded mask cache never breaks."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from corpusforge.retrieval.search import Searcher

    n = 50
    chunks = pa.table({
        "chunk_id": [f"c{i}" for i in range(n)], "doc_id": [f"d{i}" for i in range(n)],
        "text": [f"text {i}" for i in range(n)], "acl": [[f"t{i % 7}"] if i % 2 else [] for i in range(n)],
        "metadata": ["{}"] * n,
    })
    searcher = Searcher(chunks, None, None, None)

    def visible(i: int) -> int:
        mask = searcher._visible_mask([f"t{i % 7}", f"x{i}"])  # 600 distinct tag sets > the 256 kept
        return int(mask.sum())

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(visible, range(600)))
    public = n // 2
    assert all(c > public for c in counts)
    assert len(searcher._acl_masks) <= 256
