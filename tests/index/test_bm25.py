"""BM25Index: build, search order, -1 padding, save / mmap-load equality, no pickles, SciFact sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from corpusforge.index.bm25 import BM25Index
from corpusforge.spec import Bm25Config

TEXTS = [
    "the cat sat on the mat",
    "dogs chase the cat across the yard",
    "a bird sings in the morning",
    "cat cat cat",
    "quantum chromodynamics of gluons",
]


def test_search_ranks_matching_rows_and_pads():
    index = BM25Index.build(TEXTS, Bm25Config())
    scores, rows = index.search(["cat", "gluons morning", "zebra", "the"], 8)
    assert rows.shape == (4, 8) and rows.dtype == np.int64 and scores.dtype == np.float32
    assert rows[0, :3].tolist() == [3, 0, 1] and (rows[0, 3:] == -1).all()  # tf saturates; short doc wins
    assert np.all(np.diff(scores[0, :3]) <= 0) and np.isneginf(scores[0, 3:]).all()
    assert sorted(rows[1, :2].tolist()) == [2, 4] and (rows[1, 2:] == -1).all()
    assert (rows[2] == -1).all()              # no query token in the vocabulary
    assert (rows[3] == -1).all()              # 'the' is an English stopword


def test_stopwords_off_and_variants():
    plain = BM25Index.build(TEXTS, Bm25Config(stopwords=None))
    assert set(plain.search(["the"], 5)[1][0, :3].tolist()) == {0, 1, 2}
    for method in ("bm25l", "bm25+"):  # non-matching docs get a floor score but are not hits
        _, rows = BM25Index.build(TEXTS, Bm25Config(method=method)).search(["cat"], 5)
        assert rows[0, :3].tolist() == [3, 0, 1] and (rows[0, 3:] == -1).all()


def test_save_mmap_load_same_results_no_pickles(tmp_path):
    index = BM25Index.build(TEXTS, Bm25Config(k1=1.5, b=0.6))
    queries = ["cat yard", "bird", "gluons"]
    before = index.search(queries, 4)
    out = index.save(tmp_path / "bm25")
    names = sorted(p.name for p in out.iterdir())
    assert "bm25.json" in names and not any(n.endswith((".pkl", ".pickle")) for n in names)
    for npy in out.glob("*.npy"):
        np.load(npy, allow_pickle=False)  # raises if any array needed pickle
    meta = json.loads((out / "bm25.json").read_text())
    assert meta["config"]["k1"] == 1.5 and meta["num_docs"] == 5
    loaded = BM25Index.load(out, mmap=True)
    # mapped, not read: a plain view whose buffer is the file mapping
    assert isinstance(loaded.model.scores["data"].base, np.memmap)
    after = loaded.search(queries, 4)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    assert loaded.report()["config"]["b"] == 0.6


def test_bad_inputs():
    with pytest.raises(ValueError, match="0 texts"):
        BM25Index.build([], Bm25Config())
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        BM25Index.build(["ok", None], Bm25Config())
    with pytest.raises(TypeError):
        BM25Index.build(TEXTS, Bm25Config()).search("cat", 3)


def test_scifact_bm25_finds_the_judged_document(scifact_dir):
    docs = [json.loads(line) for line in (scifact_dir / "corpus.jsonl").open()][:1000]
    index = BM25Index.build([d["title"] + " " + d["text"] for d in docs], Bm25Config())
    # a document's own title is a strong query for it
    titles = [d["title"] for d in docs[:50]]
    _, rows = index.search(titles, 10)
    top1 = np.mean(rows[:, 0] == np.arange(50))
    assert top1 >= 0.9


def test_saved_files_do_not_depend_on_the_hash_seed_or_the_clock(tmp_path):
    """Equal corpora give byte-equal index files (bm25s numbers tokens through a set)."""
    import hashlib
    import subprocess
    import sys

    script = ("import sys; from corpusforge.index.bm25 import BM25Index; from corpusforge.spec import Bm25Config;"
              "BM25Index.build(['zebra apple melon', 'melon kiwi grape', 'apple pear plum'] * 3, Bm25Config())"
              ".save(sys.argv[1])")
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env={"PYTHONHASHSEED": seed},
                       timeout=120)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1] and "vocab.index.json" in digests[0]


@pytest.mark.parametrize("cfg", [Bm25Config(), Bm25Config(method="bm25+", stemmer="english", stopwords=None)],
                             ids=["lucene", "bm25+stemmed"])
def test_two_pass_build_over_parts_equals_the_single_build_file_for_file(tmp_path, cfg):
    """Per-part statistics, a global merge, per-part scores: the files `build` writes (the Ray engine's path)."""
    from corpusforge.index.bm25 import CorpusStats, shard_postings, shard_stats

    texts = [f"{t} {TEXTS[i % len(TEXTS)]} item{i % 7}" for i, t in enumerate(TEXTS * 9)] + ["", "the of a"]
    cuts = [0, 1, 17, 17, 30, len(texts)]  # one-row and empty parts too
    pieces = [(lo, texts[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    stats = CorpusStats.merge([shard_stats(part, cfg) for _, part in reversed(pieces)], cfg)  # any order
    parted = BM25Index.write_postings((shard_postings(part, cfg, stats, lo) for lo, part in pieces), stats, cfg,
                                      tmp_path / "parted")
    whole = BM25Index.build(texts, cfg)
    whole.save(tmp_path / "whole")
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "parted").iterdir())
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parted" / name).read_bytes(), name
    assert parted.search(["cat item3"], 5)[1].tolist() == whole.search(["cat item3"], 5)[1].tolist()


@pytest.mark.parametrize("cfg", [Bm25Config(), Bm25Config(method="bm25l", stopwords=None)], ids=["lucene", "bm25l"])
def test_build_in_parts_equals_the_single_build_and_reads_the_corpus_twice(tmp_path, cfg):
    """The local engine's streaming build: parts read twice (statistics, then scores), the files of `build`."""
    texts = [f"{t} {TEXTS[i % len(TEXTS)]} item{i % 7}" for i, t in enumerate(TEXTS * 9)] + ["", "the of a"]
    cuts = [0, 1, 17, 17, 30, len(texts)]
    reads = []

    def parts():
        reads.append(1)
        return (texts[lo:hi] for lo, hi in zip(cuts, cuts[1:]))

    streamed = BM25Index.build_in_parts(parts, cfg, tmp_path / "streamed")
    assert len(reads) == 2
    BM25Index.build(texts, cfg).save(tmp_path / "whole")
    assert isinstance(streamed.model.scores["data"].base, np.memmap)  # the written files, mapped
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streamed").iterdir())
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_build_in_parts_refuses_what_build_refuses(tmp_path):
    with pytest.raises(ValueError, match="0 texts"):
        BM25Index.build_in_parts(lambda: iter([[], []]), Bm25Config(), tmp_path / "empty")
    with pytest.raises(ValueError, match=r"texts\[3\] is NoneType"):
        BM25Index.build_in_parts(lambda: iter([["a b", "c"], ["d", None]]), Bm25Config(), tmp_path / "none")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_saved_vocabulary_does_not_depend_on_orjson_being_installed(tmp_path, monkeypatch):
    """bm25s serialises the vocabulary with orjson when present (the serving venv) and json otherwise
    (the Airflow venv): the same index must give the same files under both."""
    from bm25s.utils import json_functions

    texts = TEXTS + ["café naïve Zürich", "tab\tand \"quotes\" / slash"]
    index = BM25Index.build(texts, Bm25Config())
    index.save(tmp_path / "default")
    monkeypatch.setattr(json_functions, "dumps", json_functions.dumps_with_builtin)
    index.save(tmp_path / "builtin")
    for f in sorted((tmp_path / "default").iterdir()):
        assert f.read_bytes() == (tmp_path / "builtin" / f.name).read_bytes(), f.name
    assert BM25Index.load(tmp_path / "builtin").search(["zürich"], 3)[1][0, 0] == len(TEXTS)
