"""Data contracts: every suite passes on good data and fails, naming why, on broken data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from corpusforge.data import contracts
from corpusforge.data import datasets
from corpusforge.encoding import models
from corpusforge.text.chunk import Chunker
from corpusforge.data.contracts import ContractError, enforce, validate
from corpusforge.data.hashing import chunk_id, content_hash
from corpusforge.data.schemas import CHUNKS, DOCUMENTS, QUARANTINE, Rejected, embeddings_schema
from corpusforge.spec import ChunkConfig

SUITE_DIR = Path(__file__).resolve().parents[2] / "schemas" / "expectations"


@pytest.fixture(scope="module")
def documents(scifact_dir) -> pa.Table:
    rows = []
    with open(scifact_dir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            rows.append({"doc_id": d["_id"], "title": d["title"], "text": d["text"], "source": "scifact",
                         "metadata": "{}", "acl": [], "content_hash": content_hash(d["title"], d["text"])})
    return pa.Table.from_pylist(rows, schema=DOCUMENTS)


@pytest.fixture(scope="module")
def chunks(documents) -> pa.Table:
    chunker = Chunker(ChunkConfig(max_tokens=128, overlap_tokens=16), models.load_tokenizer("default"))
    rows = list(chunker.chunk_many(documents.slice(0, 300).to_pylist()))
    return pa.Table.from_pylist(rows, schema=CHUNKS)


def with_rows(table: pa.Table, edit, schema: pa.Schema | None = None) -> pa.Table:
    """A copy of `table` with `edit(rows)` applied to its rows as dicts."""
    rows = table.to_pylist()
    edit(rows)
    return pa.Table.from_pylist(rows, schema=schema or table.schema)


def failed(report) -> set[tuple[str, str]]:
    out = set()
    for r in report.failures:
        out.add((r.expectation, r.kwargs.get("column") or r.kwargs.get("column_A") or str(r.kwargs)))
    return out


def test_suite_files_are_generated_from_the_code():
    assert sorted(p.stem for p in SUITE_DIR.glob("*.json")) == sorted(contracts.SUITES)
    for name in contracts.SUITES:
        on_disk = json.loads((SUITE_DIR / f"{name}.json").read_text())
        assert on_disk == json.loads(json.dumps(contracts.suite_json(name), sort_keys=True)), (
            f"schemas/expectations/{name}.json is stale: run python -m corpusforge.data.contracts")
        assert len(on_disk["expectations"]) == len(contracts.SUITES[name])


# ------------------------------------------------------------------------------ documents


def test_documents_contract_holds_on_scifact(documents):
    report = enforce("documents_clean", documents)
    assert report.success and report.rows == 5183 and not report.skipped
    assert {r.expectation for r in report.results} >= {"expect_column_values_to_be_unique",
                                                        "expect_column_values_to_match_regex"}


def test_documents_contract_names_duplicates_and_empty_texts(documents):
    small = documents.slice(0, 50)

    def breakage(rows):
        rows[1]["doc_id"] = rows[0]["doc_id"]
        rows[2]["text"] = "   "
        rows[3]["content_hash"] = "not-a-hash"

    with pytest.raises(ContractError) as err:
        enforce("documents_clean", with_rows(small, breakage))
    message = str(err.value)
    first_id = small.column("doc_id")[0].as_py()
    assert "contract 'documents_clean'" in message and "3 of 5 expectations failed" in message
    assert "expect_column_values_to_be_unique(column=doc_id)" in message and first_id in message
    assert "column=text_len" in message and "no empty documents" in message
    assert "not-a-hash" in message
    assert failed(err.value.report) == {
        ("expect_column_values_to_be_unique", "doc_id"),
        ("expect_column_values_to_be_between", "text_len"),
        ("expect_column_values_to_match_regex", "content_hash"),
    }


def test_extracted_documents_may_still_have_empty_texts(documents):
    def empty(rows):
        rows[0]["text"] = ""

    raw = with_rows(documents.slice(0, 20), empty)
    assert enforce("documents", raw).success
    report = validate("documents_clean", raw)
    assert failed(report) == {("expect_column_values_to_be_between", "text_len")}
    assert report.failures[0].examples == [{"text_len": 0, "doc_id": raw.column("doc_id")[0].as_py()}]


# ------------------------------------------------------------------------------ quarantine


def test_quarantine_contract():
    good = [Rejected("clean", "near_duplicate", "similar to d1", "corpus.jsonl:3", "d3", "{}").as_row(),
            Rejected("extract", "malformed_json", "bad", "corpus.jsonl:9", None, "{").as_row()]
    assert validate("quarantine", pa.Table.from_pylist(good, schema=QUARANTINE)).success
    bad = good + [{**good[0], "reason": "felt_like_it"}, {**good[0], "stage": None}]
    loose = pa.schema([f.with_nullable(True) for f in QUARANTINE])
    report = validate("quarantine", pa.Table.from_pylist(bad, schema=loose))
    assert not report.success
    assert failed(report) == {("expect_column_values_to_be_in_set", "reason"),
                              ("expect_column_values_to_not_be_null", "stage")}
    assert "felt_like_it" in report.describe()


# ------------------------------------------------------------------------------ chunks


def test_chunks_contract_holds_on_real_chunks(chunks, documents):
    report = enforce("chunks", chunks, max_tokens=128, documents=documents)
    assert report.success and not report.skipped
    assert len(report.results) == len(contracts.SUITES["chunks"])


def _duplicate_id(rows):
    rows[4]["chunk_id"] = rows[3]["chunk_id"]


def _empty_text(rows):
    rows[4]["text"] = " \n "


def _over_budget(rows):
    rows[4]["n_tokens"] = 129


def _span_outside(rows):
    rows[4]["char_end"] = 10**7


def _empty_span(rows):
    rows[4]["char_end"] = rows[4]["char_start"]


def _unknown_document(rows):
    rows[4]["doc_id"] = "no-such-doc"
    rows[4]["ordinal"] = 0


@pytest.mark.parametrize("breakage, expectation, column", [
    (_duplicate_id, "expect_column_values_to_be_unique", "chunk_id"),
    (_empty_text, "expect_column_values_to_be_between", "text_len"),
    (_over_budget, "expect_column_values_to_be_between", "n_tokens"),
    (_span_outside, "expect_column_pair_values_a_to_be_greater_than_b", "doc_text_len"),
    (_empty_span, "expect_column_pair_values_a_to_be_greater_than_b", "char_end"),
    (_unknown_document, "expect_column_values_to_not_be_null", "doc_text_len"),
])
def test_chunks_contract_fails_on_broken_rows(chunks, documents, breakage, expectation, column):
    broken = with_rows(chunks, breakage)
    bad_id = broken.column("chunk_id")[4].as_py()
    with pytest.raises(ContractError) as err:
        enforce("chunks", broken, max_tokens=128, documents=documents)
    report = err.value.report
    assert (expectation, column) in failed(report)
    [outcome] = [r for r in report.failures if (r.expectation, r.kwargs.get("column") or
                                                r.kwargs.get("column_A")) == (expectation, column)]
    assert outcome.unexpected_count in (1, 2)
    assert any(isinstance(x, dict) and x.get("chunk_id") == bad_id for x in outcome.examples)
    assert "contract 'chunks'" in str(err.value) and expectation in str(err.value) and bad_id in str(err.value)


def test_chunks_contract_reads_documents_from_a_dataset(chunks, documents, tmp_path):
    path = tmp_path / "documents_clean"
    with datasets.DatasetWriter(path, DOCUMENTS) as writer:
        writer.write_table(documents.slice(0, 300))
        writer.commit()
    assert validate("chunks", chunks, max_tokens=128, documents=path).success
    lengths = {d: len(t) for d, t in zip(documents.column("doc_id").to_pylist(),
                                         documents.column("text").to_pylist())}
    assert validate("chunks", chunks, max_tokens=128, documents=lengths).success
    short = with_rows(chunks, _span_outside)
    assert not validate("chunks", short, max_tokens=128, documents=path).success


def test_chunks_contract_without_documents_reports_what_it_skipped(chunks):
    report = validate("chunks", chunks, max_tokens=128)
    assert report.success and len(report.skipped) == 2
    assert all("documents=" in s for s in report.skipped)
    with pytest.raises(TypeError, match="max_tokens"):
        validate("chunks", chunks)


def test_sliced_validation_finds_duplicates_across_slices(chunks, documents):
    def far_duplicate(rows):
        rows[-1]["chunk_id"] = rows[0]["chunk_id"]

    broken = with_rows(chunks, far_duplicate)
    whole = validate("chunks", broken, max_tokens=128, documents=documents)
    sliced = validate("chunks", broken, max_tokens=128, documents=documents, batch_rows=400)
    assert failed(whole) == failed(sliced) == {("expect_column_values_to_be_unique", "chunk_id")}
    [outcome] = sliced.failures
    assert outcome.examples == [chunks.column("chunk_id")[0].as_py()]
    assert validate("chunks", chunks, max_tokens=128, documents=documents, batch_rows=400).success


def test_sliced_validation_finds_compound_duplicates_across_slices(chunks, documents):
    """(doc_id, ordinal) repeated in the first and the last slice: GE sees each slice alone, so the
    check over the whole dataset must find it (it used to pass when sliced)."""
    def far_compound_duplicate(rows):
        for key in ("doc_id", "ordinal", "char_start", "char_end"):
            rows[-1][key] = rows[0][key]

    broken = with_rows(chunks, far_compound_duplicate)
    whole = validate("chunks", broken, max_tokens=128, documents=documents)
    sliced = validate("chunks", broken, max_tokens=128, documents=documents, batch_rows=400)
    assert failed(whole) == failed(sliced) == {("expect_compound_columns_to_be_unique", "{'column_list': ['doc_id', 'ordinal']}")}
    assert sliced.failures[0].unexpected_count == whole.failures[0].unexpected_count == 2
    first = chunks.slice(0, 1).to_pylist()[0]
    assert sliced.failures[0].examples == [{"doc_id": first["doc_id"], "ordinal": first["ordinal"]}]


def test_uniqueness_is_confirmed_by_value_not_by_hash(chunks):
    """Rows whose key hashes collide are compared by value: with every row a candidate (as if all
    hashes collided) unique ids still pass, and a real duplicate is counted exactly."""
    keys = contracts._UniqueKeys(0, ["chunk_id"])
    every = np.unique(contracts._hash_rows(chunks.select(["chunk_id"])))
    outcome = contracts.ExpectationOutcome("expect_column_values_to_be_unique", {"column": "chunk_id"}, "", True)
    keys.confirm(every, chunks.to_batches(max_chunksize=100), outcome)
    assert (outcome.success, outcome.unexpected_count) == (True, 0)
    ids = chunks.column("chunk_id").to_pylist()
    repeated = pa.table({"chunk_id": ids + ids[:3] + [None, None]})
    keys.confirm(every, repeated.to_batches(max_chunksize=7), outcome)
    assert (outcome.success, outcome.unexpected_count, sorted(outcome.examples)) == (False, 6, sorted(ids[:3]))


def test_validating_a_scifact_sized_chunk_table_is_fast(documents):
    # Two chunks per SciFact document (10,366 rows), built directly: the contract's cost, not
    # the chunker's, is measured here.
    rows = []
    for doc_id, text in zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()):
        half = len(text) // 2
        for i, (a, b) in enumerate([(0, half), (half, len(text))]):
            rows.append({"chunk_id": chunk_id(doc_id, text[a:b]), "doc_id": doc_id, "ordinal": i,
                         "text": text[a:b], "n_tokens": 100, "char_start": a, "char_end": b,
                         "acl": [], "metadata": "{}"})
    table = pa.Table.from_pylist(rows, schema=CHUNKS)
    validate("chunks", table.slice(0, 10), max_tokens=256, documents=documents)  # GE imported
    t0 = time.perf_counter()
    report = validate("chunks", table, max_tokens=256, documents=documents)
    elapsed = time.perf_counter() - t0
    assert report.success and report.rows == 10_366
    print(f"validating {report.rows} chunks took {elapsed:.2f}s")  # a figure, not an assertion: machines are noisy


# ------------------------------------------------------------------------------ embeddings


def _embeddings(n: int = 64, dim: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [f"c{i:04d}" for i in range(n)], vectors


def _table(ids, vectors, dim=8) -> pa.Table:
    flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1))
    return pa.Table.from_arrays([pa.array(ids), pa.FixedSizeListArray.from_arrays(flat, dim)],
                                schema=embeddings_schema(dim))


def test_embeddings_contract_holds_on_unit_vectors():
    ids, vectors = _embeddings()
    report = enforce("embeddings", _table(ids, vectors), normalized=True)
    assert report.success and not report.skipped
    assert {r.kwargs.get("column") for r in report.results} >= {"vector_len", "vector_finite", "vector_norm"}


def test_embeddings_contract_fails_on_broken_vectors():
    ids, vectors = _embeddings()
    vectors[3, 2] = np.nan
    vectors[5] *= 3.0
    ids[7] = ids[6]
    with pytest.raises(ContractError) as err:
        enforce("embeddings", _table(ids, vectors), normalized=True)
    assert failed(err.value.report) == {("expect_column_values_to_be_unique", "chunk_id"),
                                        ("expect_column_values_to_be_in_set", "vector_finite"),
                                        ("expect_column_values_to_be_between", "vector_norm")}
    message = str(err.value)
    assert "contract 'embeddings'" in message and "c0003" in message and "c0005" in message
    # Unnormalised models: the norm check is skipped, and said so.
    report = validate("embeddings", _table(ids, vectors), normalized=False)
    assert ("expect_column_values_to_be_between", "vector_norm") not in failed(report)
    assert any("vector_norm" in s for s in report.skipped)


def test_a_dataset_directory_is_validated_batch_by_batch_as_its_table(chunks, documents, tmp_path):
    """The stages pass the dataset's directory: the contract frame is built per record batch (the
    vectors and texts are never read whole), with the table's outcomes, across batches too."""
    def write(name, table, schema, parts=3):
        with datasets.DatasetWriter(tmp_path / name, schema, rows_per_group=16, rows_per_file=16) as writer:
            step = -(-table.num_rows // parts)
            for lo in range(0, table.num_rows, step):
                writer.write_table(table.slice(lo, step))
            writer.commit()
        assert len(list((tmp_path / name).glob("part-*.parquet"))) >= 3  # several batches
        return tmp_path / name

    def far_duplicate(rows):
        rows[-1]["chunk_id"] = rows[0]["chunk_id"]

    docs = write("documents_clean", documents.slice(0, 300), DOCUMENTS)
    for table in (chunks, with_rows(chunks, far_duplicate), with_rows(chunks, _span_outside)):
        expected = validate("chunks", table, max_tokens=128, documents=documents.slice(0, 300))
        got = validate("chunks", write(f"chunks-{len(list(tmp_path.iterdir()))}", table, CHUNKS),
                       max_tokens=128, documents=docs)
        assert (got.success, failed(got), got.rows) == (expected.success, failed(expected), expected.rows)
    ids, vectors = _embeddings()
    vectors[3, 2] = np.nan
    ids[-1] = ids[0]
    table = _table(ids, vectors)
    expected = validate("embeddings", table, normalized=True)
    got = validate("embeddings", write("embeddings", table, table.schema), normalized=True)
    assert not got.success and failed(got) == failed(expected)
    assert {("expect_column_values_to_be_unique", "chunk_id"),  # the two ids lie in different files
            ("expect_column_values_to_be_in_set", "vector_finite")} <= failed(got)


def test_embeddings_contract_checks_the_dimension():
    ids, vectors = _embeddings(n=4)
    ragged = pa.table({"chunk_id": ids, "vector": [v.tolist() for v in vectors[:3]] + [vectors[3, :5].tolist()]})
    report = validate("embeddings", ragged, dim=8, normalized=False)
    assert failed(report) == {("expect_column_values_to_be_between", "vector_len")}
    assert report.failures[0].examples == [{"vector_len": 5, "chunk_id": "c0003"}]
    assert not validate("embeddings", _table(ids, vectors), dim=16).success
    with pytest.raises(TypeError, match="dim"):
        validate("embeddings", ragged)


def test_unknown_dataset_and_missing_columns_are_clear_errors(chunks):
    with pytest.raises(KeyError, match="no contract for dataset 'vectors'"):
        validate("vectors", chunks)
    with pytest.raises(ValueError, match="has no column"):
        validate("chunks", chunks.drop(["n_tokens"]), max_tokens=128)
