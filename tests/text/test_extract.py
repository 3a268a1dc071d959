"""Tests of the extract stage: every reader, every quarantine reason, S3 sources and SciFact."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpusforge.text.extract import iter_documents, read_qrels, read_queries, split_title
from corpusforge.data.hashing import content_hash
from corpusforge.data.schemas import DOCUMENTS, QUARANTINE, Rejected
from corpusforge.spec import FieldMap, SourceConfig

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _split(items) -> tuple[list[dict], list[Rejected]]:
    items = list(items)
    docs = [i for i in items if not isinstance(i, Rejected)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    return docs, rejected


def _check_contracts(docs: list[dict], rejected: list[Rejected]) -> None:
    """Documents and quarantine rows must fit their Arrow schemas exactly."""
    assert pa.Table.from_pylist(docs, schema=DOCUMENTS).num_rows == len(docs)
    assert all(list(d) == DOCUMENTS.names for d in docs)
    assert pa.Table.from_pylist([r.as_row() for r in rejected], schema=QUARANTINE).num_rows == len(rejected)
    assert all(r.stage == "extract" for r in rejected)
    for d in docs:
        assert isinstance(json.loads(d["metadata"]), dict)
        assert d["content_hash"] == content_hash(d["title"], d["text"])


def _pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF with one Helvetica text line per page ("" gives a blank page)."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                    f"<< /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info = ""
    if title:
        objs.append(f"<< /Title ({title}) >>".encode())
        info = f" /Info {len(objs)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\n".encode()
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


HTML_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>Cell Biology Notes</title></head>
<body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li><li><a href="/shop">Shop now</a></li></ul></nav>
<article><h1>The powerhouse</h1>
<p>The mitochondrion is the powerhouse of the cell and produces ATP through oxidative phosphorylation.</p>
<p>Ribosomes translate messenger RNA into proteins in the cytoplasm and on the rough endoplasmic reticulum.</p>
</article>
<footer><p>Copyright 2024 Example Corp. All rights reserved. Privacy policy and cookie settings.</p></footer>
</body></html>"""


# ----------------------------------------------------------------------------------------------
# jsonl: the mixed fixture corpus with every line-level case
# ----------------------------------------------------------------------------------------------

FIELDS = FieldMap(id="id", title="title", text="body", acl="groups", metadata=["lang", "year"])
BIG_TEXT = ("lorem ipsum dolor sit amet " * 200_000)[:5 * 1024 * 1024]


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _mixed_corpus(path: Path) -> tuple[list[dict], list[tuple[int, str, str | None]]]:
    """Writes the fixture; returns (expected good docs, expected rejections (line, reason, id))."""
    lines: list[bytes] = [
        _line({"id": 1, "title": "One", "body": "first text", "lang": "en", "groups": "team-a"}),  # 1
        _line({"id": "d2", "body": "second text", "groups": ["a", "b"], "other": "x"}),  # 2
        b'{"id": "d3", "body": "broken json"',  # 3 malformed
        _line({"body": "a record without any id"}),  # 4 missing id
        _line({"id": "", "body": "empty id"}),  # 5 empty id
        _line({"id": 1, "body": "different text, same id"}),  # 6 duplicate id, other content
        _line({"id": "d2", "body": "second text", "groups": ["a", "b"], "other": "x"}),  # 7 exact repeat
        _line({"id": "d8", "title": "no body"}),  # 8 missing text
        _line({"id": "d9", "body": 42}),  # 9 text not a string
        b'{"id": "d10", "body": "bad \xff\xfe bytes"}',  # 10 invalid utf-8
        _line({"id": "d11", "body": "", "year": 2020}),  # 11 empty text: kept
        b"   ",  # 12 blank: not a record
        _line({"id": "big", "title": "Big", "body": BIG_TEXT}),  # 13 5 MB document
        b"[1, 2, 3]",  # 14 not an object
        _line({"id": "d15", "body": "acl is a number", "groups": 5}),  # 15 invalid acl
        _line({"id": "d16", "title": None, "body": "Grüße, 東京 ✓", "lang": "de"}),  # 16 unicode
        _line({"id": "   ", "body": "whitespace id"}),  # 17 blank id
        _line({"id": "d18", "body": None}),  # 18 null text
        b'{"id": "d19", "body": "crlf line"}\r',  # 19 CRLF line ending
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    src = str(path)
    good = [
        {"doc_id": "1", "title": "One", "text": "first text", "source": f"{src}:1",
         "metadata": '{"lang": "en"}', "acl": ["team-a"]},
        {"doc_id": "d2", "title": "", "text": "second text", "source": f"{src}:2",
         "metadata": "{}", "acl": ["a", "b"]},
        {"doc_id": "d11", "title": "", "text": "", "source": f"{src}:11",
         "metadata": '{"year": 2020}', "acl": ["public"]},
        {"doc_id": "big", "title": "Big", "text": BIG_TEXT, "source": f"{src}:13",
         "metadata": "{}", "acl": ["public"]},
        {"doc_id": "d16", "title": "", "text": "Grüße, 東京 ✓", "source": f"{src}:16",
         "metadata": '{"lang": "de"}', "acl": ["public"]},
        {"doc_id": "d19", "title": "", "text": "crlf line", "source": f"{src}:19",
         "metadata": "{}", "acl": ["public"]},
    ]
    for doc in good:
        doc["content_hash"] = content_hash(doc["title"], doc["text"])
    bad = [
        (3, "malformed_json", None), (4, "missing_id", None), (5, "missing_id", None),
        (6, "duplicate_id", "1"), (7, "duplicate_id", "d2"), (8, "missing_text", "d8"),
        (9, "missing_text", "d9"), (10, "invalid_utf8", "d10"), (14, "malformed_json", None),
        (15, "invalid_acl", "d15"), (17, "missing_id", None), (18, "missing_text", "d18"),
    ]
    return good, bad


def test_jsonl_mixed_corpus_every_case(tmp_path):
    path = tmp_path / "mixed.jsonl"
    expected_good, expected_bad = _mixed_corpus(path)
    lines = path.read_bytes().split(b"\n")
    source = SourceConfig(format="jsonl", path=str(path), fields=FIELDS, default_acl=["public"])

    docs, rejected = _split(iter_documents(source, str(path)))

    _check_contracts(docs, rejected)
    assert len(docs) == len(expected_good) == 6
    assert len(rejected) == len(expected_bad) == 12
    for got, want in zip(docs, expected_good):
        assert got == want, got["doc_id"]
    assert [(r.source, r.reason, r.doc_id) for r in rejected] == [
        (f"{path}:{n}", reason, doc_id) for n, reason, doc_id in expected_bad]
    by_line = {int(r.source.rsplit(":", 1)[1]): r for r in rejected}
    for n, r in by_line.items():  # the raw record is kept whole
        if r.reason == "invalid_utf8":
            assert r.record == lines[n - 1].decode("utf-8", errors="backslashreplace")
            assert "\\xff\\xfe" in r.record
        else:
            assert r.record == lines[n - 1].decode("utf-8")
        assert r.detail
    assert "different content" in by_line[6].detail and "same content" in by_line[7].detail
    assert "'body' is int" in by_line[9].detail and "'id' is empty" in by_line[5].detail


def test_missing_or_empty_acl_gets_the_default_and_blank_tags_are_quarantined(tmp_path):
    # An empty list once meant "public" even with a default_acl: a restricted corpus leaked.
    path = tmp_path / "acl.jsonl"
    records = [
        {"id": "none", "body": "no acl field"},
        {"id": "null", "body": "null acl", "groups": None},
        {"id": "empty-list", "body": "empty list", "groups": []},
        {"id": "set", "body": "own tags", "groups": ["a", "b"]},
        {"id": "one", "body": "one tag as a string", "groups": "a"},
        {"id": "empty-str", "body": "empty string", "groups": ""},
        {"id": "blank-str", "body": "whitespace only", "groups": "  "},
        {"id": "blank-tag", "body": "one blank tag", "groups": ["a", ""]},
    ]
    path.write_bytes(b"".join(_line(r) + b"\n" for r in records))
    source = SourceConfig(format="jsonl", path=str(path), fields=FIELDS, default_acl=["staff"])

    docs, rejected = _split(iter_documents(source, str(path)))

    _check_contracts(docs, rejected)
    assert [(d["doc_id"], d["acl"]) for d in docs] == [
        ("none", ["staff"]), ("null", ["staff"]), ("empty-list", ["staff"]), ("set", ["a", "b"]), ("one", ["a"])]
    assert [(r.doc_id, r.reason) for r in rejected] == [
        ("empty-str", "bad_acl"), ("blank-str", "bad_acl"), ("blank-tag", "bad_acl")]
    assert all("blank" in r.detail for r in rejected)


def test_parquet_empty_acl_list_gets_the_default(tmp_path):
    pq.write_table(pa.table({"pid": ["e", "g", "x"], "content": ["t1", "t2", "t3"],
                             "who": [[], ["g1"], ["g1", " "]]}), tmp_path / "a.parquet")
    fields = FieldMap(id="pid", title=None, text="content", acl="who")
    source = SourceConfig(format="parquet", path=".", fields=fields, default_acl=["pub"])
    docs, rejected = _split(iter_documents(source, str(tmp_path)))
    assert [(d["doc_id"], d["acl"]) for d in docs] == [("e", ["pub"]), ("g", ["g1"])]
    assert [(r.doc_id, r.reason) for r in rejected] == [("x", "bad_acl")]


def test_five_megabyte_document_comes_through_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(_line({"_id": "big", "title": "", "text": BIG_TEXT}) + b"\n")
    docs, rejected = _split(iter_documents(SourceConfig(format="jsonl", path=str(path)), str(path)))
    assert rejected == [] and len(docs) == 1
    assert len(docs[0]["text"]) == 5 * 1024 * 1024 and docs[0]["text"] == BIG_TEXT


def test_jsonl_directory_gzip_bom_and_default_fields(tmp_path):
    (tmp_path / "part-b").mkdir()
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + _line({"_id": 7, "title": "T", "text": "x"}) + b"\n")
    (tmp_path / "part-b" / "b.jsonl.gz").write_bytes(gzip.compress(_line({"_id": "g", "text": "zipped"})))
    (tmp_path / "ignored.json").write_bytes(_line({"_id": "no", "text": "not jsonl"}))
    source = SourceConfig(format="jsonl", path=str(tmp_path), default_acl=["everyone"])
    docs, rejected = _split(iter_documents(source, str(tmp_path)))
    assert rejected == []
    assert [(d["doc_id"], d["title"], d["text"], d["acl"]) for d in docs] == [
        ("7", "T", "x", ["everyone"]), ("g", "", "zipped", ["everyone"])]
    assert docs[1]["source"] == f"{tmp_path / 'part-b' / 'b.jsonl.gz'}:1"


def test_duplicate_ids_across_files(tmp_path):
    (tmp_path / "1.jsonl").write_bytes(_line({"_id": "x", "text": "first"}))
    (tmp_path / "2.jsonl").write_bytes(_line({"_id": "x", "text": "second"}))
    docs, rejected = _split(iter_documents(SourceConfig(format="jsonl", path="."), str(tmp_path)))
    assert [d["text"] for d in docs] == ["first"]
    assert [(r.reason, r.doc_id, r.source) for r in rejected] == [
        ("duplicate_id", "x", f"{tmp_path / '2.jsonl'}:1")]


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_documents(SourceConfig(format="jsonl", path="x"), str(tmp_path / "absent")))
    with pytest.raises(FileNotFoundError, match=r"no files matching \*\.jsonl"):
        list(iter_documents(SourceConfig(format="jsonl", path="x"), str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="BEIR corpus not found"):
        list(iter_documents(SourceConfig(format="beir", path="x"), str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# BEIR
# ----------------------------------------------------------------------------------------------


def _beir_dir(root: Path) -> None:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_bytes(b"\n".join([
        _line({"_id": "d1", "title": "First", "text": "alpha", "metadata": {"url": "u1"}, "year": 2001}),
        _line({"_id": "d2", "title": "", "text": "beta", "metadata": {}}),
        b"not json",
    ]) + b"\n")
    (root / "queries.jsonl").write_bytes(b"\n".join([
        _line({"_id": "q1", "text": "what is alpha", "metadata": {}}), _line({"_id": 2, "text": "beta?"})]))
    (root / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n2\td2\t2\n")


def test_beir_corpus_queries_qrels(tmp_path):
    _beir_dir(tmp_path)
    docs, rejected = _split(iter_documents(SourceConfig(format="beir", path="."), str(tmp_path)))
    _check_contracts(docs, rejected)
    assert [(d["doc_id"], d["title"], d["text"]) for d in docs] == [("d1", "First", "alpha"), ("d2", "", "beta")]
    assert json.loads(docs[0]["metadata"]) == {"url": "u1", "year": 2001}  # nested metadata merged
    assert docs[1]["metadata"] == "{}"
    assert [(r.reason, r.record) for r in rejected] == [("malformed_json", "not json")]
    assert read_queries(str(tmp_path)) == {"q1": "what is alpha", "2": "beta?"}
    assert read_qrels(str(tmp_path), "test") == {"q1": {"d1": 1, "d2": 0}, "2": {"d2": 2}}
    (tmp_path / "qrels" / "bad.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: malformed qrels line"):
        read_qrels(str(tmp_path), "bad")


def test_beir_on_s3(s3_server, s3_bucket, tmp_path):
    ep = s3_server["endpoint_url"]
    _beir_dir(tmp_path)
    client = boto3.client("s3", endpoint_url=ep)
    for f in ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"]:
        client.put_object(Bucket=s3_bucket, Key=f"beir/{f}", Body=(tmp_path / f).read_bytes())
    uri = f"s3://{s3_bucket}/beir"
    source = SourceConfig(format="beir", path=uri, s3_endpoint_url=ep)
    docs, rejected = _split(iter_documents(source, uri))
    assert [d["doc_id"] for d in docs] == ["d1", "d2"] and len(rejected) == 1
    assert docs[0]["source"] == f"{uri}/corpus.jsonl:1"
    assert read_queries(uri, endpoint_url=ep) == {"q1": "what is alpha", "2": "beta?"}
    assert read_qrels(uri, "test", endpoint_url=ep)["q1"] == {"d1": 1, "d2": 0}


def test_scifact_extraction(scifact_dir):
    uri = str(scifact_dir)
    start = time.perf_counter()
    docs, rejected = _split(iter_documents(SourceConfig(format="beir", path=uri), uri))
    elapsed = time.perf_counter() - start
    assert len(docs) == 5183 and rejected == []
    assert len({d["doc_id"] for d in docs}) == 5183
    assert all(d["text"] and d["acl"] == [] for d in docs)
    print(f"SciFact extraction took {elapsed:.2f}s")  # a figure, not an assertion: machines are noisy
    _check_contracts(docs[:200], rejected)
    queries = read_queries(uri)
    assert len(queries) == 1109
    test = read_qrels(uri, "test")
    assert len(test) == 300 and sum(len(v) for v in test.values()) == 339
    assert set(test) <= set(queries)
    assert {d for v in test.values() for d in v} <= {d["doc_id"] for d in docs}


# ----------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------


def test_parquet_batches_mapping_and_rejects(tmp_path):
    n = 2500  # crosses the 1024-row batch boundary twice
    ids = [f"p{i}" if i not in (5, 1500) else None for i in range(n)]
    texts = [f"text {i}" if i != 2049 else None for i in range(n)]
    table = pa.table({
        "pid": ids,
        "headline": [f"H{i}" for i in range(n)],
        "content": texts,
        "who": [["g1"] if i % 2 else None for i in range(n)],
        "lang": ["en"] * n,
        "extra_blob": ["unmapped"] * n,
    })
    (tmp_path / "nested").mkdir()
    pq.write_table(table.slice(0, 2000), tmp_path / "a.parquet", row_group_size=700)
    pq.write_table(table.slice(2000), tmp_path / "nested" / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet at all")
    fields = FieldMap(id="pid", title="headline", text="content", acl="who", metadata=["lang", "absent"])
    source = SourceConfig(format="parquet", path=".", fields=fields, default_acl=["pub"])

    docs, rejected = _split(iter_documents(source, str(tmp_path)))

    _check_contracts(docs, rejected)
    assert len(docs) == n - 3
    assert docs[0] == {"doc_id": "p0", "title": "H0", "text": "text 0", "source": f"{tmp_path / 'a.parquet'}#row=0",
                       "metadata": '{"lang": "en"}', "acl": ["pub"], "content_hash": content_hash("H0", "text 0")}
    assert docs[1]["acl"] == ["g1"]
    assert [(r.reason, r.source.rsplit("/", 1)[1]) for r in rejected] == [
        ("missing_id", "a.parquet#row=5"), ("missing_id", "a.parquet#row=1500"),
        ("unreadable_file", "c.parquet"), ("missing_text", "b.parquet#row=49")]
    assert json.loads(rejected[0].record) == {"pid": None, "headline": "H5", "content": "text 5",
                                              "who": ["g1"], "lang": "en", "extra_blob": "unmapped"}
    assert rejected[3].doc_id == "p2049"


def test_parquet_on_s3(s3_server, s3_bucket, tmp_path):
    ep = s3_server["endpoint_url"]
    pq.write_table(pa.table({"_id": [1, 2], "title": ["a", None], "text": ["x", "y"]}), tmp_path / "t.parquet")
    boto3.client("s3", endpoint_url=ep).put_object(
        Bucket=s3_bucket, Key="pq/t.parquet", Body=(tmp_path / "t.parquet").read_bytes())
    uri = f"s3://{s3_bucket}/pq"
    docs, rejected = _split(iter_documents(SourceConfig(format="parquet", path=uri, s3_endpoint_url=ep), uri))
    assert rejected == []
    assert [(d["doc_id"], d["title"], d["text"]) for d in docs] == [("1", "a", "x"), ("2", "", "y")]


# ----------------------------------------------------------------------------------------------
# Directory of documents
# ----------------------------------------------------------------------------------------------


def _doc_tree(root: Path) -> None:
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "a.txt").write_text("Short title\n\nThe body of note a.\nSecond line.\n")
    (root / "readme.md").write_text("# Project Readme\n\nSome *markdown* body.\n")
    (root / "long.txt").write_text("This first line is a long sentence that goes on and on, well past any "
                                   "reasonable title length, so it is prose.\nMore prose.\n")
    (root / "page.html").write_bytes(HTML_PAGE)
    (root / "paper.pdf").write_bytes(_pdf(["Hello from page one", "And page two"], title="A Study of Things"))
    (root / "untitled.pdf").write_bytes(_pdf(["Only text"]))
    (root / "blank.pdf").write_bytes(_pdf(["", ""], title="Scanned"))
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\n this is not a pdf body at all \x00\x01")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "data.csv").write_text("not,included\n")


def test_dir_reader_all_formats(tmp_path):
    _doc_tree(tmp_path)
    source = SourceConfig(format="dir", path=".", default_acl=["staff"])
    docs, rejected = _split(iter_documents(source, str(tmp_path)))
    _check_contracts(docs, rejected)
    by_id = {d["doc_id"]: d for d in docs}
    assert sorted(by_id) == ["long.txt", "notes/a.txt", "page.html", "paper.pdf", "readme.md", "untitled.pdf"]

    assert (by_id["notes/a.txt"]["title"], by_id["notes/a.txt"]["text"]) == (
        "Short title", "The body of note a.\nSecond line.\n")
    assert by_id["notes/a.txt"]["source"] == str(tmp_path / "notes" / "a.txt")
    assert json.loads(by_id["notes/a.txt"]["metadata"]) == {"path": "notes/a.txt", "format": "txt"}
    assert (by_id["readme.md"]["title"], by_id["readme.md"]["text"]) == ("Project Readme", "Some *markdown* body.\n")
    assert by_id["long.txt"]["title"] == "long" and by_id["long.txt"]["text"].startswith("This first line")

    page = by_id["page.html"]
    assert page["title"] == "Cell Biology Notes"
    assert "powerhouse of the cell" in page["text"] and "messenger RNA" in page["text"]
    for boilerplate in ["About us", "Shop now", "Copyright", "Privacy policy"]:
        assert boilerplate not in page["text"]

    paper = by_id["paper.pdf"]
    assert paper["title"] == "A Study of Things"
    assert "Hello from page one" in paper["text"] and "And page two" in paper["text"]
    assert json.loads(paper["metadata"]) == {"path": "paper.pdf", "format": "pdf", "pages": 2}
    assert by_id["untitled.pdf"]["title"] == "untitled"
    assert all(d["acl"] == ["staff"] for d in docs)

    assert sorted((r.doc_id, r.reason) for r in rejected) == [
        ("blank.pdf", "no_text"), ("corrupt.pdf", "unreadable_file"), ("latin1.txt", "invalid_utf8")]
    latin = next(r for r in rejected if r.reason == "invalid_utf8")
    assert latin.record == "caf\\xe9 au lait\n" and latin.source == str(tmp_path / "latin1.txt")

    only_md = SourceConfig(format="dir", path=".", include=["*.md"])
    assert [d["doc_id"] for d in iter_documents(only_md, str(tmp_path))] == ["readme.md"]


@contextmanager
def _unprivileged():
    """Drop to the 'nobody' user for the block when running as root (root ignores file modes)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_file_is_quarantined_and_run_goes_on():
    # Not tmp_path: pytest's root-owned base dir is 0700 and the unprivileged user must enter it.
    root = Path(tempfile.mkdtemp(prefix="cf-perm-"))
    try:
        root.chmod(0o755)
        (root / "a.txt").write_text("Readable\n\nbody a\n")
        (root / "b.txt").write_text("secret\n")
        (root / "c.md").write_text("# C\n\nbody c\n")
        for p in root.iterdir():
            p.chmod(0o644)
        (root / "b.txt").chmod(0o000)
        with _unprivileged():
            items = list(iter_documents(SourceConfig(format="dir", path="."), str(root)))
    finally:
        shutil.rmtree(root)
    docs, rejected = _split(items)
    assert [d["doc_id"] for d in docs] == ["a.txt", "c.md"]
    assert [(r.reason, r.doc_id, r.source) for r in rejected] == [("unreadable_file", "b.txt", str(root / "b.txt"))]
    assert "ermission denied" in rejected[0].detail


def test_dir_on_s3(s3_server, s3_bucket):
    ep = s3_server["endpoint_url"]
    client = boto3.client("s3", endpoint_url=ep)
    client.put_object(Bucket=s3_bucket, Key="docs/x/one.md", Body=b"# One\n\nbody one\n")
    client.put_object(Bucket=s3_bucket, Key="docs/two.pdf", Body=_pdf(["Two on S3"], title="Two"))
    uri = f"s3://{s3_bucket}/docs"
    docs, rejected = _split(iter_documents(SourceConfig(format="dir", path=uri, s3_endpoint_url=ep), uri))
    assert rejected == []
    assert [(d["doc_id"], d["title"], d["source"]) for d in docs] == [
        ("two.pdf", "Two", f"{uri}/two.pdf"), ("x/one.md", "One", f"{uri}/x/one.md")]
    assert "Two on S3" in docs[0]["text"]


@pytest.mark.parametrize("text,title,body", [
    ("# Heading #\n\nbody\n", "Heading", "body\n"),
    ("Title\n=====\nbody\n", "Title", "body\n"),
    ("\n\nShort\n\nbody\n", "Short", "body\n"),
    ("Short but wrapped\ncontinues here\n", "stem", "Short but wrapped\ncontinues here\n"),
    ("intro text\n\n## Later heading\nmore\n", "intro text", "## Later heading\nmore\n"),
    ("a long first line " * 10 + "\n\n# Later heading\n", "Later heading", "a long first line " * 10 + "\n\n# Later heading\n"),
    ("# Only a heading\n", "Only a heading", "# Only a heading\n"),
    ("", "stem", ""),
])
def test_split_title(text, title, body):
    assert split_title(text, "stem") == (title, body)
