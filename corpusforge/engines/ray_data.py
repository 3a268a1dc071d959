"""extract, clean and chunk on Ray: the same datasets as the local engine, written by many tasks.

Each stage maps its input in units (`ray.plan_units`: slices of the input's Parquet files, or
the source's files for extract) through Ray Data; a unit's output file is named after the unit,
so the dataset's rows, read in file order, are in the local engine's order.

The decisions the local engine takes sequentially (the first record with an id wins, the first
document with a content hash wins, a document near a *kept* one goes) are taken in stages:

1. map: every unit screens, cleans and signs its records (MinHash), writes them to a staging
   dataset, and writes one ``(key, order)`` pair per id, content hash and MinHash band into hash
   partitions (`ray.KeyPartitions`);
2. reduce: one task per partition reports the rows whose key occurs more than once;
3. decide: the driver replays the local rules over those rows only, in global order (a row that
   shares no key with another row is kept by both engines, and cannot change another row's
   fate), so the result is the local engine's whatever the partitioning;
4. filter: every unit writes its kept rows and its quarantine, with the driver's decisions.

The driver holds only the rows involved in a collision (their signatures and ids), never the
corpus.
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from corpusforge.engines import ray as rx
from corpusforge.data.schemas import CHUNKS, DOCUMENTS, QUARANTINE
from corpusforge.stages import StageContext
from corpusforge.stages.checks import enforce

ORDER = pa.field("_order", pa.int64(), nullable=False)
STAGED_REJECTS = QUARANTINE.append(ORDER)
EXTRACT_STAGED = DOCUMENTS.append(ORDER).append(pa.field("_record", pa.string()))
CLEAN_STAGED = (DOCUMENTS.append(ORDER)
                .append(pa.field("_status", pa.string()))
                .append(pa.field("_changes", pa.list_(pa.int64())))
                .append(pa.field("_no_words", pa.bool_()))
                .append(pa.field("_signature", pa.list_(pa.uint64()))))
CHANGE_KEYS = ("unicode_repaired", "normalized", "control_chars_removed", "whitespace_collapsed", "emails",
               "phones")


def _partitions(units: int) -> int:
    return max(1, min(256, units))


def _scratch(ctx: StageContext, stage: str) -> Path:
    path = ctx.ws.base / "ray-scratch" / stage
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _read_staged(directory: Path, unit: int, schema: pa.Schema, orders: set[int] | None = None) -> pa.Table:
    path = directory / rx.PART.format(unit)
    if not path.exists():
        return schema.empty_table()
    table = pq.read_table(path, schema=schema)
    if orders is not None:
        table = table.filter(pc.is_in(table.column("_order"), pa.array(sorted(orders), type=pa.int64())))
    return table


def _involved_rows(directory: Path, orders: list[int], schema: pa.Schema) -> list[dict]:
    """The staged rows with these orders, in order (read unit by unit)."""
    by_unit: dict[int, set[int]] = defaultdict(set)
    for o in orders:
        by_unit[o >> rx.ORDER_SHIFT].add(o)
    rows: list[dict] = []
    for unit in sorted(by_unit):
        rows.extend(_read_staged(directory, unit, schema, by_unit[unit]).to_pylist())
    return sorted(rows, key=lambda r: r["_order"])


def _finish(good_dir: str, bad_dir: str, staged_dir: str, rejects_dir: str, unit: int, staged_schema: pa.Schema,
            keep: list[str], decided: dict[int, dict]) -> tuple[int, int, Counter[str], pa.Table]:
    """Step 4 for one unit: its kept rows and its quarantine (staged rejects + decided ones, in order).

    Returns:
        ``(kept, quarantined, reasons, the staged table)``.
    """
    staged = _read_staged(Path(staged_dir), unit, staged_schema)
    orders = staged.column("_order").to_numpy() if staged.num_rows else np.empty(0, np.int64)
    refused = np.isin(orders, np.fromiter(decided, dtype=np.int64, count=len(decided)))
    good = staged.filter(pa.array(~refused)) if staged.num_rows else staged
    good = _ok_rows(good)
    kept = rx.write_part(good_dir, unit, good.select(keep), DOCUMENTS)
    rejects = _read_staged(Path(rejects_dir), unit, STAGED_REJECTS).to_pylist()
    rejects = [r for r in rejects if r["_order"] not in decided] + list(decided.values())
    rejects.sort(key=lambda r: r["_order"])
    reasons = Counter(r["reason"] for r in rejects)
    rx.write_part(bad_dir, unit, pa.Table.from_pylist([{k: r[k] for k in QUARANTINE.names} for r in rejects],
                                                       schema=QUARANTINE), QUARANTINE)
    return kept, len(rejects), reasons, staged


def _ok_rows(table: pa.Table) -> pa.Table:
    if "_status" not in table.column_names or table.num_rows == 0:
        return table
    return table.filter(pc.equal(table.column("_status"), "ok"))


def _commit_pair(ctx: StageContext, stage: str, dataset: str, good: rx.StagedDataset, bad: rx.StagedDataset,
                 ) -> tuple[int, int]:
    rows = good.commit({"stage": stage, "engine": "ray"})
    quarantined = bad.commit({"stage": stage, "engine": "ray"})
    enforce(ctx.spec, ctx.ws, [dataset])
    return rows, quarantined


# ------------------------------------------------------------------------------------ extract


def extract(ctx: StageContext) -> dict[str, Any]:
    """The extract stage on Ray: one task per source file, ids deduplicated across files."""
    from corpusforge.text.extract import content_digest, duplicate_id, source_files

    rx.connect(ctx.spec.execution)
    refs = source_files(ctx.spec.source, ctx.spec.source_uri)
    scratch = _scratch(ctx, "extract")
    staged, rejects = scratch / "staged", scratch / "rejects"
    staged.mkdir()
    rejects.mkdir()
    keys = rx.KeyPartitions(scratch / "keys", _partitions(len(refs)))
    source = ctx.spec.source.model_dump(mode="json")
    items = [{"unit": i, "uri": r.uri, "relpath": r.relpath, "size": r.size, "mtime_ns": r.mtime_ns,
              "source": source, "staged": str(staged), "rejects": str(rejects), "keys": keys.spec()}
             for i, r in enumerate(refs)]
    rx.map_units(_extract_unit, items)

    first: dict[str, bytes] = {}
    decided: dict[int, dict[int, dict]] = defaultdict(dict)
    for row in _involved_rows(staged, keys.collisions(), EXTRACT_STAGED):
        digest = content_digest(row["content_hash"])
        if row["doc_id"] not in first:
            first[row["doc_id"]] = digest
            continue
        rejected = duplicate_id(row, row["_record"], first[row["doc_id"]] == digest).as_row()
        decided[row["_order"] >> rx.ORDER_SHIFT][row["_order"]] = {**rejected, "_order": row["_order"]}
    return _filter_stage(ctx, "extract", "documents", len(refs), staged, rejects, EXTRACT_STAGED, decided,
                         scratch, keys)


def _extract_unit(item: dict[str, Any]) -> dict[str, Any]:
    """Step 1 of extract for one source file."""
    from corpusforge.data import fs
    from corpusforge.text.extract import iter_file
    from corpusforge.data.schemas import Rejected
    from corpusforge.spec import SourceConfig

    unit = item["unit"]
    source = SourceConfig(**item["source"])
    ref = fs.FileRef(item["uri"], item["relpath"], item["size"], item["mtime_ns"])
    good = rx.PartWriter(item["staged"], unit, EXTRACT_STAGED)
    bad = rx.PartWriter(item["rejects"], unit, STAGED_REJECTS)
    key_values, key_orders = [], []
    for pos, entry in enumerate(iter_file(source, ref)):
        order = (unit << rx.ORDER_SHIFT) + pos
        if isinstance(entry, Rejected):
            bad.write_rows([{**entry.as_row(), "_order": order}])
            continue
        doc, record = entry
        good.write_rows([{**doc, "_order": order, "_record": record}])
        key_values.append(rx.key_hash("id", doc["doc_id"]))
        key_orders.append(order)
    rx.KeyPartitions.write(item["keys"], unit, np.asarray(key_values, dtype=np.int64),
                           np.asarray(key_orders, dtype=np.int64))
    return {"staged": good.close(), "rejected": bad.close()}


def _filter_stage(ctx: StageContext, stage: str, dataset: str, units: int, staged: Path, rejects: Path,
                  schema: pa.Schema, decided: dict[int, dict[int, dict]], scratch: Path,
                  keys: rx.KeyPartitions, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step 4 and the commit: every unit's kept rows and quarantine, then the summary."""
    good = rx.StagedDataset(ctx.ws.dataset(dataset), DOCUMENTS)
    bad = rx.StagedDataset(ctx.ws.quarantine(stage), QUARANTINE)
    items = [{"unit": u, "good": str(good.tmp), "bad": str(bad.tmp), "staged": str(staged),
              "rejects": str(rejects), "stage": stage,
              "decided": {str(o): r for o, r in decided.get(u, {}).items()}, **(extra or {})}
             for u in range(units)]
    try:
        results = rx.map_units(_finish_unit, items)
        rows, quarantined = _commit_pair(ctx, stage, dataset, good, bad)
    except BaseException:
        good.abort()
        bad.abort()
        raise
    finally:
        keys.cleanup()
        rx.remove_scratch(scratch)
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    summary = {"rows": rows, "quarantined": quarantined, "quarantine_reasons": dict(reasons)}
    if stage == "clean":
        summary["counts"] = results
    return summary


def _finish_unit(item: dict[str, Any]) -> dict[str, Any]:
    """Step 4 for one unit (extract or clean); clean also counts what its steps changed."""
    decided = {int(o): r for o, r in item["decided"].items()}
    schema = CLEAN_STAGED if item["stage"] == "clean" else EXTRACT_STAGED
    kept, quarantined, reasons, staged = _finish(item["good"], item["bad"], item["staged"], item["rejects"],
                                                 item["unit"], schema, list(DOCUMENTS.names), decided)
    out: dict[str, Any] = {"kept": kept, "quarantined": quarantined, "reasons": dict(reasons)}
    if item["stage"] == "clean":
        out["changes"] = _clean_counts(staged, decided, item["near_enabled"])
    return out


# -------------------------------------------------------------------------------------- clean


def clean(ctx: StageContext) -> dict[str, Any]:
    """The clean stage on Ray (see the module docstring for how dedup stays the local engine's)."""
    from corpusforge.text.clean import Cleaner, summary_of

    rx.connect(ctx.spec.execution)
    cfg = ctx.spec.clean
    source = ctx.ws.dataset("documents")
    units = rx.plan_units(source, ctx.spec.execution.rows_per_task)
    scratch = _scratch(ctx, "clean")
    staged, rejects = scratch / "staged", scratch / "rejects"
    staged.mkdir()
    rejects.mkdir()
    keys = rx.KeyPartitions(scratch / "keys", _partitions(len(units)))
    items = [{**u.as_dict(), "unit": u.index, "cfg": cfg.model_dump(mode="json"), "staged": str(staged),
              "rejects": str(rejects), "keys": keys.spec()} for u in units]
    mapped = rx.map_units(_clean_unit, items)

    cleaner = Cleaner(cfg)
    involved = _involved_rows(staged, keys.collisions(), CLEAN_STAGED)
    decided = _decide_clean(cleaner, involved, units)
    summary = _filter_stage(ctx, "clean", "documents_clean", len(units), staged, rejects, CLEAN_STAGED, decided,
                            scratch, keys, extra={"near_enabled": cfg.near_duplicates.enabled})
    enforce(ctx.spec, ctx.ws, ["quarantine"])
    counts: Counter[str] = Counter()
    counts["documents_in"] = sum(m["documents_in"] for m in mapped)
    counts["documents_out"] = summary["rows"]
    for r in summary.pop("counts"):
        counts.update(r["changes"])
    summary["cleaner"] = summary_of(counts, Counter(summary["quarantine_reasons"]))
    return summary


def _clean_unit(item: dict[str, Any]) -> dict[str, Any]:
    """Step 1 of clean for one unit: screen, clean, bound, sign; stage rows and write keys."""
    from corpusforge.text.clean import Cleaner
    from corpusforge.data.schemas import Rejected
    from corpusforge.spec import CleanConfig

    cfg = CleanConfig(**item["cfg"])
    cleaner = Cleaner(cfg)
    unit = item["unit"]
    near = cfg.near_duplicates.enabled
    bands = cleaner.band_params() if near else None
    table = rx.read_unit(rx.Unit(unit, item["file"], item["start"], item["stop"]))
    good = rx.PartWriter(item["staged"], unit, CLEAN_STAGED)
    bad = rx.PartWriter(item["rejects"], unit, STAGED_REJECTS)
    key_values: list[int] = []
    key_orders: list[int] = []
    for pos, doc in enumerate(table.to_pylist()):
        order = (unit << rx.ORDER_SHIFT) + pos
        fields = cleaner.screen(doc)
        if isinstance(fields, Rejected):
            bad.write_rows([{**fields.as_row(), "_order": order}])
            continue
        cleaned, changes = cleaner.clean_fields(doc, fields)
        ids = [rx.key_hash("id", fields["doc_id"])]
        row = {**fields, "_order": order, "_changes": [int(changes[k]) for k in CHANGE_KEYS],
               "_no_words": False, "_signature": None}
        if isinstance(cleaned, Rejected):
            bad.write_rows([{**cleaned.as_row(), "_order": order}])
            row["_status"] = cleaned.reason
        else:
            row.update(cleaned, _status="ok")
            if cfg.dedup_exact:
                ids.append(rx.key_hash("hash", cleaned["content_hash"]))
            if near:
                sig = cleaner.signature(cleaned["title"], cleaned["text"])
                if sig is None:
                    row["_no_words"] = True
                else:
                    row["_signature"] = sig.tolist()
                    ids.extend(band_keys(sig, *bands))
        good.write_rows([row])
        key_values.extend(ids)
        key_orders.extend([order] * len(ids))
    rx.KeyPartitions.write(item["keys"], unit, np.asarray(key_values, dtype=np.int64),
                           np.asarray(key_orders, dtype=np.int64))
    good.close()
    bad.close()
    return {"documents_in": table.num_rows}


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """The LSH bucket keys of a signature: band ``i`` is ``signature[i*rows:(i+1)*rows]``, as datasketch."""
    sig = np.ascontiguousarray(signature, dtype=np.uint64)
    return [rx.key_hash(f"band{i}", sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]


def _decide_clean(cleaner, involved: list[dict], units: list[rx.Unit]) -> dict[int, dict[int, dict]]:
    """Step 3: the local cleaner's dedup rules replayed over the rows that share a key, in order.

    Returns:
        unit -> order -> the quarantine row of each row the rules refuse.
    """
    from corpusforge.text.clean import duplicate_id_detail, exact_detail, near_detail

    cfg = cleaner.cfg
    nd = cfg.near_duplicates
    bands = cleaner.band_params() if nd.enabled else None
    kept_ids: set[str] = set()
    seen_hashes: dict[str, str] = {}
    buckets: dict[int, list[str]] = defaultdict(list)
    signatures: dict[str, np.ndarray] = {}
    refused: dict[int, tuple[str, str]] = {}
    for row in involved:
        doc_id, order = row["doc_id"], row["_order"]
        if doc_id in kept_ids:
            refused[order] = ("duplicate_doc_id", duplicate_id_detail(doc_id))
            continue
        if row["_status"] != "ok":
            continue  # refused by a length bound, already in its unit's staged quarantine
        chash = row["content_hash"]
        if cfg.dedup_exact and chash in seen_hashes:
            refused[order] = ("exact_duplicate", exact_detail(seen_hashes[chash]))
            continue
        sig = np.asarray(row["_signature"], dtype=np.uint64) if row["_signature"] is not None else None
        keys = band_keys(sig, *bands) if sig is not None and bands else []
        if keys:
            best_id, best_sim = None, -1.0
            for cand in sorted({c for k in keys for c in buckets.get(k, ())}):
                sim = float(np.count_nonzero(sig == signatures[cand])) / nd.num_perm
                if sim > best_sim:
                    best_id, best_sim = cand, sim
            if best_id is not None and best_sim >= nd.threshold:
                refused[order] = ("near_duplicate", near_detail(best_id, best_sim, nd))
                continue
        kept_ids.add(doc_id)
        seen_hashes.setdefault(chash, doc_id)
        if keys:
            signatures[doc_id] = sig
            for k in keys:
                buckets[k].append(doc_id)
    return _refusals(cleaner, refused, units)


def _refusals(cleaner, refused: dict[int, tuple[str, str]], units: list[rx.Unit]) -> dict[int, dict[int, dict]]:
    """Quarantine rows for refused orders, each with its original record read back from the input."""
    by_unit: dict[int, list[int]] = defaultdict(list)
    for order in refused:
        by_unit[order >> rx.ORDER_SHIFT].append(order)
    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for u, orders in by_unit.items():
        table = rx.read_unit(units[u])
        positions = [o & ((1 << rx.ORDER_SHIFT) - 1) for o in orders]
        originals = table.take(pa.array(positions, type=pa.int64())).to_pylist()
        for order, doc in zip(orders, originals):
            reason, detail = refused[order]
            out[u][order] = {**cleaner.reject(doc, reason, detail).as_row(), "_order": order}
    return out


def _clean_counts(staged: pa.Table, decided: dict[int, dict], near_enabled: bool) -> dict[str, int]:
    """A unit's change counters as the local cleaner counts them (not for duplicate_doc_id rows)."""
    counts: Counter[str] = Counter()
    if staged.num_rows == 0:
        return {}
    for row in staged.select(["_order", "_status", "_changes", "_no_words"]).to_pylist():
        reason = decided.get(row["_order"], {}).get("reason")
        if reason == "duplicate_doc_id":
            continue
        ch = dict(zip(CHANGE_KEYS, row["_changes"]))
        for key in ("unicode_repaired", "normalized", "control_chars_removed", "whitespace_collapsed"):
            counts[key] += int(ch[key] > 0)
        counts["emails_redacted"] += ch["emails"]
        counts["phones_redacted"] += ch["phones"]
        counts["documents_with_pii"] += int(ch["emails"] + ch["phones"] > 0)
        if (near_enabled and row["_status"] == "ok" and row["_no_words"]
                and reason not in ("exact_duplicate",)):
            counts["near_duplicate_skipped_no_words"] += 1
    return dict(counts)


# -------------------------------------------------------------------------------------- chunk


class _ChunkWorker:
    """An actor of the chunk pool: loads the tokenizer once, chunks unit after unit."""

    def __init__(self, chunk_cfg: dict, model_name: str):
        from corpusforge.encoding.models import load_tokenizer
        from corpusforge.spec import ChunkConfig

        self.cfg = ChunkConfig(**chunk_cfg)
        self.tokenizer = load_tokenizer(model_name)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        from corpusforge.text.chunk import Chunker

        chunker = Chunker(self.cfg, self.tokenizer)
        table = rx.read_unit(rx.Unit(item["unit"], item["file"], item["start"], item["stop"]))
        out = rx.PartWriter(item["out"], item["unit"], CHUNKS)
        for batch in table.to_batches(max_chunksize=1024):
            out.write_rows(list(chunker.chunk_many(batch.to_pylist())))
        return {"chunks": out.close(), "docs": table.num_rows}


def chunk(ctx: StageContext) -> dict[str, Any]:
    """The chunk stage on Ray: a pool of tokenizer actors, one output file per unit."""
    rx.connect(ctx.spec.execution)
    units = rx.plan_units(ctx.ws.dataset("documents_clean"), ctx.spec.execution.rows_per_task)
    good = rx.StagedDataset(ctx.ws.dataset("chunks"), CHUNKS)
    bad = rx.StagedDataset(ctx.ws.quarantine("chunk"), QUARANTINE)
    items = [{**u.as_dict(), "unit": u.index, "out": str(good.tmp)} for u in units]
    try:
        rx.map_units(None, items, actors=_ChunkWorker,
                     actor_args=(ctx.spec.chunk.model_dump(mode="json"), ctx.spec.model.name))
        rows, quarantined = _commit_pair(ctx, "chunk", "chunks", good, bad)
    except BaseException:
        good.abort()
        bad.abort()
        raise
    return {"rows": rows, "quarantined": quarantined, "quarantine_reasons": {}}

