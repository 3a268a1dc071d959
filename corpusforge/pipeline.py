"""Runs a pipeline spec through the stage graph: skip what is unchanged, commit atomically, summarise.

The stages, their order, inputs, outputs and contracts are declared once in `corpusforge.graph`;
this module only executes them. A stage's fingerprint covers its configuration, its code version
and its upstream stages' fingerprints. A stage is skipped only when the recorded fingerprint of its
last successful run matches and every output is complete and records that same fingerprint
(`datasets.recorded_fingerprint`). Its recorded state is removed before any output is touched;
outputs are committed atomically (see `datasets.DatasetWriter`), then each records the fingerprint
it was built from, and the state is recorded again only after all of them are in place and its data
contracts hold. So a crash or a failed check at any point leaves the stage to be redone on the next
run -- never an older run's state vouching for half-replaced outputs -- and never publishes.

The CLI (`Pipeline.run`), the Dagster assets and the Airflow tasks all call `Pipeline.run_stage`,
which holds the pipeline's workspace lock (`workspace_lock`): one run at a time per workspace.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import gc
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpusforge import graph
from corpusforge.data import datasets
from corpusforge.data.hashing import config_fingerprint
from corpusforge.spec import Overrides, PipelineSpec, apply_overrides, load_spec
from corpusforge.stages import StageContext
from corpusforge.workspace import Workspace
from corpusforge.workspace_lock import workspace_lock

log = logging.getLogger("corpusforge")

STAGES = graph.STAGES

# Facts a stage reports that restate configuration (the spec's as resolved, the model's, a library's)
# rather than measure the build: MLflow params, not metrics. Patterns over `StageResult.flat` keys.
CONFIG_FACTS = ("dim", "device", "k", "split", "model_fingerprint", "*/dim", "*_version", "dense/factory*",
                "dense/metric", "dense/index_type", "dense/shards", "dense/gpu_training", "mining/*",
                "*/*/batch_size")


class StrictModeError(RuntimeError):
    """Raised at the end of a `strict` run that quarantined records."""


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0), so a stage's peak is its own.

    The reset also lowers what ``getrusage`` and ``/usr/bin/time -v`` report as the process's
    maximum: the run's peak is the largest stage peak (the CLI prints it).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere `peak_rss_mb` reports the process's peak so far


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def bound_heap(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more by its own mmap, returned at free.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, so a training
    loop's tensors of many sizes end up in the heap, fragmented and never handed back: the
    bi-encoder's peak RSS grew from 2.5 to 3.0 GB over its first 4 SciFact steps with the default,
    and stayed at 2.5 GB with a fixed 1 MiB threshold (the same losses). Setting the threshold turns
    the adjustment off. An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is left alone.

    Args:
        threshold: bytes; allocations at least this large are mmapped.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass  # not glibc


def release_memory() -> None:
    """Hand freed memory back to the OS between stages.

    Stages run one after another in one process; without this, glibc keeps the arenas a stage
    freed (training leaves gigabytes behind), and every later stage's peak starts from there.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def peak_rss_mb() -> float:
    """The peak resident memory of this process since the last reset, in MB (VmHWM, or ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageResult:
    """What one stage did: the one summary the CLI table, MLflow, Dagster and Airflow all render.

    Attributes:
        stage: the stage name.
        skipped: True when its inputs and config were unchanged and it did no work.
        fingerprint: the fingerprint of its inputs and configuration.
        summary: counts and facts the stage reported (rows, quarantine per reason, metrics, ...).
        seconds: wall time spent (0 when skipped).
        tracking: the MLflow run it was logged to (``tracking_uri``, ``experiment_id``, ``run_id``), when
            it ran through `Pipeline.run_stage_tracked`.
        peak_rss_mb: the process's peak resident memory while the stage ran (0 when skipped); on
            Linux the peak is reset when the stage starts, elsewhere it is the process's peak so far.
    """

    stage: str
    skipped: bool
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tracking: dict[str, str] = field(default_factory=dict)
    peak_rss_mb: float = 0.0

    def flat(self) -> dict[str, str | int | float | bool]:
        """The summary as flat scalars, one spelling per fact for every consumer (CLI, MLflow, Dagster, Airflow).

        Keys are grouped with ``/`` and spelled as MLflow accepts them (``@``, ``+`` ... become ``_``).

        Returns:
            ``stage``, ``skipped``, ``fingerprint``, ``seconds``, the summary's scalar facts
            (``rows``, ``quarantined``, ``version`` ...), ``quarantine/<reason>``,
            ``<split>/<mode>/<metric>`` for evaluation metrics and latencies (``test/dense/ndcg_10``,
            ``dev/hybrid_rerank/ndcg_10``), and ``<part>/<key>`` for nested reports
            (``dense/ntotal``, ``bm25/num_docs``, ``tokens/mean``).
        """
        from corpusforge.tracking.tracker import sanitize_name

        return {sanitize_name(k): v for k, v in self._flat().items()}

    def _flat(self) -> dict[str, Any]:
        s = self.summary
        out: dict[str, Any] = {"stage": self.stage, "skipped": self.skipped, "fingerprint": self.fingerprint,
                               "seconds": round(self.seconds, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}
        for key, value in s.items():
            if isinstance(value, str | int | float | bool) and key not in out:
                out[key] = value
            elif key == "quarantine_reasons":
                out.update({f"quarantine/{reason}": n for reason, n in value.items()})
            elif key == "modes":
                out.update(_mode_metrics(s.get("split", "test"), value))
            elif key == "dev" and isinstance(value, Mapping) and "modes" in value:
                out.update(_mode_metrics("dev", value["modes"]))
            elif key == "query_tower" and isinstance(value, Mapping) and "modes" in value:
                out.update(_mode_metrics(s.get("split", "test"), value["modes"], suffix="-tower"))
            elif isinstance(value, Mapping):
                out.update({f"{key}/{k}": v for k, v in value.items()
                            if isinstance(v, str | int | float | bool) and not isinstance(v, type(None))})
        return out

    def describe(self) -> str:
        """A one-line summary for task logs, e.g. ``ran in 1.2s: rows=41 quarantined=0 ...``."""
        status = "skipped (unchanged)" if self.skipped else f"ran in {self.seconds:.1f}s"
        return f"{status}: " + " ".join(f"{k}={v}" for k, v in self.flat().items())

    def metrics(self) -> dict[str, float]:
        """The numeric facts of `flat` that measure the build (no booleans, no configuration): MLflow metrics."""
        return {k: float(v) for k, v in self.flat().items()
                if isinstance(v, int | float) and not isinstance(v, bool) and not _is_config(k)}

    def params(self) -> dict[str, str | int | float | bool]:
        """The facts of `flat` that restate configuration (`CONFIG_FACTS`: ``dim``, batch sizes, ``k``,
        the FAISS factory as built, library versions...): MLflow params."""
        return {k: v for k, v in self.flat().items() if _is_config(k)}

    def mlflow_key(self, key: str) -> str:
        """The MLflow name of a `flat` key: evaluation metrics keep ``<split>/<mode>/<metric>``; every
        other fact is ``<stage>/<key>``, so the stages of one run never share a name."""
        split = str(self.summary.get("split", "test"))
        if self.stage == "evaluate" and key.count("/") == 2 and key.split("/", 1)[0] in (split, "dev"):
            return key
        return f"{self.stage}/{key}"


def _is_config(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in CONFIG_FACTS)


def _mode_metrics(split: str, modes: Mapping[str, Any], suffix: str = "") -> dict[str, float]:
    out = {}
    for mode, values in modes.items():
        values = {**values.get("metrics", {}), **values.get("latency", {})} if "metrics" in values else values
        out.update({f"{split}/{mode}{suffix}/{k}": v for k, v in values.items() if isinstance(v, int | float)})
    return out


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

    @classmethod
    def open(cls, spec_path: str | Path, workspace: str | Path, overrides: Overrides | None = None) -> "Pipeline":
        """Load a spec, apply an environment's overrides and bind it to a workspace (orchestrator runs).

        Args:
            spec_path: the spec's YAML file.
            workspace: the workspace root (datasets, state, default MLflow store and snapshots).
            overrides: per-environment settings.

        Returns:
            A pipeline without progress bars (orchestrator logs are not terminals): neither its own
            nor the libraries' (`progress.quiet_library_progress`).
        """
        from corpusforge.progress import quiet_library_progress

        quiet_library_progress()
        return cls(apply_overrides(load_spec(spec_path), overrides or Overrides()), workspace=workspace,
                   progress=False)

    def stages(self, until: str | None = None) -> list[str]:
        """The names of the stages this spec runs, in order, up to and including `until`."""
        return [s.name for s in graph.stages_for(self.spec, until)]

    def run(self, until: str | None = None, strict: bool = False,
            on_result: Callable[[StageResult], None] | None = None) -> list[StageResult]:
        """Run every stage of the spec in order, up to and including `until`, as one MLflow run.

        The run starts with the first stage that does work (the skipped stages before it are logged
        into it then), so a rerun that changes nothing creates no MLflow run at all.

        Args:
            until: the last stage to run (default: all of them).
            strict: raise `StrictModeError` after the run when any record was quarantined.
            on_result: called with each stage's result as soon as it finishes.

        Returns:
            The results, one per stage run or skipped.
        """
        stages = self.stages(until)
        results = []
        tracker = None
        with self.lock(), contextlib.ExitStack() as run:
            for stage in stages:
                if tracker is None and not self.unchanged(stage):
                    tracker = run.enter_context(self.tracker(run_name=f"{self.spec.name}-{stages[-1]}"))
                    tracker.set_tags({"corpusforge.until": stages[-1]})
                    for earlier in results:
                        self.log_result(tracker, earlier)
                result = self.run_stage(stage, tracker=tracker)
                results.append(result)
                if tracker is not None:
                    self.log_result(tracker, result)
                if on_result:
                    on_result(result)
        if tracker is None:
            log.info("nothing changed: no MLflow run recorded")
            self._repoint_local_store()  # a copied workspace's `mlflow ui` reads its own artifacts all the same
        quarantined = sum(r.summary.get("quarantined", 0) for r in results)
        if strict and quarantined:
            raise StrictModeError(f"{quarantined} record(s) quarantined (strict mode)")
        return results

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: the spec's ``tracking.uri``, else SQLite in the workspace."""
        return self.spec.tracking.uri or self.ws.tracking_uri

    def _repoint_local_store(self) -> None:
        """Re-point a copied or moved local SQLite store's artifact URIs (`tracking.tracker.repoint_artifacts`)."""
        from corpusforge.tracking.tracker import repoint_artifacts, sqlite_path

        uri = self.tracking_uri
        db = sqlite_path(uri)
        if db is not None and db.is_file():
            with _sqlite_setup_lock(uri):
                repoint_artifacts(db)

    def lock(self):
        """The workspace lock of this pipeline (`workspace_lock.workspace_lock`), re-entrant in a thread.

        Returns:
            A context manager; entering it raises `workspace_lock.WorkspaceBusyError` when another
            run holds the lock.
        """
        return workspace_lock(self.ws.base)

    def tracker(self, run_name: str | None = None, parent_run_id: str | None = None,
                orchestrator: str | None = None):
        """An MLflow run for this pipeline (the spec's tracking URI, else sqlite in the workspace).

        Args:
            run_name: the run's name in the MLflow UI.
            parent_run_id: nests the run under that one (an orchestrated build's run).
            orchestrator: ``dagster`` / ``airflow`` when an orchestrator runs the stage.

        Returns:
            A started-on-enter `tracking.RunTracker` with the spec logged as params.
        """
        return _SpecLogging(self.run_tracker(run_name, parent_run_id, orchestrator), self.spec)

    def run_tracker(self, run_name: str | None = None, parent_run_id: str | None = None,
                    orchestrator: str | None = None):
        """An unstarted `tracking.RunTracker` for this pipeline: its store and experiment (described by
        the spec's description), pipeline, workspace, source and git tags (`tracking.runs.source_tags`)."""
        from corpusforge.tracking.runs import source_tags
        from corpusforge.tracking.tracker import RunTracker

        tracking = self.spec.tracking
        tags = {"corpusforge.pipeline": self.spec.name, "corpusforge.workspace": str(self.ws.root),
                **source_tags(self.spec.base_dir, orchestrator)}
        return RunTracker(self.tracking_uri, tracking.experiment or self.spec.name,
                          run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                          description=self.spec.description or None)

    def log_result(self, tracker, result: StageResult) -> None:
        """Log a stage's result to an MLflow run: status, metrics and params (`tracking.runs.log_stage`),
        its input datasets, and its artifacts."""
        from corpusforge.tracking.runs import log_stage

        log_stage(tracker, self, result)
        if result.stage == "evaluate":
            for path in sorted(self.ws.eval_dir.glob("*")):
                tracker.log_artifact(path, artifact_path="eval")
        if result.stage == "publish" and (self.ws.base / "manifest.json").exists():
            s = result.summary
            tracker.log_artifact(self.ws.base / "manifest.json")
            tracker.set_tags({"snapshot.version": s.get("version", ""), "snapshot.alias": s.get("alias", ""),
                              "snapshot.promoted": str(s.get("promoted", ""))})

    def run_stage_tracked(self, stage: str, orchestrator: str, run_id: str) -> StageResult:
        """Run (or skip) one stage as its own MLflow run, nested under the orchestrated build's run.

        Each orchestrator step is its own process, so each stage that does work gets its own MLflow
        run (``<spec>-<stage>``), nested (``mlflow.parentRunId``) under one parent run per
        orchestrator run (`tracking.runs.build_run`: found by the orchestrator's run id, else created),
        which also carries every stage's facts and the build's status. All are tagged
        ``corpusforge.orchestrator`` and ``corpusforge.orchestrator_run_id``. An unchanged stage
        records no run (``tracking`` stays empty).

        Args:
            stage: one of the spec's stages.
            orchestrator: ``dagster`` or ``airflow``.
            run_id: the orchestrator's run id.

        Returns:
            The stage's result; ``tracking`` names its run and the parent (``parent_run_id``).

        Raises:
            WorkspaceBusyError: another run holds the workspace (taken before any MLflow run starts).
        """
        from corpusforge.tracking.runs import build_run, settle_build_run

        with self.lock():
            if self.unchanged(stage):
                result = self.run_stage(stage)
            else:
                with _sqlite_setup_lock(self.tracking_uri):
                    parent = build_run(self, orchestrator, run_id)
                try:
                    with self.tracker(run_name=f"{self.spec.name}-{stage}", parent_run_id=parent.run_id,
                                      orchestrator=orchestrator) as tracker:
                        tracker.set_tags({"corpusforge.orchestrator": orchestrator,
                                          "corpusforge.orchestrator_run_id": run_id, "corpusforge.stage": stage,
                                          "corpusforge.until": stage})
                        result = self.run_stage(stage, tracker=tracker)
                        self.log_result(tracker, result)
                        result.tracking = {"tracking_uri": tracker.tracking_uri,
                                           "experiment_id": tracker.experiment_id, "run_id": tracker.run_id,
                                           "parent_run_id": parent.run_id}
                    self.log_result(parent, result)
                finally:
                    settle_build_run(parent)
        logging.getLogger("corpusforge.orchestration").info("%s %s: %s", self.spec.name, stage, result.describe())
        return result

    def run_stage(self, stage: str, tracker=None) -> StageResult:
        """Run one stage (its upstream stages must have run), or skip it when unchanged.

        Args:
            stage: one of the spec's stages (`stages`).
            tracker: the MLflow run the stage logs into (trained models are registered there).

        Returns:
            The stage's result.

        Raises:
            WorkspaceBusyError: another run holds the workspace.
        """
        st = graph.stage(stage)
        if not st.enabled(self.spec):
            raise ValueError(f"stage {stage!r} is not part of pipeline {self.spec.name!r} (train.enabled is false)")
        with self.lock():
            fingerprint = self.fingerprint(stage)
            if self.unchanged(stage):
                log.info("%s: unchanged, skipped", stage)
                return StageResult(stage, True, fingerprint, self.ws.read_state(stage).get("summary", {}))
            # Forget the last run before touching any output: killed from here on, the stage is redone
            # next time instead of an older state vouching for half-replaced outputs.
            self.ws.clear_state(stage)
            bound_heap()
            _reset_peak_rss()
            started = time.perf_counter()
            ctx = StageContext(self.spec, self.ws, self.progress, fingerprint, tracker)
            try:
                summary = st.function()(ctx)
            finally:
                del ctx
                release_memory()
            for output in st.outputs(self.ws, self.spec):  # all in place: each records what built it
                if datasets.recorded_fingerprint(output) != fingerprint:
                    datasets.record_fingerprint(output, fingerprint)
            seconds, peak = time.perf_counter() - started, peak_rss_mb()
            self.ws.write_state(stage, {"fingerprint": fingerprint, "summary": summary, "seconds": seconds,
                                        "peak_rss_mb": peak,
                                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log.info("%s: done in %.1fs, peak RSS %.0f MB (%s rows, %s quarantined)", stage, seconds, peak,
                 summary.get("rows", "-"), summary.get("quarantined", 0))
        return StageResult(stage, False, fingerprint, summary, seconds, peak_rss_mb=peak)

    def unchanged(self, stage: str) -> bool:
        """Whether `run_stage` would skip the stage: not forced, its recorded fingerprint matches, and
        every output is complete and records that fingerprint (orchestrators ask this to decide what
        a run will redo)."""
        st = graph.stage(stage)
        state = self.ws.read_state(stage)
        fingerprint = self.fingerprint(stage)
        return bool(not self.force and state and state.get("fingerprint") == fingerprint
                    and all(_exists(p) and datasets.recorded_fingerprint(p) == fingerprint
                            for p in st.outputs(self.ws, self.spec))
                    and self._still_valid(stage, state))

    def fingerprint(self, stage: str) -> str:
        """The fingerprint of a stage's configuration, code version and upstream fingerprints."""
        if stage not in self._fingerprints:
            st = graph.stage(stage)
            deps = graph.deps_for(self.spec, stage)
            upstream = [self.fingerprint(d) for d in deps] if deps else self._source_fingerprint()
            self._fingerprints[stage] = config_fingerprint(stage, st.code_version, st.config(self.spec), upstream)
        return self._fingerprints[stage]

    def _source_fingerprint(self) -> str:
        """The source's fingerprint; a ``source.fetch`` dataset that is absent is fetched first, here,
        so every runner (CLI, Dagster, Airflow, Ray) gets it, not only ``corpusforge run``."""
        from corpusforge.data import fs
        from corpusforge.data.benchmarks import ensure_source

        fetched = ensure_source(self.spec, self.ws.root, progress=self.progress)
        if fetched is not None:
            log.info("%s", fetched.describe())
        return fs.fingerprint(self.spec.source_uri, endpoint_url=self.spec.source.s3_endpoint_url)

    def _still_valid(self, stage: str, state: dict[str, Any]) -> bool:
        """Outputs outside the workspace (published snapshots) must still exist to skip."""
        if stage != "publish":
            return True
        from corpusforge.snapshots.build import published_version_exists

        return published_version_exists(self.spec, self.ws, state.get("summary", {}).get("version", ""))


class _SpecLogging:
    """Enters a RunTracker and logs the spec as the run's params."""

    def __init__(self, tracker, spec: PipelineSpec):
        self._tracker, self._spec = tracker, spec

    def __enter__(self):
        with _sqlite_setup_lock(self._tracker.tracking_uri):
            tracker = self._tracker.__enter__()
        tracker.log_spec(self._spec.report())
        return tracker

    def __exit__(self, *exc):
        return self._tracker.__exit__(*exc)


def _sqlite_setup_lock(tracking_uri: str):
    """Serialise MLflow's first use of a SQLite store: pipelines of different specs share one store
    per workspace root, and two processes creating its tables at once fail ("duplicate column
    name"). A blocking lock beside the database file; nothing for other stores."""
    from filelock import FileLock

    from corpusforge.tracking.tracker import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=300)


def _exists(path: Path) -> bool:
    return datasets.is_complete(path) if path.suffix == "" else path.exists()
