"""Tests of the clean stage on tiny inline documents and on the shared SciFact corpus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import random

from datasketch import MinHash

from corpusforge.text.clean import (
    MINHASH_SEED,
    Cleaner,
    clean_documents,
    lsh_bands,
    redact_emails,
    redact_phones,
    shingle_hashes,
)
from corpusforge.data.hashing import content_hash
from corpusforge.data.schemas import DOCUMENTS, Rejected
from corpusforge.spec import CleanConfig, PipelineSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]

# A ~60-word paragraph: long enough that near-duplicate estimates are meaningful.
BASE = (
    "Alterations of the architecture of cerebral white matter in the developing human brain can "
    "affect cortical development and result in functional disabilities. A line scan diffusion "
    "weighted magnetic resonance imaging sequence with diffusion tensor analysis was applied to "
    "measure the apparent diffusion coefficient, to calculate relative anisotropy, and to "
    "delineate three dimensional fiber architecture in cerebral white matter in preterm and "
    "full term infants born between the years studied here."
)


def doc(doc_id: str, text: str, title: str = "", **extra) -> dict:
    """A document dict as the extract stage writes it."""
    d = {
        "doc_id": doc_id,
        "title": title,
        "text": text,
        "source": f"inline:{doc_id}",
        "metadata": json.dumps({"n": doc_id}),
        "acl": ["team-a"],
        "content_hash": content_hash(title, text),
    }
    d.update(extra)
    return d


def cfg(**kw) -> CleanConfig:
    """A config with defaults, overridable by keyword (nested sections as dicts)."""
    return CleanConfig.model_validate(kw)


def run(docs: list[dict], **kw) -> tuple[list[dict], list[Rejected], dict]:
    return clean_documents(docs, cfg(**kw))


def clean_one(text: str, title: str = "", **kw) -> dict:
    kept, rejected, _ = run([doc("d", text, title)], **kw)
    assert not rejected, rejected
    return kept[0]


# ---------------------------------------------------------------- steps 1-2: repair, normalise


def test_mojibake_is_repaired_and_counted():
    cleaner = Cleaner(cfg())
    (out,) = list(cleaner.process([doc("d", "Le cafÃ© est ouvert.", title="CafÃ©s")]))
    assert out["text"] == "Le café est ouvert."
    assert out["title"] == "Cafés"
    assert cleaner.summary()["unicode_repaired"] == 1


def test_fix_unicode_off_leaves_mojibake():
    assert clean_one("Le cafÃ© est ouvert.", fix_unicode=False)["text"] == "Le cafÃ© est ouvert."


def test_html_entities_in_ascii_text_are_repaired():
    assert clean_one("salt &amp; pepper")["text"] == "salt & pepper"


def test_nfkc_folds_compatibility_characters():
    out = clean_one("the ﬁrst ｆｕｌｌｗｉｄｔｈ test", normalization="NFKC")
    assert out["text"] == "the first fullwidth test"


def test_nfc_composes_but_keeps_ligatures():
    out = clean_one("cafe\u0301 ﬁne", normalization="NFC")
    assert out["text"] == "caf\u00e9 ﬁne"


def test_normalization_none_keeps_decomposed_text():
    assert clean_one("cafe\u0301", normalization="none")["text"] == "cafe\u0301"


def test_curly_quotes_are_not_straightened():
    # ftfy would uncurl them by default; quotes are style, not damage.
    assert clean_one("“quoted” text")["text"] == "“quoted” text"


def test_control_characters_removed_tabs_and_newlines_kept():
    out = clean_one("a\x00b\x07c\x1b d\x7f\ufeff\u200be\tf\ng", collapse_whitespace=False)
    assert out["text"] == "abc de\tf\ng"


def test_carriage_returns_and_page_breaks_become_newlines():
    out = clean_one("line one\r\nline two\rline three\x0cpage two", collapse_whitespace=False)
    assert out["text"] == "line one\nline two\nline three\npage two"


def test_whitespace_collapsed_and_paragraph_breaks_kept():
    text = "  First   para\t\twith  tabs. \n\n\n\n Second\u00a0para \n \n \n Third\nline  \n"
    out = clean_one(text)
    assert out["text"] == "First para with tabs.\n\nSecond para\n\nThird\nline"


def test_collapse_whitespace_off_keeps_runs():
    out = clean_one("a  b\n\n\n\nc", collapse_whitespace=False)
    assert out["text"] == "a  b\n\n\n\nc"


def test_title_is_cleaned_to_one_line():
    out = clean_one("body", title="  A\ttitle \n over\r\nlines ")
    assert out["title"] == "A title over lines"


def test_output_keeps_schema_fields_and_recomputes_hash():
    original = doc("d", "Some   text.", title="T", metadata='{"k": 1}')
    kept, _, _ = run([original])
    out = kept[0]
    assert set(out) == set(DOCUMENTS.names)
    assert out["text"] == "Some text."
    assert out["content_hash"] == content_hash("T", "Some text.")
    assert out["content_hash"] != original["content_hash"]
    assert (out["doc_id"], out["source"], out["metadata"], out["acl"]) == (
        "d", "inline:d", '{"k": 1}', ["team-a"]
    )


# ---------------------------------------------------------------- step 3: PII


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Contact jane.doe+lab@example.co.uk today.", "Contact [EMAIL] today."),
        ("Mail: A_B-9@sub.uni-bonn.de.", "Mail: [EMAIL]."),
        ("two: a@x.org, b@y.io", "two: [EMAIL], [EMAIL]"),
    ],
)
def test_emails_redacted(text, expected):
    assert redact_emails(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "follow @jane on the forum",
        "the a@b relation",
        "mass m@z.c ratio",
        "cells at 37@C overnight",
    ],
)
def test_email_negatives_not_redacted(text):
    assert redact_emails(text) == (text, 0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Call (555) 123-4567 now.", "Call [PHONE] now."),
        ("Office: 555-123-4567.", "Office: [PHONE]."),
        ("Office: 555.123.4567", "Office: [PHONE]"),
        ("Phone: 555 123 4567", "Phone: [PHONE]"),
        ("Fax (555) 123 4567", "Fax [PHONE]"),
        ("Toll free 1-800-555-0199.", "Toll free [PHONE]."),
        ("London +44 20 7946 0958, ask", "London [PHONE], ask"),
        ("Paris +33 1 42 68 53 00.", "Paris [PHONE]."),
        ("Berlin +49-30-1234567", "Berlin [PHONE]"),
        ("US +1 (555) 123-4567", "US [PHONE]"),
        ("Tel: 555-0199", "Tel: [PHONE]"),
        ("phone 867-5309 please", "phone [PHONE] please"),
    ],
)
def test_phones_redacted(text, expected):
    redacted, n = redact_phones(text)
    assert redacted == expected
    assert n == expected.count("[PHONE]")


@pytest.mark.parametrize(
    "text",
    [
        "In 2019 and 2020 the cohort grew.",
        "Patients enrolled from 1990-2000 and 2001–2010.",
        "Doses of 200-1000 mg and 100-200 mg/kg were given.",
        "pi is 3.14159265 and e is 2.718281828.",
        "significant (p = 0.0001, p<0.05, P = 1.2e-10).",
        "OR 1.23 (95% CI 1.05-1.44).",
        "as shown before [12-15], [3,4,7].",
        "Nature 2005;436(7050):123-145.",
        "doi:10.1016/j.cell.2010.01.001 and 10.1038/nature12373.",
        "PMID 12345678 and n = 1234567 cells.",
        "a sample of 1,234,567 reads",
        "recorded on 2020-01-15 at 12:30",
        "ISBN 978-3-16-148410-0",
        "Ca2+ 120 340 5600 mM",
        "an increase of +12.5% (+0.45 SD)",
        "chr1:123456789-123456799",
        "version 1.2.3.4567 released",
        "table row 120 340 5600 7800",
        "call them in 1990-2000",
    ],
)
def test_phone_negatives_not_redacted(text):
    assert redact_phones(text) == (text, 0)


def test_pii_is_off_by_default():
    text = "Mail jane@example.org or call 555-123-4567."
    assert clean_one(text)["text"] == text


def test_pii_redaction_counted_in_summary_and_applies_to_title():
    docs = [
        doc("a", "Write to jane@example.org or call 555-123-4567.", title="By bob@example.org"),
        doc("b", "Call +44 20 7946 0958 between 1990-2000."),
        doc("c", "Nothing personal here in 2021."),
    ]
    kept, rejected, summary = run(docs, pii={"emails": True, "phones": True})
    assert not rejected
    assert kept[0]["text"] == "Write to [EMAIL] or call [PHONE]."
    assert kept[0]["title"] == "By [EMAIL]"
    assert kept[1]["text"] == "Call [PHONE] between 1990-2000."
    assert kept[2]["text"] == "Nothing personal here in 2021."
    assert summary["pii_redactions"] == {"emails": 2, "phones": 2}
    assert summary["documents_with_pii"] == 2


def test_only_configured_pii_kind_is_redacted():
    out = clean_one("jane@example.org 555-123-4567", pii={"emails": True, "phones": False})
    assert out["text"] == "[EMAIL] 555-123-4567"


# ---------------------------------------------------------------- steps 4-6: quarantine


def test_empty_text_quarantined():
    _, rejected, _ = run([doc("e", " \n\t\x00 ")])
    assert [(r.reason, r.doc_id, r.stage) for r in rejected] == [("empty_text", "e", "clean")]


def test_empty_text_allowed_when_min_chars_zero():
    kept, rejected, _ = run([doc("e", "  ", title="Title only")], min_chars=0)
    assert not rejected and kept[0]["text"] == ""


def test_too_short_and_too_long_with_details():
    docs = [doc("s", "tiny"), doc("ok", "x" * 20), doc("l", "y" * 31)]
    kept, rejected, _ = run(docs, min_chars=10, max_chars=30)
    assert [d["doc_id"] for d in kept] == ["ok"]
    by_id = {r.doc_id: r for r in rejected}
    assert by_id["s"].reason == "too_short" and "4 chars" in by_id["s"].detail
    assert "min_chars=10" in by_id["s"].detail
    assert by_id["l"].reason == "too_long" and "31 chars" in by_id["l"].detail
    assert "max_chars=30" in by_id["l"].detail


def test_length_is_measured_after_cleaning():
    # 12 raw chars, 5 after collapsing: too short only once cleaned.
    _, rejected, _ = run([doc("w", "a    b    c ")], min_chars=6)
    assert rejected[0].reason == "too_short"


def test_exact_duplicate_after_cleaning_names_kept_doc():
    docs = [doc("first", "Same  text here.", title="T"), doc("second", "Same text here.  ", title="T")]
    kept, rejected, _ = run(docs, near_duplicates={"enabled": False})
    assert [d["doc_id"] for d in kept] == ["first"]
    assert rejected[0].reason == "exact_duplicate"
    assert rejected[0].doc_id == "second"
    assert "'first'" in rejected[0].detail


def test_exact_dedup_off_keeps_both():
    docs = [doc("a", "Same text."), doc("b", "Same text.")]
    kept, _, _ = run(docs, dedup_exact=False, near_duplicates={"enabled": False})
    assert [d["doc_id"] for d in kept] == ["a", "b"]


def test_same_text_different_title_is_not_exact_duplicate():
    docs = [doc("a", "Same text.", title="One"), doc("b", "Same text.", title="Two")]
    kept, _, _ = run(docs, near_duplicates={"enabled": False})
    assert len(kept) == 2


def test_near_duplicate_quarantined_with_kept_id_and_similarity():
    near = BASE.replace("preterm", "premature")  # one word of ~65 changed
    docs = [doc("orig", BASE), doc("near", near), doc("other", "An unrelated note about pyarrow tables.")]
    kept, rejected, _ = run(docs, near_duplicates={"threshold": 0.8})
    assert [d["doc_id"] for d in kept] == ["orig", "other"]
    (r,) = rejected
    assert (r.reason, r.doc_id) == ("near_duplicate", "near")
    assert "'orig'" in r.detail
    sim = float(r.detail.split("estimated Jaccard ")[1].split(" ")[0])
    assert 0.8 <= sim < 1.0


def test_near_duplicate_threshold_is_respected():
    near = BASE.replace("preterm", "premature")  # true shingle Jaccard ~0.86
    kept, rejected, _ = run([doc("orig", BASE), doc("near", near)], near_duplicates={"threshold": 0.99})
    assert len(kept) == 2 and not rejected


def test_near_duplicates_disabled_keeps_both():
    near = BASE.replace("preterm", "premature")
    kept, _, _ = run([doc("orig", BASE), doc("near", near)], near_duplicates={"enabled": False})
    assert len(kept) == 2


def test_near_duplicate_first_seen_wins_in_either_order():
    near = BASE.replace("preterm", "premature")
    nd = {"threshold": 0.8}
    kept_ab, rej_ab, _ = run([doc("a", BASE), doc("b", near)], near_duplicates=nd)
    kept_ba, rej_ba, _ = run([doc("b", near), doc("a", BASE)], near_duplicates=nd)
    assert [d["doc_id"] for d in kept_ab] == ["a"] and rej_ab[0].doc_id == "b"
    assert [d["doc_id"] for d in kept_ba] == ["b"] and rej_ba[0].doc_id == "a"


def test_results_are_deterministic_across_runs():
    variants = [BASE.replace("preterm", w) for w in ("premature", "newborn", "young", "preterm")]
    docs = [doc(f"d{i}", t) for i, t in enumerate(variants)]
    first = run(docs, near_duplicates={"threshold": 0.8})
    second = run(docs, near_duplicates={"threshold": 0.8})
    assert [r.as_row() for r in first[1]] == [r.as_row() for r in second[1]]
    assert first[0] == second[0]
    assert [d["doc_id"] for d in first[0]] == ["d0"]


def test_lsh_bands_guarantee_recall_at_high_thresholds():
    assert lsh_bands(0.95, 128) == (7, 18)  # at most 6 of 128 positions differ at >= 0.95
    assert lsh_bands(1.0, 128) == (2, 64)
    assert lsh_bands(0.99, 128) == (2, 64)
    assert lsh_bands(0.5, 128) is None  # too many bands: datasketch's tuned parameters instead


@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95, 0.99])
def test_lsh_finds_exactly_what_brute_force_finds(threshold):
    rng = random.Random(7)
    words = BASE.split()
    docs = []
    for i in range(60):  # variants with 0-6 substituted words: similarities spread over 0.5-1
        w = list(words)
        for _ in range(rng.randint(0, 6)):
            w[rng.randrange(len(w))] = f"tok{rng.randrange(1000)}"
        docs.append(doc(f"v{i:02d}", " ".join(w)))
    nd = {"threshold": threshold}
    _, rejected, _ = run(docs, dedup_exact=False, near_duplicates=nd)

    kept_sigs: dict[str, MinHash] = {}
    expected = {}
    for d in docs:
        sig = MinHash(num_perm=128, seed=MINHASH_SEED, hashfunc=int)
        sig.update_batch(shingle_hashes(d["text"], 5).tolist())
        sims = {k: s.jaccard(sig) for k, s in kept_sigs.items()}
        best = max(sims, key=lambda k: (sims[k], -int(k[1:])), default=None)
        if best is not None and sims[best] >= threshold:
            expected[d["doc_id"]] = best
        else:
            kept_sigs[d["doc_id"]] = sig
    got = {r.doc_id: r.detail.split("'")[1] for r in rejected}
    assert got == expected
    assert 0 < len(expected) < len(docs) - 1  # the case is not trivial either way


def test_short_docs_use_the_shingles_they_have():
    assert shingle_hashes("two words", 5).size == 1
    assert shingle_hashes("!!! ...", 5).size == 0
    docs = [doc("a", "Gene expression"), doc("b", "gene  EXPRESSION!"), doc("c", "Protein folding")]
    kept, rejected, _ = run(docs)
    assert [d["doc_id"] for d in kept] == ["a", "c"]
    assert rejected[0].reason == "near_duplicate" and "'a'" in rejected[0].detail


def test_wordless_docs_are_not_near_duplicates_of_each_other():
    kept, _, summary = run([doc("a", "!!!"), doc("b", "???")])
    assert len(kept) == 2
    assert summary["near_duplicate_skipped_no_words"] == 2


def test_invalid_records_and_duplicate_ids_are_quarantined():
    bad_text = doc("x", "ok")
    bad_text["text"] = None
    bad_acl = doc("y", "fine text", acl="team-a")
    docs = [
        doc("a", "Alpha text."),
        bad_text,
        {"title": "no id", "text": "t"},
        bad_acl,
        "not a dict",
        doc("a", "Other text."),
    ]
    kept, rejected, summary = run(docs)
    assert [d["doc_id"] for d in kept] == ["a"]
    assert [r.reason for r in rejected] == ["invalid_record"] * 4 + ["duplicate_doc_id"]
    assert "'text'" in rejected[0].detail and "'doc_id'" in rejected[1].detail
    assert "'acl'" in rejected[2].detail and "dict" in rejected[3].detail
    assert json.loads(rejected[3].record) == "not a dict" and rejected[3].doc_id is None
    assert summary["documents_in"] == 6 and summary["quarantined"] == 5


def test_blank_acl_tags_are_quarantined():
    # A blank tag is no group anyone belongs to: the intent is unknown, so the record waits in quarantine.
    kept, rejected, summary = run([doc("a", "Alpha text."), doc("b", "Beta text.", acl=[""]),
                                   doc("c", "Gamma text.", acl=["team-a", " \t"])])
    assert [d["doc_id"] for d in kept] == ["a"]
    assert [(r.doc_id, r.reason) for r in rejected] == [("b", "bad_acl"), ("c", "bad_acl")]
    assert summary["quarantined_by_reason"] == {"bad_acl": 2}


def test_optional_fields_get_defaults_and_extra_keys_are_dropped():
    minimal = {"doc_id": "m", "text": "Body text.", "title": None, "extra": 1, "metadata": {"b": 2, "a": 1}}
    kept, rejected, _ = run([minimal])
    assert not rejected
    assert kept[0] == {
        "doc_id": "m",
        "title": "",
        "text": "Body text.",
        "source": "",
        "metadata": '{"a": 1, "b": 2}',
        "acl": [],
        "content_hash": content_hash("", "Body text."),
    }


# ---------------------------------------------------------------- accounting


def test_every_doc_accounted_for_and_record_recoverable():
    near = BASE.replace("preterm", "premature")
    docs = [
        doc("a", BASE, title="Brain"),
        doc("b", BASE, title="Brain"),  # exact duplicate of a
        doc("c", near, title="Brain"),  # near duplicate of a
        doc("d", ""),  # empty
        doc("e", "short"),  # too short
        doc("f", "z" * 5000),  # too long
        doc("g", "A perfectly fine document about chunking."),
        doc("h", "Le cafÃ©   est \x00 ouvert."),
    ]
    cleaner = Cleaner(cfg(min_chars=8, max_chars=4000, near_duplicates={"threshold": 0.8}))
    results = list(cleaner.process(iter(docs)))
    assert len(results) == len(docs)  # one result per input, in order
    kept = [r for r in results if not isinstance(r, Rejected)]
    rejected = [r for r in results if isinstance(r, Rejected)]
    assert sorted([d["doc_id"] for d in kept] + [r.doc_id for r in rejected]) == sorted(
        d["doc_id"] for d in docs
    )
    assert [d["doc_id"] for d in kept] == ["a", "g", "h"]
    reasons = {r.doc_id: r.reason for r in rejected}
    assert reasons == {
        "b": "exact_duplicate",
        "c": "near_duplicate",
        "d": "empty_text",
        "e": "too_short",
        "f": "too_long",
    }
    # the quarantine keeps the original, uncleaned input
    for r in rejected:
        original = next(d for d in docs if d["doc_id"] == r.doc_id)
        assert json.loads(r.record) == original
        assert r.source == original["source"]
        assert set(r.as_row()) == {"stage", "reason", "detail", "source", "doc_id", "record"}
    summary = cleaner.summary()
    assert summary["documents_in"] == 8
    assert summary["documents_out"] == 3
    assert summary["quarantined"] == 5
    assert summary["documents_in"] == summary["documents_out"] + summary["quarantined"]
    assert summary["quarantined_by_reason"] == {
        "empty_text": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "too_long": 1,
        "too_short": 1,
    }
    assert summary["unicode_repaired"] == 1
    assert summary["control_chars_removed"] == 1
    assert summary["whitespace_collapsed"] >= 1


def test_outputs_fit_the_arrow_contracts():
    import pyarrow as pa

    from corpusforge.data.schemas import QUARANTINE

    surrogate = {**doc("a", "x"), "text": "Good text with a lone surrogate \ud800 inside."}
    docs = [surrogate, doc("b", ""), doc("c", "Caf\u00e9 ok")]
    kept, rejected, _ = run(docs, fix_unicode=False)  # without ftfy, step 2 drops the surrogate
    table = pa.Table.from_pylist(kept, schema=DOCUMENTS)
    assert table.num_rows == 2
    assert table.column("text")[0].as_py() == "Good text with a lone surrogate inside."
    table.column("text").cast(pa.large_string())  # encodable: the surrogate is gone
    assert pa.Table.from_pylist([r.as_row() for r in rejected], schema=QUARANTINE).num_rows == 1


def test_state_carries_across_process_calls():
    cleaner = Cleaner(cfg())
    first = list(cleaner.process([doc("a", "Repeated text.")]))
    second = list(cleaner.process([doc("b", "Repeated text.")]))
    assert not isinstance(first[0], Rejected)
    assert isinstance(second[0], Rejected) and second[0].reason == "exact_duplicate"
    assert cleaner.summary()["documents_in"] == 2


def test_report_is_the_config():
    c = cfg(min_chars=5, pii={"emails": True})
    report = Cleaner(c).report()
    assert report == c.model_dump()
    assert report["pii"]["emails"] is True and report["near_duplicates"]["threshold"] == 0.95


def test_bounds_validated_by_config():
    with pytest.raises(ValueError, match="min_chars"):
        cfg(min_chars=10, max_chars=5)


# ---------------------------------------------------------------- SciFact


def _scifact_docs(scifact_dir) -> list[dict]:
    docs = []
    with open(scifact_dir / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.append(doc(rec["_id"], rec["text"], title=rec.get("title") or "", source="corpus.jsonl"))
    return docs


def test_scifact_cleans_fast_with_no_quarantine(scifact_dir):
    spec: PipelineSpec = load_spec(ROOT / "pipelines" / "scifact.yaml")
    assert spec.clean.near_duplicates.threshold == 0.95
    docs = _scifact_docs(scifact_dir)
    cleaner = Cleaner(spec.clean)
    start = time.perf_counter()
    results = list(cleaner.process(docs))
    elapsed = time.perf_counter() - start
    rejected = [r for r in results if isinstance(r, Rejected)]
    summary = cleaner.summary()
    print(
        f"\nSciFact clean: {len(docs)} docs in {elapsed:.2f} s ({len(docs) / elapsed:.0f} docs/s), "
        f"quarantined {len(rejected)}: {summary['quarantined_by_reason']}"
    )
    for r in rejected:
        print(f"  {r.reason} {r.doc_id}: {r.detail}")
    assert len(docs) == 5183
    assert summary["documents_in"] == summary["documents_out"] + summary["quarantined"] == 5183
    assert rejected == []
    assert summary["unicode_repaired"] >= 1  # SciFact does carry a few mojibake abstracts
