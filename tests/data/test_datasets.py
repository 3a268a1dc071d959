"""Dataset I/O: streamed writes, atomic commit, discarded aborts, stale temps removed."""

import pyarrow as pa
import pytest

from corpusforge.data import datasets
from corpusforge.data.schemas import QUARANTINE, Rejected

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("n", pa.int64())],
                   metadata={"dataset": "t"})


def test_streamed_write_in_row_groups_and_files(tmp_path):
    path = tmp_path / "ds"
    with datasets.DatasetWriter(path, SCHEMA, rows_per_group=10, rows_per_file=20) as w:
        w.write_rows({"id": str(i), "n": i} for i in range(60))
        assert not datasets.is_complete(path)  # nothing visible before commit
        w.commit({"note": "x"})
    assert datasets.count_rows(path) == 60
    assert [r["n"] for r in datasets.iter_rows(path)] == list(range(60))
    assert len(list(path.glob("part-*.parquet"))) == 3
    assert datasets.dataset_info(path) == {"rows": 60, "dataset": "t", "note": "x"}


def test_exception_discards_and_keeps_previous_version(tmp_path):
    path = tmp_path / "ds"
    with datasets.DatasetWriter(path, SCHEMA) as w:
        w.write_rows([{"id": "a", "n": 1}])
        w.commit()
    with pytest.raises(RuntimeError):
        with datasets.DatasetWriter(path, SCHEMA) as w:
            w.write_rows([{"id": "b", "n": 2}])
            raise RuntimeError("crash mid-write")
    assert [r["id"] for r in datasets.iter_rows(path)] == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_stale_temps_from_a_killed_writer_are_removed(tmp_path):
    stale = tmp_path / ".ds.tmp-deadbeef"
    stale.mkdir()
    (stale / "part-00000.parquet").write_bytes(b"half")
    with datasets.DatasetWriter(tmp_path / "ds", SCHEMA) as w:
        w.commit()
    assert not stale.exists()
    assert datasets.count_rows(tmp_path / "ds") == 0  # an empty dataset is still readable


def test_incomplete_dataset_is_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete dataset"):
        datasets.open_dataset(tmp_path / "ds")


def test_rows_must_match_schema(tmp_path):
    with datasets.DatasetWriter(tmp_path / "ds", SCHEMA, rows_per_group=1) as w:
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
            w.write_rows([{"id": "a", "n": "not a number"}])


def test_quarantine_rows_round_trip(tmp_path):
    r = Rejected("extract", "malformed_json", "bad", "f.jsonl:3", None, "{oops")
    with datasets.DatasetWriter(tmp_path / "q", QUARANTINE) as w:
        w.write_rows([r.as_row()])
        w.commit()
    assert list(datasets.iter_rows(tmp_path / "q")) == [r.as_row()]


def test_atomic_dir_replaces_on_success_and_discards_on_error(tmp_path):
    final = tmp_path / "out"
    with datasets.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(ValueError):
        with datasets.atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise ValueError("boom")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_iter_batches_reads_nothing_ahead_of_a_slow_consumer(tmp_path):
    """Every stage streams its input through `iter_batches`; Arrow's dataset scanner read ahead on
    its own threads (further the slower the consumer: a gigabyte of a 3M-row chunks dataset under
    a contract check), so a stage's memory grew with its input. Read in the caller's thread, a
    consumer holds one batch of Arrow memory, here 1 MB, of a 48 MB dataset."""
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("text", pa.string())])
    with datasets.DatasetWriter(tmp_path / "d", schema, rows_per_group=1024, rows_per_file=12_288) as writer:
        for lo in range(0, 49_152, 4096):
            writer.write_table(pa.table({"id": pa.array(range(lo, lo + 4096), pa.int64()),
                                         "text": ["x" * 1000] * 4096}, schema=schema))
        writer.commit()
    assert len(list((tmp_path / "d").glob("part-*.parquet"))) == 4
    base, peak, seen = pa.total_allocated_bytes(), 0, []
    for batch in datasets.iter_batches(tmp_path / "d", batch_size=1024):
        seen.extend(batch.column("id").to_pylist())
        sum(len(t) for t in batch.column("text").to_pylist())  # a consumer slower than the reader
        peak = max(peak, pa.total_allocated_bytes() - base)
        del batch
    assert seen == list(range(49_152))  # every row, in write order
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB of Arrow memory held while streaming"
