"""`make airflow` (infra/airflow-local.sh): a real local Airflow -- api-server, scheduler, dag-processor
and triggerer on 127.0.0.1 -- runs the demo DAG to success through the REST API, with Params, the
snapshot Asset triggering a downstream DAG, and task logs free of progress bars.

The DAGs folder is a copy of dags/ plus a small consumer DAG scheduled on the snapshot asset, and the
pipelines folder holds only the demo spec, so the servers parse two DAG files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.orchestration_runs import ROOT, airflow_bin, offline_env
from tests.ports import free_port

CONSUMER = '''
from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import Asset, dag, task


@dag(dag_id="snapshot_consumer", schedule=[Asset(name="corpusforge/demo", uri="{uri}")],
     start_date=datetime(2026, 1, 1, tzinfo=timezone.utc), catchup=False)
def consumer():
    @task
    def record():
        Path("{out}").write_text("ran")

    record()


consumer()
'''




def _wait(what: str, probe, timeout: float, proc: subprocess.Popen, log: Path):
    """Poll `probe` until it returns something truthy; fail with the server log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"airflow-local exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        try:
            value = probe()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.mark.slow  # ~8 min on 2 cores (four Airflow services, two DAG runs); `make test-all`. The default suite
# runs the same DAGs with `airflow dags test` (tests/orchestration/test_airflow.py).
def test_make_airflow_runs_the_demo_dag_through_scheduler_with_params_and_asset(tmp_path):
    airflow_bin("airflow")  # the venv exists
    home, ws, dags, pipelines = (tmp_path / n for n in ("home", "ws", "dags", "pipelines"))
    for folder in (dags, pipelines):
        folder.mkdir()
    shutil.copy(ROOT / "dags" / "corpusforge_dags.py", dags)
    consumed = tmp_path / "consumed.txt"
    (dags / "snapshot_consumer.py").write_text(CONSUMER.replace("{out}", str(consumed)).replace(
        "{uri}", (ws / "snapshots" / "demo").as_uri()))
    (pipelines / "demo.yaml").write_text((ROOT / "pipelines" / "demo.yaml").read_text().replace(
        "../examples/demo", str(ROOT / "examples" / "demo")))
    port = free_port()
    env = offline_env(AIRFLOW_HOME=str(home), AIRFLOW_PORT=str(port), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                      CORPUSFORGE_PIPELINES_DIR=str(pipelines), CORPUSFORGE_WORKSPACE=str(ws),
                      CORPUSFORGE_AIRFLOW_RETRIES="0", CORPUSFORGE_AIRFLOW_SCHEDULE="none",
                      AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
                      AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True")
    log = tmp_path / "airflow.log"
    api = f"http://127.0.0.1:{port}/api/v2"
    with log.open("w") as out:
        proc = subprocess.Popen([str(ROOT / "infra" / "airflow-local.sh")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(timeout=30)
    try:
        _wait("the DAGs", lambda: client.get(f"{api}/dags/corpusforge_demo").status_code == 200
              and client.get(f"{api}/dags/snapshot_consumer").status_code == 200, 240, proc, log)
        # the trigger form's Params are validated: a stage outside the spec's graph is refused
        bad = client.post(f"{api}/dags/corpusforge_demo/dagRuns", json={"logical_date": None,
                                                                        "conf": {"until": "mine"}})
        assert bad.status_code == 400, bad.text

        def finished(run_id: str):
            state = client.get(f"{api}/dags/corpusforge_demo/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        def states(run_id: str) -> dict[str, str]:
            tis = client.get(f"{api}/dags/corpusforge_demo/dagRuns/{run_id}/taskInstances").json()
            return {t["task_id"]: t["state"] for t in tis["task_instances"]}

        run = client.post(f"{api}/dags/corpusforge_demo/dagRuns",
                          json={"logical_date": None, "conf": {"alias": "e2e"}}).json()
        assert _wait("the demo run", lambda: finished(run["dag_run_id"]), 600, proc, log) == "success", \
            states(run["dag_run_id"])
        assert set(states(run["dag_run_id"]).values()) == {"success"}

        # publish moved the chosen alias and updated the asset; the consumer DAG ran on it
        from corpusforge.snapshots import SnapshotStore

        version = SnapshotStore(str(ws / "snapshots")).resolve("demo", "e2e")
        events = client.get(f"{api}/assets/events", params={"source_dag_id": "corpusforge_demo"}).json()
        assert [e["extra"]["version"] for e in events["asset_events"]] == [version]
        assert events["asset_events"][0]["extra"]["alias"] == "e2e"
        _wait("the consumer DAG", lambda: consumed.exists(), 300, proc, log)
        runs = client.get(f"{api}/dags/snapshot_consumer/dagRuns").json()["dag_runs"]
        assert [r["run_type"] for r in runs] == ["asset_triggered"]
        upstream = client.get(f"{api}/dags/snapshot_consumer/dagRuns/{runs[0]['dag_run_id']}/upstreamAssetEvents")
        assert [e["extra"]["version"] for e in upstream.json()["asset_events"]] == [version]

        # until + force: extract runs again (forced), the later stages are skipped
        first = json.loads((ws / "demo" / "state" / "extract.json").read_text())["finished_at"]
        time.sleep(1)  # finished_at has a resolution of one second
        again = client.post(f"{api}/dags/corpusforge_demo/dagRuns",
                            json={"logical_date": None, "conf": {"until": "extract", "force": True}}).json()
        assert _wait("the until run", lambda: finished(again["dag_run_id"]), 300, proc, log) == "success"
        assert states(again["dag_run_id"]) == {"extract": "success", "clean": "skipped", "chunk": "skipped",
                                               "embed": "skipped", "index": "skipped", "evaluate": "skipped",
                                               "publish": "skipped"}
        # extract ran again (forced) although nothing changed
        assert json.loads((ws / "demo" / "state" / "extract.json").read_text())["finished_at"] != first
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # task logs: the stage summaries, and no progress bar lines
    task_logs = [p.read_text() for p in (home / "logs").rglob("*.log") if "corpusforge_demo" in str(p)]
    assert task_logs and any("demo embed: ran in" in t for t in task_logs)
    assert not [line for t in task_logs for line in t.splitlines() if re.search(r"it/s\]|\d+%\|", line)]
    # the servers listen on 127.0.0.1 only (the api-server), the log servers are off
    text = log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in text
    assert "Starting log server" not in text
