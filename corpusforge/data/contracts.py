"""Data contracts between stages: Great Expectations suites checked on every dataset written.

The suites are defined here, once, as plain data (`SUITES`); ``python -m corpusforge.data.contracts``
writes them as Great Expectations suite JSON to ``schemas/expectations/<dataset>.json`` so the
contracts can be read (and diffed in review) without Python, and a test keeps the files in step.

Great Expectations validates a small pandas frame of *contract columns*, not the dataset itself:
the columns the expectations name, plus a few derived in Arrow first (text lengths instead of the
texts, the length of the document a chunk points into, vector lengths, finiteness and norms).
GE's import (~5 s) is paid lazily, only when a contract is first checked. A dataset (a table, or
a dataset directory as the stages pass it) is read batch by batch into that frame and validated
in slices of ``batch_rows`` rows, so neither texts, vectors nor the whole frame are ever held:
memory is bounded by the slice. Uniqueness across slices is decided over the whole dataset from
8-byte key hashes, confirmed by value (`_UniqueKeys`).

Usage::

    report = validate("chunks", table, max_tokens=256, documents=documents_table)
    enforce("chunks", table, max_tokens=256, documents=documents_table)   # raises ContractError
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Quarantine reason codes the stages emit (extract, clean). A new code is a contract change.
QUARANTINE_REASONS: tuple[str, ...] = (
    # extract (bad_acl: clean too)
    "malformed_json", "invalid_utf8", "missing_id", "missing_text", "invalid_acl", "bad_acl", "duplicate_id",
    "unreadable_file", "no_text",
    # clean
    "invalid_record", "duplicate_doc_id", "empty_text", "too_short", "too_long", "exact_duplicate",
    "near_duplicate",
)
QUARANTINE_STAGES: tuple[str, ...] = ("extract", "clean", "chunk", "embed")
NORM_TOLERANCE = 1e-3
EXAMPLES = 5
_SUITE_DIR = Path(__file__).resolve().parents[2] / "schemas" / "expectations"


def _e(kind: str, note: str, **kwargs: Any) -> dict:
    """One expectation as plain data: GE type, kwargs, and a note on what it guards."""
    return {"type": kind, "kwargs": kwargs, "meta": {"notes": note}}


# The contracts. Derived columns (documented in each note) are computed by `_contract_frame`.
# {"$PARAMETER": name} values are bound at validation time (GE suite parameters).
SUITES: dict[str, list[dict]] = {
    # Extracted documents: empty texts may still be here (clean quarantines them).
    "documents": [
        _e("expect_column_values_to_not_be_null", "every document has an id", column="doc_id"),
        _e("expect_column_values_to_be_unique", "document ids are unique", column="doc_id"),
        _e("expect_column_values_to_not_be_null", "every document has a content hash",
           column="content_hash"),
        _e("expect_column_values_to_match_regex", "content_hash is a hex sha256",
           column="content_hash", regex=r"^[0-9a-f]{64}$"),
    ],

    "quarantine": [
        _e("expect_column_values_to_not_be_null", "every record names its stage", column="stage"),
        _e("expect_column_values_to_be_in_set", "stage is a pipeline stage", column="stage",
           value_set=list(QUARANTINE_STAGES)),
        _e("expect_column_values_to_not_be_null", "every record has a reason", column="reason"),
        _e("expect_column_values_to_be_in_set", "reason is a known code (contracts.QUARANTINE_REASONS)",
           column="reason", value_set=list(QUARANTINE_REASONS)),
    ],
    "chunks": [
        _e("expect_column_values_to_not_be_null", "every chunk has an id", column="chunk_id"),
        _e("expect_column_values_to_be_unique", "chunk ids are unique", column="chunk_id"),
        _e("expect_column_values_to_not_be_null", "every chunk names its document", column="doc_id"),
        _e("expect_compound_columns_to_be_unique", "one chunk per (document, ordinal)",
           column_list=["doc_id", "ordinal"]),
        _e("expect_column_values_to_be_between",
           "text_len = characters of text without surrounding whitespace: no empty chunks",
           column="text_len", min_value=1),
        _e("expect_column_values_to_be_between", "token count within the model's window",
           column="n_tokens", min_value=1, max_value={"$PARAMETER": "max_tokens"}),
        _e("expect_column_values_to_be_between", "span starts inside the document",
           column="char_start", min_value=0),
        _e("expect_column_pair_values_a_to_be_greater_than_b", "spans are not empty",
           column_A="char_end", column_B="char_start"),
        _e("expect_column_values_to_not_be_null",
           "doc_text_len = length of the chunk's document text (joined from documents): "
           "the document exists", column="doc_text_len"),
        _e("expect_column_pair_values_a_to_be_greater_than_b", "span ends inside the document",
           column_A="doc_text_len", column_B="char_end", or_equal=True),
    ],
    "embeddings": [
        _e("expect_column_values_to_not_be_null", "every vector has a chunk id", column="chunk_id"),
        _e("expect_column_values_to_be_unique", "one vector per chunk", column="chunk_id"),
        _e("expect_column_values_to_be_between", "vector_len = number of components: equals dim",
           column="vector_len", min_value={"$PARAMETER": "dim"}, max_value={"$PARAMETER": "dim"}),
        _e("expect_column_values_to_be_in_set", "vector_finite = no NaN or infinite component",
           column="vector_finite", value_set=[True]),
        _e("expect_column_values_to_be_between",
           "vector_norm = L2 norm: 1 within tolerance when the model normalises",
           column="vector_norm", min_value={"$PARAMETER": "norm_min"},
           max_value={"$PARAMETER": "norm_max"}),
    ],
}
# Cleaned documents: as extracted documents, and every text has something to chunk.
SUITES["documents_clean"] = [
    *SUITES["documents"],
    _e("expect_column_values_to_be_between",
       "text_len = characters of text without surrounding whitespace: no empty documents",
       column="text_len", min_value=1),
]
# Training data (the mine stage): judged pairs and mined negatives of the TRAINING queries only.
SUITES["training_pairs"] = [
    _e("expect_column_values_to_not_be_null", "every pair names its query", column="query_id"),
    _e("expect_column_values_to_not_be_null", "every pair names its positive document", column="doc_id"),
    _e("expect_compound_columns_to_be_unique", "one row per (query, positive)", column_list=["query_id", "doc_id"]),
    _e("expect_column_values_to_be_in_set", "pairs come from the train split (dev is held out)",
       column="split", value_set=["train", "dev"]),
]
SUITES["hard_negatives"] = [
    _e("expect_column_values_to_not_be_null", "every negative names its query", column="query_id"),
    _e("expect_column_values_to_not_be_null", "every negative names its document", column="doc_id"),
    _e("expect_compound_columns_to_be_unique", "a document is mined once per query",
       column_list=["query_id", "doc_id"]),
    _e("expect_column_values_to_be_in_set", "source is bm25 or dense", column="source", value_set=["bm25", "dense"]),
    _e("expect_column_values_to_be_between", "ranks are 1-based", column="rank", min_value=1),
    _e("expect_column_pair_values_a_to_be_greater_than_b",
       "margin filter: a negative scores no higher than the query's best positive",
       column_A="positive_score", column_B="score", or_equal=True),
]
ID_COLUMNS = {"documents": "doc_id", "documents_clean": "doc_id", "chunks": "chunk_id", "embeddings": "chunk_id",
              "quarantine": None, "training_pairs": None, "hard_negatives": None}
# Expectations that need a parameter the caller may not have: skipped (and reported) without it.
_OPTIONAL = {("chunks", "doc_text_len"): "documents", ("embeddings", "vector_norm"): "normalized"}


class ContractError(ValueError):
    """A dataset broke its contract. The message names the dataset, each failed expectation and
    up to five failing values or rows; `report` holds everything."""

    def __init__(self, report: "ContractReport"):
        self.report = report
        super().__init__(report.describe())


@dataclass
class ExpectationOutcome:
    """The result of one expectation on one dataset.

    Attributes:
        expectation: the GE expectation type, e.g. ``expect_column_values_to_be_unique``.
        kwargs: its arguments with parameters bound (column names, bounds, ...).
        note: what it guards, in words.
        success: whether it held.
        unexpected_count: failing rows (``None`` for table-level expectations).
        examples: up to five failing values or rows (with their id column when there is one).
        error: an exception GE raised while evaluating it, if any.
    """

    expectation: str
    kwargs: dict
    note: str
    success: bool
    unexpected_count: int | None = None
    examples: list = field(default_factory=list)
    error: str | None = None

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        line = f"{self.expectation}({args})"
        if self.error:
            return f"{line}: error: {self.error}"
        what = f"{self.unexpected_count} failing rows" if self.unexpected_count is not None else "failed"
        return f"{line} [{self.note}]: {what}; examples: {self.examples[:EXAMPLES]}"


@dataclass
class ContractReport:
    """What a contract check found.

    Attributes:
        dataset: the dataset name (documents, documents_clean, quarantine, chunks, embeddings).
        success: every expectation held.
        rows: rows checked.
        results: one `ExpectationOutcome` per expectation evaluated.
        skipped: expectations not evaluated for lack of a parameter, with why.
        seconds: validation time (GE import excluded).
    """

    dataset: str
    success: bool
    rows: int
    results: list[ExpectationOutcome]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    def describe(self) -> str:
        """A human-readable summary naming every failed expectation with examples."""
        head = (f"contract {self.dataset!r}: {len(self.failures)} of {len(self.results)} "
                f"expectations failed on {self.rows} rows")
        if self.success:
            head = f"contract {self.dataset!r}: all {len(self.results)} expectations hold on {self.rows} rows"
        return "\n".join([head, *(f"  - {r.describe()}" for r in self.failures)])

    def as_dict(self) -> dict:
        """The report as JSON-serialisable data (for manifests and run summaries)."""
        return {
            "dataset": self.dataset, "success": self.success, "rows": self.rows,
            "seconds": round(self.seconds, 3), "skipped": self.skipped,
            "results": [{"expectation": r.expectation, "kwargs": r.kwargs, "success": r.success,
                         "unexpected_count": r.unexpected_count,
                         "examples": json.loads(json.dumps(r.examples, default=str)), "error": r.error}
                        for r in self.results],
        }


# ------------------------------------------------------------------------------ GE plumbing

_GE: dict[str, Any] = {}


def _ge():
    """Great Expectations, imported once and lazily (the import alone takes seconds)."""
    if not _GE:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = context.data_sources.add_pandas("corpusforge")
        _GE.update(gx=gx, context=context, batch=source.add_dataframe_asset("contract_frame")
                   .add_batch_definition_whole_dataframe("whole"))
    return _GE


def suite_json(dataset: str) -> dict:
    """The GE suite of a dataset as JSON data (what ``schemas/expectations/<dataset>.json`` holds).

    Args:
        dataset: one of `SUITES`.

    Returns:
        The suite as GE serialises it (``name``, ``expectations`` with ``type``/``kwargs``/``meta``).
    """
    suite = _suite(dataset, SUITES[dataset])
    data = suite.to_json_dict()
    data.pop("id", None)
    data["meta"] = {"generated_by": "python -m corpusforge.data.contracts",
                    "great_expectations_version": data.get("meta", {}).get("great_expectations_version")}
    return data


def write_suite_files(out_dir: str | Path = _SUITE_DIR) -> list[Path]:
    """Write ``<dataset>.json`` for every suite into `out_dir`.

    Args:
        out_dir: the folder (default: the repository's ``schemas/expectations``).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SUITES:
        path = out / f"{name}.json"
        path.write_text(json.dumps(suite_json(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def _suite(dataset: str, expectations: list[dict]):
    gx = _ge()["gx"]
    return gx.ExpectationSuite(name=dataset, expectations=[dict(e) for e in expectations])


# ------------------------------------------------------------------------------ contract frames


def _text_len(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.utf8_length(pc.utf8_trim_whitespace(column))


def _doc_lengths(documents: Any):
    """doc_id -> text length (a polars frame, one row per id), from a documents table, a dataset
    directory or a mapping. Held for the whole check: about 30 bytes a document, never the texts."""
    import polars as pl

    if isinstance(documents, (str, Path)):  # streamed: the lengths, never the texts, of the whole corpus
        from corpusforge.data import datasets

        parts = [pa.table({"doc_id": pc.cast(b.column("doc_id"), pa.string()),
                           "doc_text_len": pc.cast(pc.utf8_length(b.column("text")), pa.int64())})
                 for b in datasets.iter_batches(documents, columns=["doc_id", "text"])]
        lengths = pa.concat_tables(parts) if parts else pa.table(
            {"doc_id": pa.array([], pa.string()), "doc_text_len": pa.array([], pa.int64())})
    elif isinstance(documents, Mapping):
        lengths = pa.table({"doc_id": pa.array(list(documents), pa.string()),
                            "doc_text_len": pa.array(list(documents.values()), pa.int64())})
    elif isinstance(documents, pa.Table):
        lengths = pa.table({"doc_id": pc.cast(documents.column("doc_id"), pa.string()),
                            "doc_text_len": pc.cast(pc.utf8_length(documents.column("text")), pa.int64())})
    else:
        raise TypeError(f"documents must be a pyarrow.Table, a dataset path or a mapping doc_id -> "
                        f"text length, not {type(documents).__name__}")
    # One row per id, so the join never multiplies chunks (duplicate ids are the documents
    # contract's business).
    return pl.from_arrow(lengths).group_by("doc_id").agg(pl.col("doc_text_len").min())


def _join_doc_lengths(frame: pa.Table, doc_lengths) -> pa.Table:
    """`frame` (chunks) with each chunk's document length (null: no such document), rows in order.

    A polars hash join per validation slice: Arrow's join rebuilds its hash table over every
    document on each call (~0.5 GB transient at 1M documents), too dear per slice.
    """
    import polars as pl

    joined = pl.from_arrow(frame).join(doc_lengths, on="doc_id", how="left", maintain_order="left")
    return joined.to_arrow()


def _vector_columns(table: pa.Table) -> dict[str, pa.Array]:
    """vector_len, vector_finite, vector_norm per row of an embeddings table."""
    vectors = table.column("vector").combine_chunks()
    if isinstance(vectors.type, pa.FixedSizeListType):
        lengths = np.full(len(vectors), vectors.type.list_size, dtype=np.int64)
    else:
        lengths = pc.fill_null(pc.list_value_length(vectors), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(vectors).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    # Per-row reductions over the flat values (rows may differ in length when the contract is broken).
    offsets = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    nonempty = lengths > 0
    finite = np.ones(len(lengths), dtype=bool)
    norms = np.zeros(len(lengths), dtype=np.float64)
    if values.size:
        bad = (~np.isfinite(values)).astype(np.int64)
        finite[nonempty] = np.add.reduceat(bad, offsets[nonempty]) == 0
        squares = np.where(np.isfinite(values), values, 0.0) ** 2
        norms[nonempty] = np.sqrt(np.add.reduceat(squares, offsets[nonempty]))
    return {"vector_len": pa.array(lengths), "vector_finite": pa.array(finite),
            "vector_norm": pa.array(norms)}


def _contract_frame(dataset: str, table: pa.Table) -> pa.Table:
    """The columns the suite names, derived from `table` (texts become lengths, vectors stats);
    a chunk's document length is joined per slice (`_join_doc_lengths`)."""
    if dataset in ("documents", "documents_clean"):
        return pa.table({"doc_id": table.column("doc_id"), "text_len": _text_len(table.column("text")),
                         "content_hash": table.column("content_hash")})
    if dataset == "quarantine":
        return table.select(["stage", "reason"])
    if dataset == "chunks":
        frame = pa.table({name: table.column(name) for name in
                          ("chunk_id", "doc_id", "ordinal", "n_tokens", "char_start", "char_end")})
        return frame.append_column("text_len", _text_len(table.column("text")))
    if dataset == "embeddings":
        columns = _vector_columns(table)
        return pa.table({"chunk_id": table.column("chunk_id"), **columns})
    if dataset == "training_pairs":
        return table.select(["query_id", "doc_id", "split"])
    if dataset == "hard_negatives":
        return table.select(["query_id", "doc_id", "source", "rank", "score", "positive_score"])
    raise KeyError(dataset)


def _open(path: str | Path):
    from corpusforge.data import datasets

    return datasets.open_dataset(path)


def _bind(dataset: str, schema: pa.Schema, params: dict) -> tuple[dict, list[dict], list[str]]:
    """Suite parameters for this check, the expectations to run and those skipped (with why)."""
    expectations, skipped, bound = [], [], {}
    if dataset == "chunks":
        if params.get("max_tokens") is None:
            raise TypeError("validate('chunks', ...) needs max_tokens= (the chunking budget)")
        bound["max_tokens"] = int(params["max_tokens"])
    if dataset == "embeddings":
        dim = params.get("dim")
        if dim is None:
            vtype = schema.field("vector").type
            meta = schema.metadata or {}
            dim = vtype.list_size if isinstance(vtype, pa.FixedSizeListType) else meta.get(b"dim")
        if dim is None:
            raise TypeError("validate('embeddings', ...) needs dim= (vectors are not fixed-size lists)")
        tol = float(params.get("norm_tolerance", NORM_TOLERANCE))
        bound.update(dim=int(dim), norm_min=1.0 - tol, norm_max=1.0 + tol)
    for exp in SUITES[dataset]:
        column = exp["kwargs"].get("column") or exp["kwargs"].get("column_A")
        needs = _OPTIONAL.get((dataset, column))
        if needs and params.get(needs) in (None, False):
            skipped.append(f"{exp['type']}({column}): {needs}= not given")
            continue
        expectations.append(exp)
    return bound, expectations, skipped


def _bound_kwargs(kwargs: dict, bound: dict) -> dict:
    return {k: (bound[v["$PARAMETER"]] if isinstance(v, dict) and "$PARAMETER" in v else v)
            for k, v in kwargs.items()}


def _examples(result: dict, id_column: str | None) -> list:
    rows = result.get("partial_unexpected_index_list") or []
    if rows and id_column and isinstance(rows[0], dict):
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows[:EXAMPLES]]
    values = result.get("partial_unexpected_list") or []
    return [v.item() if hasattr(v, "item") else v for v in values[:EXAMPLES]]


def _run_ge(dataset: str, frame: pa.Table, expectations: list[dict], bound: dict) -> list[ExpectationOutcome]:
    ge = _ge()
    df = frame.to_pandas()
    id_column = ID_COLUMNS[dataset]
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    if id_column:
        result_format["unexpected_index_column_names"] = [id_column]
    batch = ge["batch"].get_batch(batch_parameters={"dataframe": df})
    # GE does not keep the suite's order in its results: tag each expectation to match them up.
    tagged = [{**e, "meta": {**e["meta"], "contract_index": i}} for i, e in enumerate(expectations)]
    run = batch.validate(_suite(dataset, tagged), expectation_parameters=bound,
                         result_format=result_format)
    by_index = {res.expectation_config.meta["contract_index"]: res for res in run.results}
    if sorted(by_index) != list(range(len(expectations))):
        raise RuntimeError(f"contract {dataset!r}: Great Expectations returned {len(run.results)} "
                           f"results for {len(expectations)} expectations")
    outcomes = []
    for i, exp in enumerate(expectations):
        res = by_index[i]
        info = res.exception_info or {}
        error = info.get("exception_message") if info.get("raised_exception") else None
        outcomes.append(ExpectationOutcome(
            expectation=exp["type"], kwargs=_bound_kwargs(exp["kwargs"], bound),
            note=exp["meta"]["notes"], success=bool(res.success) and error is None,
            unexpected_count=res.result.get("unexpected_count"),
            examples=_examples(res.result, id_column), error=error))
    return outcomes


def _merge_slices(per_slice: list[list[ExpectationOutcome]]) -> list[ExpectationOutcome]:
    merged = []
    for group in zip(*per_slice):
        first = group[0]
        counts = [o.unexpected_count for o in group if o.unexpected_count is not None]
        merged.append(ExpectationOutcome(
            first.expectation, first.kwargs, first.note, all(o.success for o in group),
            sum(counts) if counts else None,
            [x for o in group for x in o.examples][:EXAMPLES],
            next((o.error for o in group if o.error), None)))
    return merged


_UNIQUE = ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique")


def _key_columns(expectation: dict) -> list[str]:
    kwargs = expectation["kwargs"]
    return [kwargs["column"]] if "column" in kwargs else list(kwargs["column_list"])


def _keys(table: pa.Table | pa.RecordBatch, columns: list[str]) -> pa.Table | pa.RecordBatch:
    """The key columns of the rows GE checks: a null key (all-null for a compound key) is ignored."""
    keys = table.select(columns)
    mask = pc.is_valid(keys.column(0))
    for i in range(1, len(columns)):
        mask = pc.or_(mask, pc.is_valid(keys.column(i)))
    return keys.filter(mask)


def _hash_rows(keys: pa.Table | pa.RecordBatch) -> np.ndarray:
    """A 64-bit hash per row of `keys` (polars' row hash, fixed seed)."""
    import polars as pl

    return pl.from_arrow(keys).hash_rows(seed=0).to_numpy()


class _UniqueKeys:
    """Uniqueness of one key over a whole dataset validated in slices, in 8 bytes a row.

    Every slice adds the 64-bit hashes of its keys; hashes seen twice are candidates, confirmed
    against the key values themselves in a second pass (`confirm`), so a hash collision never fails
    a good dataset. This is the one part of a contract check that grows with the rows (8 B a row
    per unique key: 1.6 GB for the two keys of 100M chunks); everything else is bounded by the slice.
    """

    def __init__(self, index: int, columns: list[str]):
        self.index, self.columns = index, columns
        self._parts: list[np.ndarray] = []

    def add(self, frame: pa.Table) -> None:
        self._parts.append(_hash_rows(_keys(frame, self.columns)))

    def candidates(self) -> np.ndarray:
        """The hashes seen more than once, sorted."""
        hashes = np.sort(np.concatenate(self._parts)) if self._parts else np.empty(0, np.uint64)
        self._parts = []
        return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])

    def confirm(self, candidates: np.ndarray, batches, outcome: ExpectationOutcome) -> None:
        """Count the rows whose key really repeats (rows with a candidate hash, compared by value)."""
        rows = [keys.filter(pa.array(np.isin(_hash_rows(keys), candidates)))
                for keys in (_keys(b, self.columns) for b in batches)]
        rows = [r for r in rows if r.num_rows]
        outcome.success, outcome.unexpected_count, outcome.examples = True, 0, []
        if not rows:
            return
        table = pa.Table.from_batches(rows)
        counts = table.group_by(self.columns).aggregate([([], "count_all")])
        dupes = counts.filter(pc.greater(counts.column("count_all"), 1))
        if dupes.num_rows:
            outcome.success = False
            outcome.unexpected_count = int(pc.sum(dupes.column("count_all")).as_py())
            keys = dupes.select(self.columns).slice(0, EXAMPLES)
            outcome.examples = (keys.column(0).to_pylist() if len(self.columns) == 1 else keys.to_pylist())


def _source_batches(table: pa.Table | str | Path, batch_rows: int, columns: list[str] | None = None):
    """Record batches of an in-memory table or of a dataset directory (read batch by batch)."""
    size = min(batch_rows, 65_536)
    if isinstance(table, pa.Table):
        return (table if columns is None else table.select(columns)).to_batches(max_chunksize=size)
    from corpusforge.data import datasets

    return datasets.iter_batches(table, batch_size=size, columns=columns)


def _slices(frames, batch_rows: int, empty):
    """Contract frames regrouped into slices of at least `batch_rows` rows (the last may be
    shorter); ``empty()`` is the one slice of an empty dataset, so GE still runs its checks."""
    held: list[pa.Table] = []
    rows, sliced = 0, False
    for frame in frames:
        held.append(frame)
        rows += frame.num_rows
        if rows >= batch_rows:
            yield pa.concat_tables(held)
            held, rows, sliced = [], 0, True
    if held or not sliced:
        yield pa.concat_tables(held) if held else empty()


# ------------------------------------------------------------------------------ public API


def validate(dataset: str, table: pa.Table | str | Path, *, batch_rows: int = 131_072,
             **params: Any) -> ContractReport:
    """Check a dataset against its contract.

    The dataset is read batch by batch into contract frames, which Great Expectations validates
    in slices of `batch_rows` rows, so memory is bounded by the slice, not the dataset: what grows
    with the rows is 8 bytes a row per uniqueness key (`_UniqueKeys`), and for ``chunks`` the
    length of every document (one row per document, never the texts), which the span checks join.

    Args:
        dataset: ``documents`` (extract output), ``documents_clean`` (clean output: also no
            empty texts), ``quarantine``, ``chunks`` or ``embeddings``.
        table: the dataset: a table, or a committed dataset directory, which is read batch by
            batch (texts and vectors are never held whole).
        batch_rows: rows per GE validation slice. Uniqueness across slices is checked over the
            whole dataset by key hashes, confirmed by value.
        **params: per-dataset parameters. chunks: ``max_tokens`` (required) and ``documents``
            (a documents table, dataset directory or mapping doc_id -> text length; without it the
            span-inside-document checks are skipped and reported). embeddings: ``dim`` (default:
            the vector type's size), ``normalized`` (check unit norms; default False),
            ``norm_tolerance`` (default 1e-3).

    Returns:
        A `ContractReport` with the success flag, one outcome per expectation and failing examples.

    Raises:
        KeyError: unknown dataset.
        TypeError: a required parameter is missing.
        ValueError: the table lacks a column the contract needs.
    """
    if dataset not in SUITES:
        raise KeyError(f"no contract for dataset {dataset!r}; known: {', '.join(SUITES)}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    schema = table.schema if isinstance(table, pa.Table) else _open(table).schema
    bound, expectations, skipped = _bind(dataset, schema, params)
    doc_lengths = (_doc_lengths(params["documents"])  # once, not per batch
                   if dataset == "chunks" and params.get("documents") is not None else None)
    uniques = [_UniqueKeys(i, _key_columns(e)) for i, e in enumerate(expectations) if e["type"] in _UNIQUE]
    _ge()  # import outside the timed part
    t0 = time.perf_counter()
    per_slice, rows = [], 0
    try:
        frames = (_contract_frame(dataset, pa.Table.from_batches([b])) for b in _source_batches(table, batch_rows))
        for frame in _slices(frames, batch_rows, empty=lambda: _contract_frame(dataset, schema.empty_table())):
            if doc_lengths is not None:
                frame = _join_doc_lengths(frame, doc_lengths)
            per_slice.append(_run_ge(dataset, frame, expectations, bound))
            for keys in uniques:
                keys.add(frame)
            rows += frame.num_rows
    except KeyError as exc:
        raise ValueError(f"contract {dataset!r}: table has no column {exc} "
                         f"(columns: {', '.join(schema.names)})") from None
    results = _merge_slices(per_slice)
    if len(per_slice) > 1:  # GE saw each slice alone: decide uniqueness over the whole dataset
        for keys in uniques:
            outcome = results[keys.index]
            if outcome.error is None:
                keys.confirm(keys.candidates(), _source_batches(table, batch_rows, keys.columns), outcome)
    return ContractReport(dataset=dataset, success=all(r.success for r in results), rows=rows,
                          results=results, skipped=skipped, seconds=time.perf_counter() - t0)


def enforce(dataset: str, table: pa.Table, **params: Any) -> ContractReport:
    """Check a dataset against its contract and stop the run when it fails.

    Args:
        dataset: as for `validate`.
        table: the dataset.
        **params: as for `validate`.

    Returns:
        The (successful) `ContractReport`.

    Raises:
        ContractError: an expectation failed; the message names the dataset, each failed
            expectation and up to five failing values or rows.
    """
    report = validate(dataset, table, **params)
    if not report.success:
        raise ContractError(report)
    return report


if __name__ == "__main__":  # pragma: no cover - regeneration helper
    for p in write_suite_files():
        print(p)
