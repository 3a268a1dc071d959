"""The data stages: extract, clean and chunk, each a stream from one dataset into the next.

With ``execution.engine: ray`` each runs on Ray instead (`corpusforge.engines.ray_data`), with
the same output.

Records stream through (`datasets.iter_rows` -> the stage's generator -> `DatasetWriter`); only the
cleaner's duplicate indexes (hashes and MinHash bands, not texts) grow with the corpus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from corpusforge.data import datasets
from corpusforge.engines import uses_ray
from corpusforge.progress import track
from corpusforge.data.schemas import CHUNKS, DOCUMENTS, QUARANTINE, Rejected
from corpusforge.stages import StageContext
from corpusforge.stages.checks import enforce


def extract(ctx: StageContext) -> dict[str, Any]:
    """Read the spec's source into ``documents`` (quarantine: unreadable or malformed records)."""
    if uses_ray(ctx.spec):
        from corpusforge.engines import ray_data

        return ray_data.extract(ctx)
    from corpusforge.text.extract import iter_documents

    items = iter_documents(ctx.spec.source, ctx.spec.source_uri)
    return split_stream(ctx, "extract", items, "documents", DOCUMENTS, unit="docs")


def clean(ctx: StageContext) -> dict[str, Any]:
    """Normalise and filter ``documents`` into ``documents_clean`` (quarantine: rejects with reasons)."""
    if uses_ray(ctx.spec):
        from corpusforge.engines import ray_data

        return ray_data.clean(ctx)
    from corpusforge.text.clean import Cleaner

    cleaner = Cleaner(ctx.spec.clean)
    source = ctx.ws.dataset("documents")
    summary = split_stream(ctx, "clean", cleaner.process(datasets.iter_rows(source)), "documents_clean", DOCUMENTS,
                           unit="docs", total=datasets.count_rows(source))
    enforce(ctx.spec, ctx.ws, ["quarantine"])
    summary["cleaner"] = cleaner.summary()
    return summary


def chunk(ctx: StageContext) -> dict[str, Any]:
    """Split ``documents_clean`` into token-bounded ``chunks`` with the model's tokenizer."""
    if uses_ray(ctx.spec):
        from corpusforge.engines import ray_data

        summary = ray_data.chunk(ctx)
        summary["tokens"] = token_stats(ctx.ws.dataset("chunks"))
        return summary
    from corpusforge.text.chunk import Chunker
    from corpusforge.encoding.models import load_tokenizer

    chunker = Chunker(ctx.spec.chunk, load_tokenizer(ctx.spec.model.name))
    source = ctx.ws.dataset("documents_clean")
    docs = track(datasets.iter_rows(source), "chunk", total=datasets.count_rows(source), unit="docs",
                 enabled=ctx.progress)
    summary = split_stream(ctx, "chunk", chunker.chunk_many(docs), "chunks", CHUNKS, unit="chunks", show=False)
    summary["tokens"] = token_stats(ctx.ws.dataset("chunks"))
    return summary


def split_stream(ctx: StageContext, stage: str, items: Iterable[dict | Rejected], dataset: str, schema,
                 unit: str, total: int | None = None, show: bool = True) -> dict[str, Any]:
    """Write good records to `dataset` and rejected ones to the stage's quarantine, then check the contract.

    Args:
        ctx: the stage context.
        stage: the stage name (its quarantine dataset).
        items: records (dicts) and `Rejected` records, in any mix.
        dataset: the dataset the good records go to.
        schema: its Arrow schema.
        unit: the progress bar's unit.
        total: the expected count, for the progress bar.
        show: show a progress bar (when the caller does not already).

    Returns:
        ``rows``, ``quarantined`` and ``quarantine_reasons``.
    """
    reasons: Counter[str] = Counter()
    with datasets.DatasetWriter(ctx.ws.dataset(dataset), schema) as good, \
            datasets.DatasetWriter(ctx.ws.quarantine(stage), QUARANTINE) as bad:
        for item in track(items, stage, total=total, unit=unit, enabled=ctx.progress and show):
            if isinstance(item, Rejected):
                bad.write_rows([item.as_row()])
                reasons[item.reason] += 1
            else:
                good.write_rows([item])
        good.commit({"stage": stage})
        bad.commit({"stage": stage})
    enforce(ctx.spec, ctx.ws, [dataset])
    return {"rows": good.rows, "quarantined": bad.rows, "quarantine_reasons": dict(reasons)}


def token_stats(chunks_path: Path) -> dict[str, float]:
    """Token statistics of a chunks dataset: count, min, mean, median, p95, max of n_tokens."""
    col = datasets.read_table(chunks_path, columns=["n_tokens"]).column("n_tokens")
    if len(col) == 0:
        return {"chunks": 0}
    q = pc.quantile(col, q=[0.5, 0.95]).to_pylist()
    return {"chunks": len(col), "total": int(pc.sum(col).as_py()), "min": int(pc.min(col).as_py()),
            "mean": round(pc.mean(col).as_py(), 1), "median": q[0], "p95": q[1], "max": int(pc.max(col).as_py())}
