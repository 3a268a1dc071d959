"""Stages submitted as Ray jobs (`corpusforge.engines.ray_jobs`), against a real local Ray head
with its dashboard and Jobs API, and an Airflow task that submits its stage there.

The head runs in its own process (``ray start --head --block``), so the jobs run exactly as on a
cluster: the job supervisor starts `corpusforge stage` as a subprocess. Every port it listens on is
a free one chosen here, not Ray's fixed defaults (the dashboard agent's 52365, the client server's
10001) or its own random picks, so it cannot clash with another local Ray on the machine (the
Dagster tests' LocalRay may run at the same time on the other xdist worker).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corpusforge.engines.ray_jobs import (RESULT_MARKER, RayJobError, RayJobs, parse_result, stage_entrypoint,
                                          submission_id, submit_stage)
from tests.orchestration_runs import ROOT, airflow_bin, airflow_env, airflow_home, offline_env
from tests.ports import free_ports

DEMO = ROOT / "pipelines" / "demo.yaml"
# one local Ray at a time on the machine (test_ray.py, test_ray_jobs.py): one xdist worker
pytestmark = pytest.mark.xdist_group("ray")


HEAD_ATTEMPTS = 3


def _start_head(log_path: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` with every port it listens on chosen here, up to its Jobs API.

    Returns:
        The head's process and its dashboard address, once a probe job was accepted.

    Raises:
        RuntimeError: the head exited before its Jobs API answered; the message has its log's tail.
    """
    gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env, client = free_ports(7)
    log = log_path.open("wb")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--port", str(gcs), "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent_http),
                             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                             "--runtime-env-agent-port", str(runtime_env), "--ray-client-server-port", str(client),
                             "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=offline_env(RAY_USAGE_STATS_ENABLED="0"))
    log.close()
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 300
    for attempt in itertools.count():  # the job agent comes up after the dashboard
        try:
            # A new id per attempt: an attempt that timed out on this side may have created its
            # job, and a second submission of that id fails ("already exists") for good.
            RayJobs(address, timeout=30).submit("true", f"probe-{dashboard}-{attempt}")
            return head, address
        except (RayJobError, OSError):
            if head.poll() is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"`ray start --head` exited with {head.returncode}:\n{tail}") from None
            if time.monotonic() > deadline:
                _stop_head(head)
                raise
            time.sleep(1)


def _stop_head(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()


@pytest.fixture(scope="module")
def jobs_address(tmp_path_factory):
    """A local Ray head with the Jobs API; its jobs run `python -m corpusforge.cli` of this venv.

    A head whose start fails is started again on new ports, at most three times: `ray start
    --block` exits when any of its processes dies, and on a shared machine one of the ports chosen
    here can be taken by another process before Ray binds it. CI saw one such exit, its log then
    not kept, while the lost grouping (`tests/test_suite_grouping.py`) ran another local Ray on the
    other worker at the same time. Each failed start's log is printed, so any cause shows.
    """
    logs = tmp_path_factory.mktemp("ray-head")
    for start in range(HEAD_ATTEMPTS):
        try:
            head, address = _start_head(logs / f"head-{start}.log")
            break
        except RuntimeError as exc:
            print(f"ray head start {start + 1} of {HEAD_ATTEMPTS} failed: {exc}", file=sys.stderr)
            if start + 1 == HEAD_ATTEMPTS:
                raise
    old = os.environ.get("CORPUSFORGE_RAY_JOB_COMMAND")
    os.environ["CORPUSFORGE_RAY_JOB_COMMAND"] = f"{sys.executable} -m corpusforge.cli"
    try:
        yield address
    finally:
        if old is None:
            os.environ.pop("CORPUSFORGE_RAY_JOB_COMMAND", None)
        else:
            os.environ["CORPUSFORGE_RAY_JOB_COMMAND"] = old
        _stop_head(head)


def test_entrypoint_and_ids_are_shell_safe(monkeypatch):
    monkeypatch.delenv("CORPUSFORGE_RAY_JOB_COMMAND", raising=False)
    cmd = stage_entrypoint("/specs/my spec.yaml", "embed", "/ws", orchestrator="airflow", run_id="manual__2026;rm",
                           force=True, alias="prod", engine="ray")
    assert cmd == ("corpusforge stage '/specs/my spec.yaml' embed --workspace /ws --orchestrator airflow "
                   "--run-id 'manual__2026;rm' --force --alias prod --ray-address auto")
    assert submission_id("corpusforge_demo", "manual__2026-12-02T10:00:00+00:00", "embed", "try1") == \
        "corpusforge_demo-manual__2026-12-02T10_00_00_00_00-embed-try1"
    assert parse_result(f"log line\n{RESULT_MARKER}" + json.dumps({"rows": 3}) + "\n") == {"rows": 3}
    with pytest.raises(RayJobError, match="no 'corpusforge-result:' line"):
        parse_result("Traceback ...\n")


def test_a_stage_runs_as_a_ray_job_and_a_rerun_skips_it(jobs_address, tmp_path):
    ws = tmp_path / "ws"
    facts = submit_stage(jobs_address, DEMO, "extract", ws, orchestrator="airflow", run_id="run-1",
                         job_id="t-extract-1", poll_seconds=0.5, environ=offline_env())
    assert facts["stage"] == "extract" and facts["skipped"] is False and facts["rows"] > 0
    state = json.loads((ws / "demo" / "state" / "extract.json").read_text())
    assert state["fingerprint"] == facts["fingerprint"]  # the job wrote the workspace this side reads
    again = submit_stage(jobs_address, DEMO, "extract", ws, orchestrator="airflow", run_id="run-2",
                         job_id="t-extract-2", poll_seconds=0.5, environ=offline_env())
    assert again["skipped"] is True and again["fingerprint"] == facts["fingerprint"]
    info = RayJobs(jobs_address).status("t-extract-1")
    assert info["metadata"]["corpusforge.stage"] == "extract" and info["status"] == "SUCCEEDED"


def test_a_failed_stage_job_raises_with_its_logs(jobs_address, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsource: {format: jsonl, path: /nonexistent/corpus.jsonl}\n")
    with pytest.raises(RayJobError, match=r"(?s)t-bad-1 \(extract\) FAILED.*nonexistent"):
        submit_stage(jobs_address, bad, "extract", tmp_path / "ws", orchestrator="airflow", run_id="run-1",
                     job_id="t-bad-1", poll_seconds=0.5, environ=offline_env())


def test_a_timeout_stops_the_job(jobs_address):
    jobs = RayJobs(jobs_address)
    jobs.submit("sleep 120", "t-sleep-1")
    with pytest.raises(RayJobError, match="stopped"):
        jobs.wait("t-sleep-1", poll_seconds=0.5, timeout_seconds=2)
    deadline = time.monotonic() + 30
    while jobs.status("t-sleep-1")["status"] != "STOPPED":
        assert time.monotonic() < deadline, jobs.status("t-sleep-1")
        time.sleep(0.5)


def test_an_airflow_task_submits_its_stage_as_a_ray_job(jobs_address, tmp_path):
    """`airflow tasks test` of the demo DAG's extract task with CORPUSFORGE_RAY_JOBS_ADDRESS set."""
    ws = tmp_path / "ws"
    env = airflow_env(airflow_home("tasks-test"), ws, CORPUSFORGE_RAY_JOBS_ADDRESS=jobs_address)
    out = subprocess.run([airflow_bin("airflow"), "tasks", "test", "corpusforge_demo", "extract"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-5000:]
    assert "as Ray job corpusforge_demo-" in output  # submitted, not run in the task's process
    jobs = [j for j in RayJobs(jobs_address).list() if j.get("metadata", {}).get("corpusforge.stage") == "extract"
            and (j.get("submission_id") or "").startswith("corpusforge_demo-")]
    assert len(jobs) == 1 and jobs[0]["status"] == "SUCCEEDED"
    assert json.loads((ws / "demo" / "state" / "extract.json").read_text())["summary"]["rows"] > 0



@pytest.mark.slow  # the whole demo DAG, one Ray job per stage (~3 min on 2 cores); `make test-all`
def test_the_demo_dag_through_ray_jobs_publishes_the_cli_snapshot(jobs_address, tmp_path):
    """`airflow dags test` with every task a Ray job: the snapshot content equals the CLI build's."""
    from tests.orchestration_runs import cli_build, content_digests

    ws = tmp_path / "ws"
    env = airflow_env(airflow_home("ray-jobs-dag"), ws, CORPUSFORGE_RAY_JOBS_ADDRESS=jobs_address)
    out = subprocess.run([airflow_bin("airflow"), "dags", "test", "corpusforge_demo"], capture_output=True, text=True,
                         env=env, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    submitted = {j["metadata"]["corpusforge.stage"] for j in RayJobs(jobs_address).list()
                 if (j.get("submission_id") or "").startswith("corpusforge_demo-") and j["status"] == "SUCCEEDED"
                 and str(ws) in j["entrypoint"]}
    assert submitted == {"extract", "clean", "chunk", "embed", "index", "evaluate", "publish"}
    assert content_digests(ws, "demo") == content_digests(cli_build(), "demo")
