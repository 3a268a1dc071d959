"""Runs a pipeline spec stage by stage: skip what is unchanged, commit atomically, summarise.

Each stage is a plain method over the workspace's datasets. A stage's fingerprint covers its
configuration, its code version and its inputs' fingerprints; when the recorded fingerprint of
the last successful run matches and the outputs are complete, the stage is skipped. Outputs are
committed atomically (see `datasets.DatasetWriter`) and the stage's state is recorded only after
its outputs are in place and its data contract holds, so a crash or a failed check leaves the
stage to be redone on the next run and never publishes.

The CLI, Dagster assets and Airflow tasks all call `Pipeline.run_stage`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from corpusforge import datasets
from corpusforge.hashing import config_fingerprint
from corpusforge.progress import track
from corpusforge.schemas import CHUNKS, DOCUMENTS, QUARANTINE, Rejected
from corpusforge.spec import PipelineSpec
from corpusforge.workspace import Workspace

log = logging.getLogger("corpusforge")

STAGES = ("extract", "clean", "chunk", "embed", "index", "evaluate", "publish")

# Bump a stage's code version when its output for the same input changes, so caches invalidate.
CODE_VERSIONS = {"extract": 1, "clean": 1, "chunk": 1, "embed": 1, "index": 1, "evaluate": 1, "publish": 1}


class StrictModeError(RuntimeError):
    """Raised at the end of a `strict` run that quarantined records."""


@dataclass
class StageResult:
    """What one stage did.

    Attributes:
        stage: the stage name.
        skipped: True when its inputs and config were unchanged and it did no work.
        fingerprint: the fingerprint of its inputs and configuration.
        summary: counts and facts the stage reported (rows, quarantine per reason, ...).
        seconds: wall time spent (0 when skipped).
    """

    stage: str
    skipped: bool
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Pipeline:
    """A pipeline spec bound to a workspace.

    Args:
        spec: the validated pipeline spec.
        workspace: the workspace root; default from the spec, else ./workspace.
        progress: show progress bars.
        force: redo every stage even when its fingerprint is unchanged.
    """

    def __init__(self, spec: PipelineSpec, workspace: str | Path | None = None, progress: bool = True,
                 force: bool = False):
        self.spec = spec
        self.ws = Workspace.for_spec(spec, workspace)
        self.progress = progress
        self.force = force
        self._fingerprints: dict[str, str] = {}

    # -- orchestration -------------------------------------------------------------------------

    def run(self, until: str | None = None, strict: bool = False,
            on_result: Callable[[StageResult], None] | None = None) -> list[StageResult]:
        """Run every stage in order, up to and including `until`.

        Args:
            until: the last stage to run (default: all of them).
            strict: raise `StrictModeError` after the run when any record was quarantined.
            on_result: called with each stage's result as soon as it finishes.

        Returns:
            The results, one per stage run or skipped.
        """
        stages = STAGES if until is None else STAGES[: STAGES.index(_check_stage(until)) + 1]
        results = []
        with self.tracker(run_name=f"{self.spec.name}-{stages[-1]}") as tracker:
            tracker.set_tags({"corpusforge.until": stages[-1]})
            for stage in stages:
                result = self.run_stage(stage)
                results.append(result)
                self.log_result(tracker, result)
                if on_result:
                    on_result(result)
        quarantined = sum(r.summary.get("quarantined", 0) for r in results)
        if strict and quarantined:
            raise StrictModeError(f"{quarantined} record(s) quarantined (strict mode)")
        return results

    def tracker(self, run_name: str | None = None):
        """An MLflow run for this pipeline (the spec's tracking URI, else sqlite in the workspace).

        Args:
            run_name: the run's name in the MLflow UI.

        Returns:
            A started-on-enter `tracking.RunTracker` with the spec logged as params.
        """
        from corpusforge.tracking import RunTracker

        tracking = self.spec.tracking
        tracker = RunTracker(tracking.uri or self.ws.tracking_uri, tracking.experiment or self.spec.name,
                             run_name=run_name, tags={"corpusforge.pipeline": self.spec.name,
                                                      "corpusforge.workspace": str(self.ws.root)})
        return _SpecLogging(tracker, self.spec)

    def log_result(self, tracker, result: StageResult) -> None:
        """Log a stage's result to an MLflow run: status, counts, metrics and artifacts."""
        tracker.set_tags({f"stage.{result.stage}": "skipped" if result.skipped else "ran",
                          f"fingerprint.{result.stage}": result.fingerprint})
        s = result.summary
        numbers = {f"{result.stage}.{k}": v for k, v in s.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        numbers[f"{result.stage}.seconds"] = result.seconds
        tracker.log_metrics(numbers)
        if result.stage == "evaluate":
            split = s.get("split", "test")
            for mode, values in s.get("modes", {}).items():
                tracker.log_metrics({f"{split}.{mode}.{k}": v for k, v in values["metrics"].items()})
                tracker.log_metrics({f"{split}.{mode}.{k}": v for k, v in values["latency"].items()})
            for mode, values in (s.get("query_tower") or {}).get("modes", {}).items():
                tracker.log_metrics({f"{split}.{mode}-tower.{k}": v for k, v in values["metrics"].items()})
                tracker.log_metrics({f"{split}.{mode}-tower.{k}": v for k, v in values["latency"].items()})
            for path in sorted(self.ws.eval_dir.glob("*")):
                tracker.log_artifact(path, artifact_path="eval")
        if result.stage == "publish" and (self.ws.base / "manifest.json").exists():
            tracker.log_artifact(self.ws.base / "manifest.json")
            tracker.set_tags({"snapshot.version": s.get("version", ""), "snapshot.alias": s.get("alias", "")})

    def run_stage(self, stage: str) -> StageResult:
        """Run one stage (its upstream stages must have run), or skip it when unchanged.

        Args:
            stage: one of `STAGES`.

        Returns:
            The stage's result.
        """
        _check_stage(stage)
        fingerprint = self.fingerprint(stage)
        state = self.ws.read_state(stage)
        if (not self.force and state and state.get("fingerprint") == fingerprint
                and all(_exists(p) for p in self._outputs(stage)) and self._still_valid(stage, state)):
            log.info("%s: unchanged, skipped", stage)
            return StageResult(stage, True, fingerprint, state.get("summary", {}))
        started = time.perf_counter()
        summary = getattr(self, f"_{stage}")()
        seconds = time.perf_counter() - started
        self.ws.write_state(stage, {"fingerprint": fingerprint, "summary": summary, "seconds": seconds,
                                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log.info("%s: done in %.1fs (%s rows, %s quarantined)", stage, seconds, summary.get("rows", "-"),
                 summary.get("quarantined", 0))
        return StageResult(stage, False, fingerprint, summary, seconds)

    def fingerprint(self, stage: str) -> str:
        """The fingerprint of a stage's configuration, code version and inputs."""
        if stage not in self._fingerprints:
            idx = STAGES.index(_check_stage(stage))
            upstream = self.fingerprint(STAGES[idx - 1]) if idx else self._source_fingerprint()
            self._fingerprints[stage] = config_fingerprint(
                stage, CODE_VERSIONS[stage], self._stage_config(stage), upstream)
        return self._fingerprints[stage]

    def _source_fingerprint(self) -> str:
        from corpusforge import fs

        return fs.fingerprint(self.spec.source_uri, endpoint_url=self.spec.source.s3_endpoint_url)

    def _stage_config(self, stage: str) -> Any:
        s = self.spec
        if stage == "extract":
            return s.source.model_dump(mode="json")
        if stage == "clean":
            return s.clean.model_dump(mode="json")
        if stage == "chunk":
            from corpusforge.models import model_fingerprint

            return [s.chunk.model_dump(mode="json"), model_fingerprint(s.model.name)]  # the tokenizer
        if stage == "embed":
            from corpusforge.models import model_fingerprint

            return [s.model.model_dump(mode="json"), model_fingerprint(s.model.name)]
        if stage == "index":
            return s.index.model_dump(mode="json")
        if stage == "evaluate":
            return [s.evaluate.model_dump(mode="json"), s.search.model_dump(mode="json"), self._source_fingerprint()]
        return s.publish.model_dump(mode="json")

    def _still_valid(self, stage: str, state: dict[str, Any]) -> bool:
        """Outputs outside the workspace (published snapshots) must still exist to skip."""
        if stage != "publish":
            return True
        from corpusforge.snapshot_build import published_version_exists

        return published_version_exists(self, state.get("summary", {}).get("version", ""))

    def _outputs(self, stage: str) -> list[Path]:
        ws = self.ws
        return {
            "extract": [ws.dataset("documents"), ws.quarantine("extract")],
            "clean": [ws.dataset("documents_clean"), ws.quarantine("clean")],
            "chunk": [ws.dataset("chunks"), ws.quarantine("chunk")],
            "embed": [ws.dataset("embeddings")],
            "index": [ws.index_dir / "dense" / "dense.json", ws.index_dir / "bm25" / "bm25.json"]
                     + ([ws.index_dir / "query_tower" / "tower.json"] if self.spec.index.query_tower.enabled else []),
            "evaluate": [ws.eval_dir / "metrics.json"],
            "publish": [],
        }[stage]

    # -- data stages ---------------------------------------------------------------------------

    def _extract(self) -> dict[str, Any]:
        from corpusforge.extract import iter_documents

        items = iter_documents(self.spec.source, self.spec.source_uri)
        summary = self._split_stream("extract", items, "documents", DOCUMENTS, unit="docs")
        return summary

    def _clean(self) -> dict[str, Any]:
        from corpusforge.clean import Cleaner

        cleaner = Cleaner(self.spec.clean)
        docs = datasets.iter_rows(self.ws.dataset("documents"))
        summary = self._split_stream("clean", cleaner.process(docs), "documents_clean", DOCUMENTS,
                                     unit="docs", total=datasets.count_rows(self.ws.dataset("documents")))
        summary["cleaner"] = cleaner.summary()
        return summary

    def _chunk(self) -> dict[str, Any]:
        from corpusforge.chunk import Chunker
        from corpusforge.models import load_tokenizer

        chunker = Chunker(self.spec.chunk, load_tokenizer(self.spec.model.name))
        source = self.ws.dataset("documents_clean")
        docs = track(datasets.iter_rows(source), "chunk", total=datasets.count_rows(source), unit="docs",
                     enabled=self.progress)
        summary = self._split_stream("chunk", chunker.chunk_many(docs), "chunks", CHUNKS, unit="chunks",
                                     show=False, contract_params={"max_tokens": self.spec.chunk.max_tokens,
                                                                  "documents": source})
        summary["tokens"] = token_stats(self.ws.dataset("chunks"))
        return summary

    def _split_stream(self, stage: str, items: Iterable[dict | Rejected], dataset: str, schema,
                      unit: str, total: int | None = None, show: bool = True,
                      contract_params: dict | None = None) -> dict[str, Any]:
        """Write good records to `dataset` and rejected ones to the stage's quarantine."""
        from corpusforge.contracts import enforce

        reasons: Counter[str] = Counter()
        with datasets.DatasetWriter(self.ws.dataset(dataset), schema) as good, \
                datasets.DatasetWriter(self.ws.quarantine(stage), QUARANTINE) as bad:
            stream = track(items, stage, total=total, unit=unit, enabled=self.progress and show)
            for item in stream:
                if isinstance(item, Rejected):
                    bad.write_rows([item.as_row()])
                    reasons[item.reason] += 1
                else:
                    good.write_rows([item])
            good.commit({"stage": stage})
            bad.commit({"stage": stage})
        table = datasets.read_table(self.ws.dataset(dataset))
        enforce(dataset, table, **(contract_params or {}))
        return {"rows": good.rows, "quarantined": bad.rows, "quarantine_reasons": dict(reasons)}


    # -- model stages -------------------------------------------------------------------------

    def _embed(self) -> dict[str, Any]:
        from corpusforge.embed import embed_chunks

        return embed_chunks(self.ws.dataset("chunks"), self.ws.dataset("embeddings"), self.ws.embedding_cache,
                            self.spec.model, progress=self.progress)

    def _index(self) -> dict[str, Any]:
        from corpusforge.index.bm25 import BM25Index
        from corpusforge.index.dense import DenseIndex

        chunk_ids, vectors = load_vectors(self.ws.dataset("embeddings"))
        chunks = datasets.read_table(self.ws.dataset("chunks"), columns=["chunk_id", "text"])
        if chunks.column("chunk_id").to_pylist() != chunk_ids:
            raise RuntimeError("embeddings are out of step with chunks; rerun with --force")
        dense = DenseIndex.build(vectors, self.spec.index.dense, progress=self.progress)
        dense.save(self.ws.index_dir / "dense")
        texts = chunks.column("text").to_pylist()
        bm25 = BM25Index.build(texts, self.spec.index.bm25)
        bm25.save(self.ws.index_dir / "bm25")
        summary = {"rows": len(chunk_ids), "dense": dense.report(), "bm25": bm25.report()}
        tower_dir = self.ws.index_dir / "query_tower"
        if self.spec.index.query_tower.enabled:
            from corpusforge.query_tower import build_query_tower

            summary["query_tower"] = build_query_tower(self.spec.model, self.spec.index.query_tower, texts,
                                                       tower_dir, progress=self.progress)
        else:
            shutil.rmtree(tower_dir, ignore_errors=True)  # a snapshot never ships a stale tower
        return summary

    def _evaluate(self) -> dict[str, Any]:
        from corpusforge.offline_eval import evaluate_pipeline

        return evaluate_pipeline(self)

    def _publish(self) -> dict[str, Any]:
        from corpusforge.snapshot_build import publish_pipeline

        return publish_pipeline(self)


class _SpecLogging:
    """Enters a RunTracker and logs the spec as the run's params."""

    def __init__(self, tracker, spec: PipelineSpec):
        self._tracker, self._spec = tracker, spec

    def __enter__(self):
        tracker = self._tracker.__enter__()
        tracker.log_spec(self._spec.report())
        return tracker

    def __exit__(self, *exc):
        return self._tracker.__exit__(*exc)


def load_vectors(embeddings_path: Path) -> tuple[list[str], "np.ndarray"]:
    """Read an embeddings dataset into chunk ids and a contiguous float32 matrix.

    Args:
        embeddings_path: the embeddings dataset directory.

    Returns:
        (chunk ids in dataset order, vectors of shape (n, dim)).
    """
    import numpy as np

    table = datasets.read_table(embeddings_path)
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    vectors = np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim),
                                   dtype=np.float32)
    return table.column("chunk_id").to_pylist(), vectors


def token_stats(chunks_path: Path) -> dict[str, float]:
    """Token statistics of a chunks dataset: count, min, mean, median, p95, max of n_tokens."""
    col = datasets.read_table(chunks_path, columns=["n_tokens"]).column("n_tokens")
    if len(col) == 0:
        return {"chunks": 0}
    q = pc.quantile(col, q=[0.5, 0.95]).to_pylist()
    return {
        "chunks": len(col),
        "total": int(pc.sum(col).as_py()),
        "min": int(pc.min(col).as_py()),
        "mean": round(pc.mean(col).as_py(), 1),
        "median": q[0],
        "p95": q[1],
        "max": int(pc.max(col).as_py()),
    }


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return stage


def _exists(path: Path) -> bool:
    return datasets.is_complete(path) if path.suffix == "" else path.exists()
