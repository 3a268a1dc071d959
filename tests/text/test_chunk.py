"""Chunking: budgets checked with the model's own tokenizer, spans, ids, overlap, boundaries."""

from __future__ import annotations

import json
import random
import re

import pytest

from corpusforge.encoding import models
from corpusforge.text.chunk import Chunker
from corpusforge.data.hashing import chunk_id
from corpusforge.spec import ChunkConfig


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("default")


@pytest.fixture(scope="module")
def scifact_docs(scifact_dir):
    docs = []
    with open(scifact_dir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append({"doc_id": d["_id"], "title": d["title"], "text": d["text"],
                         "acl": ["public"], "metadata": json.dumps({"src": "scifact"})})
    return docs


@pytest.fixture(scope="module")
def scifact_run(scifact_docs, tokenizer):
    chunker = Chunker(ChunkConfig(max_tokens=256, overlap_tokens=32), tokenizer)
    rows = list(chunker.chunk_many(scifact_docs))
    return rows, chunker.report()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def body_of(row: dict, title: str | None) -> str:
    return row["text"][len(title) + 1 :] if title else row["text"]


def by_doc(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["doc_id"], []).append(r)
    return out


def check_chunks(doc: dict, rows: list[dict], tokenizer, max_tokens: int, title: str | None = None) -> None:
    """Shared invariants: budget (re-tokenised), spans, ordinals, coverage, ids."""
    text = doc["text"]
    assert [r["ordinal"] for r in rows] == list(range(len(rows)))
    counts = [len(ids) for ids in tokenizer([r["text"] for r in rows])["input_ids"]]
    for r, real in zip(rows, counts):
        assert r["n_tokens"] == real, (r["doc_id"], r["ordinal"])
        assert 1 <= real <= max_tokens
        assert 0 <= r["char_start"] < r["char_end"] <= len(text)
        assert text[r["char_start"] : r["char_end"]] == body_of(r, title)
        assert r["chunk_id"] == chunk_id(doc["doc_id"], r["text"])
    # Nothing lost: the chunks cover the body from its first to its last visible character.
    assert rows[0]["char_start"] == len(text) - len(text.lstrip())
    assert rows[-1]["char_end"] == len(text.rstrip())
    for a, b in zip(rows, rows[1:]):  # next chunk starts inside the previous one or after a gap of spaces
        assert a["char_start"] < b["char_start"]
        assert not text[a["char_end"] : b["char_start"]].strip()


def test_scifact_chunks_fit_the_budget_as_the_tokenizer_counts(scifact_docs, scifact_run, tokenizer):
    rows, report = scifact_run
    grouped = by_doc(rows)
    assert set(grouped) == {d["doc_id"] for d in scifact_docs}
    counts = [len(ids) for ids in tokenizer([r["text"] for r in rows])["input_ids"]]
    assert [r["n_tokens"] for r in rows] == counts
    assert max(counts) <= 256
    for doc in scifact_docs:
        doc_rows = grouped[doc["doc_id"]]
        title = doc["title"].strip()
        text = doc["text"]
        assert [r["ordinal"] for r in doc_rows] == list(range(len(doc_rows)))
        for r in doc_rows:
            assert r["text"].startswith(title + "\n")
            assert 0 <= r["char_start"] < r["char_end"] <= len(text)
            assert text[r["char_start"] : r["char_end"]] == body_of(r, title)
            assert r["acl"] == ["public"] and json.loads(r["metadata"]) == {"src": "scifact"}
        assert doc_rows[0]["char_start"] == len(text) - len(text.lstrip())
        assert doc_rows[-1]["char_end"] == len(text.rstrip())
    assert len({r["chunk_id"] for r in rows}) == len(rows)
    assert report["docs"] == len(scifact_docs) and report["chunks"] == len(rows)
    assert report["n_tokens_max"] == max(counts) and report["n_tokens_min"] == min(counts)
    assert report["docs_split"] > 1000  # SciFact abstracts average ~310 tokens


def test_short_document_is_one_chunk(scifact_docs, scifact_run, tokenizer):
    rows, _ = scifact_run
    grouped = by_doc(rows)
    short = next(d for d in scifact_docs
                 if n_tokens(tokenizer, d["title"].strip() + "\n" + d["text"]) <= 256)
    [row] = grouped[short["doc_id"]]
    assert row["text"] == short["title"].strip() + "\n" + short["text"].strip()


def test_chunk_ids_are_stable_across_runs_and_batchings(scifact_docs, scifact_run, tokenizer):
    rows, _ = scifact_run
    subset = scifact_docs[:300]
    ids = {d["doc_id"] for d in subset}
    first = list(Chunker(ChunkConfig(), tokenizer, batch_size=7).chunk_many(subset))
    second = list(Chunker(ChunkConfig(), tokenizer, batch_size=300).chunk_many(subset))
    assert first == second
    assert first == [r for r in rows if r["doc_id"] in ids]


def test_consecutive_chunks_of_long_documents_overlap(scifact_docs, scifact_run, tokenizer):
    rows, _ = scifact_run
    texts = {d["doc_id"]: d["text"] for d in scifact_docs}
    overlaps = []
    for doc_id, doc_rows in by_doc(rows).items():
        for a, b in zip(doc_rows, doc_rows[1:]):
            shared = texts[doc_id][b["char_start"] : a["char_end"]]
            overlaps.append(len(tokenizer(shared, add_special_tokens=False)["input_ids"]))
            if shared:  # the overlap starts on a word, never inside one
                assert b["char_start"] == 0 or texts[doc_id][b["char_start"] - 1].isspace()
    assert len(overlaps) > 4000
    assert max(overlaps) <= 32
    assert sum(o > 0 for o in overlaps) >= 0.99 * len(overlaps)
    assert sum(overlaps) / len(overlaps) > 20  # "about overlap_tokens", not a token or two


def _sentence(rng: random.Random, words: int) -> str:
    vocab = ["protein", "cell", "binding", "assay", "tumor", "signal", "mouse", "level", "gene",
             "response", "growth", "factor", "receptor", "patients", "increased", "reduced"]
    return " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."


def test_paragraph_boundaries_are_preferred(tokenizer):
    rng = random.Random(1)
    paragraphs = [" ".join(_sentence(rng, 6) for _ in range(3)) for _ in range(4)]  # ~21 tokens
    doc = {"doc_id": "p", "title": "", "text": "\n\n".join(paragraphs)}
    cfg = ChunkConfig(max_tokens=40, overlap_tokens=0, include_title=False)
    rows = Chunker(cfg, tokenizer).chunk(doc)
    assert [r["text"] for r in rows] == paragraphs
    check_chunks(doc, rows, tokenizer, 40)


def test_sentence_boundaries_come_before_words(tokenizer):
    rng = random.Random(2)
    sentences = [_sentence(rng, 7) for _ in range(12)]  # ~8 tokens each, one paragraph
    doc = {"doc_id": "s", "text": " ".join(sentences)}
    cfg = ChunkConfig(max_tokens=32, overlap_tokens=0, include_title=False)
    rows = Chunker(cfg, tokenizer).chunk(doc)
    assert len(rows) > 3
    for r in rows:  # every chunk is a run of whole sentences
        assert re.fullmatch(r"(?:[A-Z][a-z ]+\. ?)+", r["text"]), r["text"]
    check_chunks(doc, rows, tokenizer, 32)


def test_words_are_the_fallback_inside_a_long_sentence(tokenizer):
    rng = random.Random(3)
    doc = {"doc_id": "w", "text": _sentence(rng, 200)[:-1]}  # no sentence boundary at all
    rows = Chunker(ChunkConfig(max_tokens=32, overlap_tokens=8, include_title=False), tokenizer).chunk(doc)
    text = doc["text"]
    for r in rows:  # every cut falls between words
        assert r["char_start"] == 0 or text[r["char_start"] - 1] == " "
        assert r["char_end"] == len(text) or text[r["char_end"]] == " "
    check_chunks(doc, rows, tokenizer, 32)


def test_abbreviations_and_decimals_do_not_end_sentences(tokenizer):
    sentences = [
        "Several markers, e.g. CD34 and CD38, were measured in 3.5 ml of blood from each donor.",
        "As shown by Smith et al. (2005) the effect was strong in Fig. 2 of the original report.",
        "Expression rose 2.5 fold compared with the matched controls in both cohorts studied here.",
        "No change was seen in the wild type animals that received the vehicle injection alone.",
    ]
    doc = {"doc_id": "a", "text": " ".join(sentences)}
    rows = Chunker(ChunkConfig(max_tokens=48, overlap_tokens=0, include_title=False), tokenizer).chunk(doc)
    starts = {s.split()[0] for s in sentences}
    for r in rows:
        assert r["text"].split()[0] in starts, r["text"]
        assert r["text"].endswith(".")
    check_chunks(doc, rows, tokenizer, 48)


def test_five_megabyte_document(tokenizer):
    rng = random.Random(4)
    parts, size = [], 0
    while size < 5_000_000:
        para = " ".join(_sentence(rng, rng.randint(4, 40)) for _ in range(rng.randint(1, 12)))
        parts.append(para)
        size += len(para) + 2
    doc = {"doc_id": "big", "title": "A very large document", "text": "\n\n".join(parts)}
    chunker = Chunker(ChunkConfig(max_tokens=256, overlap_tokens=32), tokenizer)
    rows = chunker.chunk(doc)
    text = doc["text"]
    assert len(text) >= 5_000_000 and len(rows) > 4000
    assert max(r["n_tokens"] for r in rows) <= 256
    assert len({r["chunk_id"] for r in rows}) == len(rows)
    assert rows[0]["char_start"] == 0 and rows[-1]["char_end"] == len(text)
    for a, b in zip(rows, rows[1:]):  # next chunk starts inside the previous one or after a gap of spaces
        assert a["char_start"] < b["char_start"]
        assert not text[a["char_end"] : b["char_start"]].strip()
    for r in rows[::25]:  # a sample re-tokenised by the tokenizer itself
        assert n_tokens(tokenizer, r["text"]) == r["n_tokens"]
        assert text[r["char_start"] : r["char_end"]] == body_of(r, doc["title"])


_RNG = random.Random(6)


@pytest.mark.parametrize("word", [
    "a" * 10_000,  # longer than WordPiece's 100 chars per word: a single [UNK]
    "".join(chr(0x4E00 + _RNG.randrange(3000)) for _ in range(10_000)),  # CJK: a token per char
    "".join(_RNG.choice("abcdefgh") + _RNG.choice("-/:") for _ in range(5_000)),  # punctuation-split
], ids=["unk", "cjk", "punctuated"])
def test_single_ten_thousand_character_word(tokenizer, word):
    assert len(word) == 10_000 and not re.search(r"\s", word)
    doc = {"doc_id": "word", "title": "Title", "text": word}
    rows = Chunker(ChunkConfig(max_tokens=256), tokenizer).chunk(doc)
    check_chunks(doc, rows, tokenizer, 256, title="Title")


def test_word_cut_inside_at_token_boundaries_still_fits(tokenizer):
    # Words of ~45 WordPiece tokens under a 16-token budget: cut at token boundaries, where the
    # cut text re-tokenises differently ("##ab" becomes "ab..."), so counts are re-measured and
    # the document is planned again with a smaller budget.
    rng = random.Random(0)
    words = ["".join(rng.choice("qxzjkvwy0123456789") for _ in range(95)) for _ in range(30)]
    doc = {"doc_id": "cut", "text": " ".join(words)}
    chunker = Chunker(ChunkConfig(max_tokens=16, overlap_tokens=4, include_title=False), tokenizer)
    rows = chunker.chunk(doc)
    check_chunks(doc, rows, tokenizer, 16)
    report = chunker.report()
    assert report["replanned_docs"] == 1 and report["verified_chunks"] > len(rows)


def test_title_carried_only_when_enabled(scifact_docs, tokenizer):
    doc = max(scifact_docs[:200], key=lambda d: len(d["text"]))
    title = doc["title"].strip()
    with_title = Chunker(ChunkConfig(include_title=True), tokenizer).chunk(doc)
    without = Chunker(ChunkConfig(include_title=False), tokenizer).chunk(doc)
    assert all(r["text"].startswith(title + "\n") for r in with_title)
    assert all(title not in r["text"] for r in without)
    check_chunks(doc, with_title, tokenizer, 256, title=title)
    check_chunks(doc, without, tokenizer, 256)
    assert len(without) <= len(with_title)


def test_overlong_title_is_truncated_at_a_word(tokenizer):
    title = " ".join(["mitochondrial"] * 60)
    rng = random.Random(7)
    doc = {"doc_id": "t", "title": title, "text": " ".join(_sentence(rng, 5) for _ in range(30))}
    chunker = Chunker(ChunkConfig(max_tokens=32, overlap_tokens=4), tokenizer)
    rows = chunker.chunk(doc)
    kept = rows[0]["text"].split("\n")[0]
    assert title.startswith(kept) and len(kept) < len(title) and kept.endswith("mitochondrial")
    assert n_tokens(tokenizer, kept) - 2 <= (32 - 2) // 2
    assert chunker.report()["titles_truncated"] == 1
    check_chunks(doc, rows, tokenizer, 32, title=kept)


def test_small_budget_on_scifact(scifact_docs, tokenizer):
    chunker = Chunker(ChunkConfig(max_tokens=32, overlap_tokens=8), tokenizer)
    rows = by_doc(list(chunker.chunk_many(scifact_docs[:60])))
    for doc in scifact_docs[:60]:
        title = chunker.chunk(doc)[0]["text"].split("\n")[0]
        check_chunks(doc, rows[doc["doc_id"]], tokenizer, 32, title=title)


def test_auto_verification_equals_full_verification(scifact_docs, tokenizer):
    cfg = ChunkConfig(max_tokens=64, overlap_tokens=16)
    auto = list(Chunker(cfg, tokenizer, verify="auto").chunk_many(scifact_docs[:150]))
    full = Chunker(cfg, tokenizer, verify="all")
    assert list(full.chunk_many(scifact_docs[:150])) == auto
    assert full.report()["verified_chunks"] == len(auto)


def test_repeated_text_yields_unique_ids(tokenizer):
    para = "The same paragraph repeats here with exactly the same words every time."
    doc = {"doc_id": "r", "text": "\n\n".join([para] * 6)}
    chunker = Chunker(ChunkConfig(max_tokens=24, overlap_tokens=0, include_title=False), tokenizer)
    rows = chunker.chunk(doc)
    assert [r["text"] for r in rows] == [para]
    assert chunker.report()["duplicate_chunks_skipped"] == 5


def test_empty_and_invalid_documents(tokenizer):
    chunker = Chunker(ChunkConfig(), tokenizer)
    assert chunker.chunk({"doc_id": "e", "title": "Only a title", "text": ""}) == []
    assert chunker.chunk({"doc_id": "ws", "text": " \n\t "}) == []
    assert chunker.report()["docs_empty"] == 2
    with pytest.raises(ValueError, match="no doc_id"):
        chunker.chunk({"text": "orphan"})
    with pytest.raises(ValueError, match="verify"):
        Chunker(ChunkConfig(), tokenizer, verify="sometimes")
