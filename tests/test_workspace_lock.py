"""One run at a time per pipeline workspace: real concurrent processes (CLI, Dagster, Airflow's path).

The first run is frozen (SIGSTOP, by `kill_at.py`) at a known point while it holds the lock, so
the second run always meets a held lock: no timing is involved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corpusforge.workspace_lock import INFO_FILE, WorkspaceBusyError, read_holder, workspace_lock

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "pipelines" / "demo.yaml"
KILL_AT = Path(__file__).resolve().parent / "kill_at.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "300"}
BUSY_EXIT = 5


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corpusforge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=600)


def start_at(action: str, event: str, arg: int, glob: str, *args) -> subprocess.Popen:
    """`corpusforge <args>` in the background, sent `action` (stop|kill) at the first matching event."""
    return subprocess.Popen([sys.executable, str(KILL_AT), action, event, str(arg), glob, "--", *map(str, args)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_stopped(proc: subprocess.Popen) -> None:
    """Until `proc` is frozen by its own SIGSTOP (or has ended, which fails the test)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} before stopping: {proc.stderr.read()[-3000:]}"
        if Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the first run never reached its stop point")


# The first run stops right after recording its extract stage, holding the workspace lock.
AFTER_EXTRACT = ("open", 0, "*/demo/state/extract.json.tmp")


def test_a_second_run_on_a_busy_workspace_exits_5_at_once_naming_the_first(tmp_path):
    ws = tmp_path / "ws"
    first = start_at("stop", *AFTER_EXTRACT, "run", DEMO, "-w", ws, "--until", "clean")
    try:
        wait_stopped(first)
        second = cli("run", DEMO, "-w", ws, "--until", "clean")
        assert second.returncode == BUSY_EXIT, second.stdout[-2000:] + second.stderr[-3000:]
        message = " ".join((second.stdout + second.stderr).split())
        assert f"workspace {ws.resolve() / 'demo'} is busy" in message and f"pid {first.pid} " in message
        assert "Traceback" not in second.stderr
        assert not (ws / "demo" / "state" / "clean.json").exists(), "the refused run touched nothing"
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "peak RSS of this run: " in " ".join(err.split())  # the largest stage peak (`time -v` sees the last)
    assert not (ws / "demo" / INFO_FILE).exists(), "a finished run leaves no lock record"
    again = cli("run", DEMO, "-w", ws, "--until", "clean")
    assert again.returncode == 0 and again.stderr.count("skipped (unchanged)") == 2, again.stderr[-3000:]
    assert "peak RSS of this run" not in again.stderr  # nothing ran


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    ws = tmp_path / "ws"
    dead = start_at("kill", *AFTER_EXTRACT, "run", DEMO, "-w", ws, "--until", "clean")
    dead.communicate(timeout=600)
    assert dead.returncode == -signal.SIGKILL
    assert read_holder(ws / "demo")["pid"] == dead.pid  # its record outlives it
    after = cli("run", DEMO, "-w", ws, "--until", "clean")
    assert after.returncode == 0, after.stderr[-3000:]
    log = " ".join(after.stderr.split())
    assert f"taking over the lock of pid {dead.pid}" in log and "no longer running" in log
    assert not (ws / "demo" / INFO_FILE).exists()


def test_dagster_and_airflow_stages_obey_the_lock_of_a_cli_run(tmp_path):
    """Dagster assets and Airflow tasks run each stage through `Pipeline.run_stage_tracked` (the
    Airflow task body calls it as is; Dagster is exercised through a real in-process materialisation)."""
    import dagster as dg

    from corpusforge.pipeline import Pipeline
    from corpusforge_dagster.assets import STAGE_ASSETS
    from corpusforge_dagster.resources import DeviceResource, StorageResource, TrackingResource, local_ray

    ws = tmp_path / "ws"
    first = start_at("stop", *AFTER_EXTRACT, "run", DEMO, "-w", ws, "--until", "clean")
    try:
        wait_stopped(first)
        with pytest.raises(WorkspaceBusyError, match=f"pid {first.pid} "):
            Pipeline.open(DEMO, ws).run_stage_tracked("extract", "airflow", "manual__1")
        extract = next(a for a in STAGE_ASSETS if a.op.name == "extract")
        result = dg.materialize([extract], partition_key="demo", instance=dg.DagsterInstance.ephemeral(),
                                resources={"storage": StorageResource(workspace=str(ws)),
                                           "tracking": TrackingResource(), "device": DeviceResource(), "ray_cluster": local_ray()},
                                raise_on_error=False)
        assert not result.success
        cause = result.get_step_failure_events()[0].step_failure_data.error.cause  # under Dagster's wrapper
        assert cause.cls_name == "WorkspaceBusyError" and f"pid {first.pid} " in cause.message
    finally:
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=600)
    assert first.returncode == 0
    # Free again: the orchestrator's stage runs (here: skips, the CLI run did it).
    assert Pipeline.open(DEMO, ws).run_stage_tracked("extract", "airflow", "manual__2").skipped


def test_two_specs_sharing_a_fresh_root_run_at_once(tmp_path):
    """Different pipelines hold different locks, and MLflow's first-time setup of the shared
    SQLite store is serialised: both runs succeed."""
    other = tmp_path / "other.yaml"
    other.write_text(DEMO.read_text().replace("name: demo", "name: demo-other")
                     .replace("path: ../examples/demo", f"path: {ROOT / 'examples' / 'demo'}"))
    ws = tmp_path / "ws"
    procs = [subprocess.Popen([sys.executable, "-m", "corpusforge.cli", "run", str(spec), "-w", str(ws), "--until",
                               "extract"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for spec in (DEMO, other)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]


def test_the_lock_is_reentrant_in_a_thread_and_refused_to_another(tmp_path):
    base = tmp_path / "demo"
    refused = []
    with workspace_lock(base):
        with workspace_lock(base):  # run() holds it while each run_stage() takes it again
            assert read_holder(base)["pid"] == os.getpid()

        def other():
            try:
                with workspace_lock(base):
                    pass
            except WorkspaceBusyError as exc:
                refused.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert read_holder(base)["pid"] == os.getpid()
    assert len(refused) == 1 and refused[0].holder["pid"] == os.getpid()
    assert not (base / INFO_FILE).exists()
    with workspace_lock(base):  # released: free for anyone
        assert json.loads((base / INFO_FILE).read_text())["host"]
