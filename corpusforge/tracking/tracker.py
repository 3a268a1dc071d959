"""Experiment tracking in MLflow: one `RunTracker` per pipeline run, no server needed.

The default store is a local SQLite file in the workspace (``<workspace>/mlflow.db``) with run
artifacts under ``<workspace>/mlartifacts``; point ``mlflow ui --backend-store-uri
sqlite:///<workspace>/mlflow.db`` at it to browse. A remote tracking server works the same way
through its ``http(s)://`` URI.

The local default is portable: MLflow records absolute artifact URIs (each experiment's, run's,
logged model's and model version's, fixed when created; a relative location is resolved against
the current directory, not the store), so a copied or moved workspace would keep reading and
writing the old folder. Opening a SQLite store therefore re-points every artifact URI under a
``.../mlartifacts`` folder that is not the one beside the database to that folder
(`repoint_artifacts`), before MLflow touches the store.

A new local store is a copy of an empty store cached once per MLflow version (`new_local_store`):
MLflow builds a SQLite store by running every Alembic migration of its schema, 3.7 s on a 2-core
CPU, which every fresh workspace (every test, every new root) would pay again.

MLflow is imported lazily (it takes a second or more), only when a tracker starts. Its INFO
chatter (database migrations, ...) is turned down to WARNING unless ``MLFLOW_LOGGING_LEVEL`` is
set, and its usage telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` is set explicitly:
pipelines often run without network access.

Names are made MLflow-safe here, so callers may log ``{"ndcg@10": ...}`` directly: characters
outside ``[A-Za-z0-9_-. /]`` become ``_`` (``test/hybrid/ndcg@10`` -> ``test/hybrid/ndcg_10``).
Metric names are grouped with ``/`` (``<split>/<mode>/<metric>``, ``<stage>/<fact>``).
Param values are cut to 500 characters (the limit of older MLflow servers; the full spec is
always logged as the ``spec.json`` artifact).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

PARAM_VALUE_LIMIT = 500  # portable: MLflow < 2.x servers and many hosted stores reject longer values
KEY_LIMIT = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
TAG_VALUE_LIMIT = 5000  # below every MLflow version's tag limit
TRUNCATION_MARK = "...[truncated]"
DIGEST_LIMIT = 36  # MLflow's MAX_DATASET_DIGEST_SIZE
ARTIFACTS_FOLDER = "mlartifacts"  # beside the SQLite file
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as an experiment's / run's description
# (table, column) holding artifact URIs in MLflow's SQL schema (MLflow 3); tables a store lacks are skipped.
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_log = logging.getLogger(__name__)


def _import_mlflow():
    """Import MLflow on first use, quietly; returns the module."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


def default_tracking_uri(workspace: str | Path) -> str:
    """The default tracking store of a workspace: a SQLite file inside it.

    Args:
        workspace: the pipeline workspace directory.

    Returns:
        ``sqlite:///<absolute workspace>/mlflow.db``.
    """
    return f"sqlite:///{(Path(workspace).expanduser().resolve() / 'mlflow.db').as_posix()}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where experiments created in a SQLite store keep their artifacts.

    Args:
        tracking_uri: a tracking URI.

    Returns:
        For ``sqlite:///<dir>/<file>``: the file URI of ``<dir>/mlartifacts``. For any other store
        (a tracking server, which picks its own): None.
    """
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.parent / ARTIFACTS_FOLDER).as_uri()


def schema_cache_dir() -> Path:
    """Where empty, migrated MLflow stores are cached (`new_local_store`).

    Returns:
        ``$CORPUSFORGE_MLFLOW_SCHEMA_CACHE``, else ``~/.cache/corpusforge/mlflow-schema``.
    """
    env = os.environ.get("CORPUSFORGE_MLFLOW_SCHEMA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "corpusforge" / "mlflow-schema"


def new_local_store(db: str | Path) -> bool:
    """Create an empty MLflow SQLite store at `db` (when there is none) from a cached empty store.

    The cached store (one per MLflow version, made by MLflow itself on first use, in
    `schema_cache_dir`) holds MLflow's migrated schema and no experiment: MLflow adds its Default
    experiment when it first opens the copy, as it does in a store it builds. The copy is linked
    into place, so a store that another process created meanwhile is never replaced.

    Args:
        db: the SQLite database file to create.

    Returns:
        True when this call created the store, False when it existed already.
    """
    db = Path(db)
    if db.exists():
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
    shutil.copyfile(_empty_store(), tmp)
    try:
        os.link(tmp, db)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _empty_store() -> Path:
    """The cached empty store of the installed MLflow version, made by MLflow when missing."""
    mlflow = _import_mlflow()
    path = schema_cache_dir() / f"mlflow-{mlflow.__version__}.db"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{built.as_posix()}").search_experiments()  # migrates
        con = sqlite3.connect(built)
        try:
            with con:  # the Default experiment is made again in each copy, where MLflow puts it
                con.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
        finally:
            con.close()
        os.replace(built, path)  # every process builds the same file: the last rename wins, harmlessly
    return path


def repoint_artifacts(db: str | Path) -> dict[str, str]:
    """Point a copied or moved SQLite store's artifact URIs at the ``mlartifacts`` folder beside it.

    An experiment whose artifact location is a local ``.../mlartifacts`` folder other than the one
    beside ``db`` (the default location of a store that has since been copied or moved) is
    re-pointed, with every run, logged model and model version whose artifact URI lies under the
    old folder, in one transaction. Other locations (a server's, S3, a custom folder) are left alone.

    Args:
        db: the SQLite database file (nothing happens when it does not exist yet).

    Returns:
        ``{old root URI: new root URI}`` for each root re-pointed (empty when nothing moved).
    """
    db = Path(db)
    if not db.is_file():
        return {}
    new_root = (db.resolve().parent / ARTIFACTS_FOLDER).as_uri()
    con = sqlite3.connect(db, timeout=60)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return {}
        moved = sorted({loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                        if _is_default_root(loc) and loc.rstrip("/") != new_root})
        if not moved:
            return {}
        with con:  # one transaction: all or nothing
            for old in moved:
                old = old.rstrip("/")
                for table, column in _ARTIFACT_COLUMNS:
                    if table in tables:
                        con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608
                                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                    (new_root, len(old) + 1, old, len(old) + 1, f"{old}/"))
        _log.info("MLflow store %s was moved or copied: artifact locations %s re-pointed to %s", db, moved, new_root)
        return {old: new_root for old in moved}
    finally:
        con.close()


def _is_default_root(location: str | None) -> bool:
    """A local ``file://`` (or plain path) location whose last folder is ``mlartifacts``."""
    if not location or ("://" in location and not location.startswith("file://")):
        return False
    return location.rstrip("/").rsplit("/", 1)[-1] == ARTIFACTS_FOLDER


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other URIs.

    Args:
        tracking_uri: a tracking URI.

    Returns:
        The absolute path of the SQLite file, or None.

    Raises:
        ValueError: an in-memory SQLite URI (no folder to keep artifacts beside).
    """
    if not tracking_uri.startswith("sqlite://"):
        return None
    # SQLAlchemy form: sqlite:///relative.db, sqlite:////absolute.db (query string ignored).
    rest = tracking_uri[len("sqlite://") :].split("?", 1)[0]
    path = rest[1:] if rest.startswith("/") else rest
    if not path or path == ":memory:":
        raise ValueError(f"tracking URI {tracking_uri!r}: need a SQLite file, e.g. sqlite:////abs/path/mlflow.db")
    return Path(path).resolve()


def sanitize_name(name: str) -> str:
    """Make a metric / param / tag key acceptable to MLflow on every platform.

    Characters outside ``[A-Za-z0-9_-. /]`` become ``_`` (so ``ndcg@10`` -> ``ndcg_10``), empty and
    ``.`` path segments are dropped (MLflow rejects keys that normalise to another path), and keys
    over 250 characters are shortened with a hash suffix so distinct keys stay distinct.

    Args:
        name: any string.

    Returns:
        A valid key.

    Raises:
        ValueError: nothing usable remains (an empty name).
    """
    cleaned = _BAD_NAME_CHARS.sub("_", name)
    parts = [("__" if p == ".." else p) for p in cleaned.split("/") if p not in ("", ".")]
    key = "/".join(parts)
    if not key.strip():
        raise ValueError(f"cannot make an MLflow key from {name!r}")
    if len(key) > KEY_LIMIT:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        key = f"{key[: KEY_LIMIT - 11]}-{digest}"
    return key


def truncate_value(value: str, limit: int = PARAM_VALUE_LIMIT) -> str:
    """Cut a value to ``limit`` characters, marking the cut.

    Args:
        value: the string.
        limit: the maximum length.

    Returns:
        The value itself when short enough, else its head followed by ``...[truncated]``.
    """
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_text(value: Any) -> str:
    """Scalars as text, containers as compact JSON, so a param reads like the spec."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys; lists and scalars are leaves.

    Args:
        obj: a nested mapping (e.g. ``spec.report()``).
        prefix: prepended to every key.

    Returns:
        ``{"index.dense.factory": "HNSW32,Flat", ...}``; an empty mapping is kept as ``{}``.
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _as_plain(spec: Any) -> dict[str, Any]:
    """A spec given as a mapping or a pydantic model, as JSON-ready plain data."""
    if hasattr(spec, "model_dump"):
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(spec, default=str))
    raise TypeError(f"log_spec expects a mapping or a pydantic model, got {type(spec).__name__}")


class RunTracker:
    """One MLflow run as a context manager; ends FINISHED, or FAILED if the block raises.

    Uses an explicit ``MlflowClient`` (no global "active run"), so several trackers, threads or
    stores can coexist in one process.

    Example::

        with RunTracker(default_tracking_uri(ws), "scifact", run_name="eval") as t:
            t.log_spec(spec.report())
            t.log_metrics(result.mean, prefix="test/bm25/")

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://...``, ...).
        experiment: experiment name; created when missing (SQLite stores: with its artifacts
            under ``<db dir>/mlartifacts``).
        run_name: the run's display name.
        tags: extra run tags.
        artifact_location: overrides where a newly created experiment stores artifacts.
        parent_run_id: makes this a nested (child) run of that run.
        description: the experiment's description (shown by the MLflow UI), set when it differs.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
        parent_run_id: str | None = None,
        description: str | None = None,
    ):
        if not experiment or not experiment.strip():
            raise ValueError("experiment name must not be empty")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.artifact_location = artifact_location or default_artifact_location(tracking_uri)
        self.parent_run_id = parent_run_id
        self.description = description
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._logged_params: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def client(self) -> "MlflowClient":
        """The MLflow client bound to this tracker's store (created on first use)."""
        if self._client is None:
            mlflow = _import_mlflow()
            db = sqlite_path(self.tracking_uri)
            if db is not None:
                new_local_store(db)
                repoint_artifacts(db)  # a copied or moved workspace writes to its own artifacts
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The MLflow run id. Raises RuntimeError before the run starts."""
        if self._run_id is None:
            raise RuntimeError("the run has not started: use `with RunTracker(...) as t:` or call start()")
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id (the experiment is created when missing)."""
        if self._experiment_id is None:
            self._experiment_id = self._ensure_experiment()
        return self._experiment_id

    @property
    def artifact_uri(self) -> str:
        """Where this run's artifacts live."""
        return self.client.get_run(self.run_id).info.artifact_uri

    def _ensure_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                tags = {DESCRIPTION_TAG: self.description} if self.description else None
                return client.create_experiment(self.experiment, artifact_location=self.artifact_location, tags=tags)
            except MlflowException as exc:  # another process created it meanwhile
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise RuntimeError(f"cannot create MLflow experiment {self.experiment!r}: {exc}") from exc
        if exp.lifecycle_stage != "active":
            raise RuntimeError(
                f"MLflow experiment {self.experiment!r} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another name"
            )
        if self.description and exp.tags.get(DESCRIPTION_TAG) != self.description:
            client.set_experiment_tag(exp.experiment_id, DESCRIPTION_TAG, self.description)
        return exp.experiment_id

    def start(self) -> "RunTracker":
        """Start the run (what entering the context does).

        Returns:
            self.
        """
        if self._run_id is not None:
            raise RuntimeError(f"run {self._run_id} already started")
        from corpusforge import __version__

        tags = {"corpusforge.version": __version__, **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        tags = {sanitize_name(k): truncate_value(str(v), TAG_VALUE_LIMIT) for k, v in tags.items()}
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self._run_id = run.info.run_id
        return self

    def attach(self, run_id: str) -> "RunTracker":
        """Log to an existing run of this store (e.g. an orchestrated build's parent run) instead of a new one.

        Args:
            run_id: the run.

        Returns:
            self (not a context manager's run: `end` it explicitly if at all).
        """
        if self._run_id is not None:
            raise RuntimeError(f"run {self._run_id} already started")
        run = self.client.get_run(run_id)
        self._experiment_id, self._run_id = run.info.experiment_id, run.info.run_id
        self._logged_params = dict(run.data.params)
        return self

    def end(self, status: str = "FINISHED") -> None:
        """End the run.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        """
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "RunTracker":
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        try:
            self.set_tags({"corpusforge.error": f"{exc_type.__name__}: {exc}"})
        except Exception:  # noqa: BLE001 - never mask the original error
            _log.warning("could not record the error on MLflow run %s", self._run_id, exc_info=True)
        self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> "RunTracker":
        """A nested run under this one (same store and experiment); use it as a context manager.

        Args:
            run_name: the child's name.
            tags: the child's extra tags.

        Returns:
            An unstarted :class:`RunTracker`.
        """
        return RunTracker(
            self.tracking_uri, self.experiment, run_name=run_name, tags=tags,
            artifact_location=self.artifact_location, parent_run_id=self.run_id,
        )

    # -- logging -------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log params (flat keys), values as text cut to 500 characters, in batches of 100.

        Args:
            params: ``{key: value}``; keys are sanitised, values stringified (containers as JSON).

        Returns:
            The ``{key: value}`` actually logged.

        Raises:
            ValueError: a key was already logged with a different value (MLflow params are
                immutable) or two keys sanitise to the same name with different values.
        """
        from mlflow.entities import Param

        staged: dict[str, str] = {}
        for key, value in params.items():
            k, v = sanitize_name(str(key)), truncate_value(_param_text(value))
            previous = staged.get(k, self._logged_params.get(k))
            if previous is not None and previous != v:
                raise ValueError(f"param {key!r} (as {k!r}) already logged with value {previous!r}; got {v!r}")
            if k not in self._logged_params:
                staged[k] = v
        items = [Param(k, v) for k, v in staged.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])
        self._logged_params.update(staged)
        return staged

    def log_spec(self, spec: Any, artifact_file: str = "spec.json") -> dict[str, str]:
        """Log a pipeline spec: flattened dotted params, and the whole spec as a JSON artifact.

        Args:
            spec: a mapping (e.g. ``PipelineSpec.report()``) or a pydantic model.
            artifact_file: the artifact holding the full, untruncated spec.

        Returns:
            The params logged.
        """
        plain = _as_plain(spec)
        self.log_dict(plain, artifact_file)
        digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
        self.set_tags({"corpusforge.spec_sha256": digest})
        return self.log_params(flatten(plain))

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = ""
    ) -> dict[str, float]:
        """Log numeric metrics; names are sanitised (``@`` -> ``_``) after the prefix is added.

        Args:
            metrics: ``{name: number}``; None values are skipped (absent, not zero).
            step: the step (epoch, sweep index); 0 when None.
            prefix: prepended to every name, e.g. ``"test/hybrid/"``.

        Returns:
            The ``{name: value}`` actually logged.

        Raises:
            TypeError: a value is not a real number.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        logged: dict[str, float] = {}
        for name, value in metrics.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
                raise TypeError(f"metric {prefix}{name!r}: expected a number, got {type(value).__name__}")
            logged[sanitize_name(f"{prefix}{name}")] = float(value)
        items = [Metric(k, v, now, step or 0) for k, v in logged.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])
        if any(math.isnan(v) for v in logged.values()):
            _log.warning("NaN metric values logged to run %s: %s", self.run_id,
                         [k for k, v in logged.items() if math.isnan(v)])
        return logged

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (keys sanitised, values as text cut to 5,000 characters).

        Args:
            tags: ``{key: value}``.
        """
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_name(str(k)), truncate_value(str(v), TAG_VALUE_LIMIT)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + PARAMS_PER_BATCH])

    def log_dataset(self, name: str, digest: str, uri: str, context: str, *, rows: int | None = None,
                    schema: pa.Schema | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Record a dataset the run used (``mlflow.log_input``), by reference: name, digest, location.

        Args:
            name: the dataset's name, e.g. ``documents_clean``.
            digest: a content hash; MLflow keeps at most 36 characters, so a longer one is cut
                (the full value is kept in the profile as ``digest``).
            uri: where it lives (a local path or ``s3://...``).
            context: how the run used it (MLflow's ``mlflow.data.context`` input tag), e.g.
                ``corpus``, ``evaluation``, ``training``.
            rows: its row count (in the profile).
            schema: its Arrow schema (shown as columns).
            tags: extra input tags.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        location = uri if "://" in uri else Path(uri).resolve().as_uri()
        columns = [{"name": f.name, "type": _colspec_type(f.type), "required": not f.nullable} for f in schema or []]
        profile = {"digest": digest, **({"num_rows": rows} if rows is not None else {})}
        entity = Dataset(name=name, digest=digest[:DIGEST_LIMIT] if len(digest) > DIGEST_LIMIT else digest,
                         source_type="s3" if location.startswith("s3://") else "local",
                         source=json.dumps({"uri": location}),
                         schema=json.dumps({"mlflow_colspec": columns}) if columns else None,
                         profile=json.dumps(profile))
        input_tags = [InputTag("mlflow.data.context", context)] + [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, input_tags)])

    def log_dict(self, obj: Any, name: str) -> None:
        """Log a JSON-serialisable object as an artifact (``.yaml``/``.yml`` names give YAML).

        Args:
            obj: the object (a dict, list, ...).
            name: the run-relative artifact path, e.g. ``"eval/test.json"``.
        """
        self.client.log_dict(self.run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        """Log a text artifact.

        Args:
            text: the content.
            name: the run-relative artifact path.
        """
        self.client.log_text(self.run_id, text, name)

    def log_table(self, table: pa.Table, name: str) -> str:
        """Log an Arrow table as a Parquet (default) or CSV (``name`` ending in ``.csv``) artifact.

        Args:
            table: the table.
            name: run-relative path; ``.parquet`` is appended unless it ends in .parquet or .csv.

        Returns:
            The run-relative artifact path written.
        """
        if not name.endswith((".parquet", ".csv")):
            name = f"{name}.parquet"
        folder, _, filename = name.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="corpusforge-mlflow-") as tmp:
            path = Path(tmp) / filename
            if filename.endswith(".csv"):
                import pyarrow.csv as pacsv

                pacsv.write_csv(table, path)
            else:
                import pyarrow.parquet as pq

                pq.write_table(table, path)
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)
        return name

    def log_figure(self, figure: Any, name: str | None = None) -> str:
        """Log a plot: a matplotlib figure (saved as ``name``) or an image file already on disk.

        Args:
            figure: a ``matplotlib.figure.Figure`` or a path to an image file.
            name: run-relative path; for a figure it defaults to ``figures/figure.png``, for a file
                to ``figures/<file name>``.

        Returns:
            The run-relative artifact path written.
        """
        if isinstance(figure, str | os.PathLike):
            path = Path(figure)
            name = name or f"figures/{path.name}"
            folder, _, filename = name.rpartition("/")
            if filename != path.name:
                raise ValueError(f"log_figure: a file keeps its name; got {path.name!r} and {name!r}")
            self.log_artifact(path, folder or None)
            return name
        name = name or "figures/figure.png"
        self.client.log_figure(self.run_id, figure, name)
        return name

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a local file or directory.

        Args:
            path: the file or directory.
            artifact_path: run-relative folder to put it in.

        Raises:
            FileNotFoundError: the path does not exist.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def list_artifacts(self, path: str | None = None) -> list[str]:
        """Every artifact file of the run, recursively, as run-relative paths.

        Args:
            path: a run-relative folder to start from.

        Returns:
            Sorted artifact paths.
        """
        out: list[str] = []
        stack = [path]
        while stack:
            for info in self.client.list_artifacts(self.run_id, stack.pop()):
                (stack.append(info.path) if info.is_dir else out.append(info.path))
        return sorted(out)


def _colspec_type(t: pa.DataType) -> str:
    """An Arrow type as an MLflow column type name (lists and structs as ``binary``: opaque)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        return "long" if t.bit_width > 32 else "integer"
    if pa.types.is_floating(t):
        return "double" if t.bit_width > 32 else "float"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "datetime"
    return "binary"


def log_eval(tracker: RunTracker, results: Mapping[str, Any], split: str = "test") -> dict[str, float]:
    """Log several retrieval modes' evaluation results under ``<split>/<mode>/<metric>``.

    Args:
        tracker: a started tracker.
        results: ``{mode: EvalResult}`` (anything with ``.mean`` and ``.to_table()``).
        split: the qrels split, e.g. ``test``.

    Returns:
        All metrics logged.
    """
    logged: dict[str, float] = {}
    for mode, result in results.items():
        logged |= tracker.log_metrics(result.mean, prefix=f"{split}/{mode}/")
        tracker.log_table(result.to_table(), f"eval/{split}/{mode}_per_query.parquet")
    return logged

