"""Demo-spec builds through each front end, made once per test session and shared by the
orchestration tests (tests/orchestration/: test_dagster.py, test_airflow.py, test_notebook.py).

Each build gets its own fresh workspace under one temporary folder, so the three snapshots are
produced independently; they are compared by `manifest.json` fields and chunk ids.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "pipelines" / "demo.yaml"
AIRFLOW_VENV = ROOT / ".venv-airflow"

if str(ROOT) not in sys.path:  # dags/ is a top-level folder of the repository
    sys.path.insert(0, str(ROOT))


@functools.cache
def scratch() -> Path:
    """One temporary folder for the session's builds (removed at exit)."""
    path = Path(tempfile.mkdtemp(prefix="corpusforge-orch-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: offline model hub, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@functools.cache
def cli_build(stem: str = "demo") -> Path:
    """`corpusforge run pipelines/<stem>.yaml -w <ws>`; returns the workspace."""
    ws = scratch() / f"cli-{stem}"
    out = subprocess.run([sys.executable, "-m", "corpusforge.cli", "run", str(ROOT / "pipelines" / f"{stem}.yaml"),
                          "-w", str(ws)], capture_output=True, text=True, env=offline_env(), timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return ws


def dagster_job(ws: Path, **storage):
    """The ``corpusforge_build`` job bound to a workspace (and other `StorageResource` settings)."""
    import dagster as dg

    from corpusforge_dagster.assets import ASSETS
    from corpusforge_dagster.jobs import build_job
    from corpusforge_dagster.resources import DeviceResource, StorageResource, TrackingResource, local_ray

    defs = dg.Definitions(assets=ASSETS, jobs=[build_job],
                          resources={"storage": StorageResource(workspace=str(ws), **storage),
                                     "tracking": TrackingResource(), "device": DeviceResource(), "ray_cluster": local_ray()})
    return defs.resolve_job_def("corpusforge_build")


@functools.cache
def dagster_instance():
    """The Dagster instance (in memory) of the shared Dagster build: it holds its materialisations."""
    import dagster as dg

    return dg.DagsterInstance.ephemeral()


@functools.cache
def dagster_build(stem: str = "demo"):
    """The build job run in-process for partition `stem` (the spec observed, then every stage).

    Returns:
        (workspace, result); the run is recorded in `dagster_instance`.
    """
    ws = scratch() / ("dagster" if stem == "demo" else f"dagster-{stem}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = dagster_job(ws).execute_in_process(partition_key=stem, instance=dagster_instance())
    return ws, result


def airflow_bin(name: str) -> str:
    """An executable of the Airflow virtualenv (Airflow lives apart from the main stack)."""
    path = AIRFLOW_VENV / "bin" / name
    assert path.exists(), f"{path} missing: create it with `make airflow-venv` (see docs/orchestration.md)"
    return str(path)


def airflow_env(home: Path, ws: Path, **extra: str) -> dict[str, str]:
    """The environment of an Airflow command: its home and sqlite db, dags/, the workspace, no retries."""
    return offline_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
                       AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
                       AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
                       CORPUSFORGE_WORKSPACE=str(ws),
                       # `dags test` honours retries (minutes apart): a failure should fail the test now.
                       CORPUSFORGE_AIRFLOW_RETRIES="0", **extra)


@functools.cache
def airflow_home(name: str = "dags-test") -> Path:
    """A fresh AIRFLOW_HOME whose sqlite metadata db is migrated, one per `name` for the session.

    `airflow tasks test` and `airflow dags test` do not share one: after a `tasks test` of a DAG,
    a `dags test` of it failed its publish task's outlet check (the asset not yet active).
    """
    home = scratch() / f"airflow-home-{name}"
    home.mkdir(parents=True)
    migrate = subprocess.run([airflow_bin("airflow"), "db", "migrate"], capture_output=True, text=True,
                             env=airflow_env(home, scratch() / "airflow-ws-none"), timeout=600, cwd=ROOT)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    return home


@functools.cache
def airflow_build(stem: str = "demo") -> tuple[Path, str]:
    """`airflow dags test corpusforge_<stem>` (in `airflow_home`) into a fresh workspace.

    Returns:
        (workspace, the combined output of `dags test`).
    """
    ws = scratch() / f"airflow-ws-{stem}"
    test = subprocess.run([airflow_bin("airflow"), "dags", "test", f"corpusforge_{stem}"], capture_output=True,
                          text=True, env=airflow_env(airflow_home(), ws), timeout=1800, cwd=ROOT)
    output = test.stdout + test.stderr
    assert test.returncode == 0, output[-5000:]
    return ws, output


def manifest(ws: Path) -> dict:
    """The manifest of the snapshot a build published (the copy kept in the spec's workspace)."""
    return json.loads((ws / "demo" / "manifest.json").read_text())


def snapshot_dir(ws: Path) -> Path:
    """The published snapshot folder the demo build's alias points at."""
    from corpusforge.snapshots import SnapshotStore

    store = SnapshotStore(str(ws / "snapshots"))
    return ws / "snapshots" / "demo" / store.resolve("demo", "production")


def chunk_ids(ws: Path) -> list[str]:
    """The chunk ids of the published snapshot's chunk store, in order."""
    from corpusforge.data import datasets

    return datasets.read_table(snapshot_dir(ws) / "chunks", columns=["chunk_id"]).column("chunk_id").to_pylist()



def content_digests(ws: Path, name: str) -> dict[str, str]:
    """{path: sha256} of the content files of the snapshot a build's alias points at (not eval/: timings)."""
    from corpusforge.snapshots import SnapshotStore

    store = SnapshotStore(str(ws / "snapshots"))
    files = store.manifest(name, store.resolve(name, "production"))["files"]
    return {f["path"]: f["sha256"] for f in files if not f["path"].startswith("eval/")}
