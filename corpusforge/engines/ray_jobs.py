"""Run one stage on a Ray cluster as a Ray job, for orchestrators whose workers should not run it.

An Airflow task whose spec sets ``execution.jobs_address`` (or ``$CORPUSFORGE_RAY_JOBS_ADDRESS``)
submits its stage through the Ray Jobs REST API (``POST /api/jobs/``: the API `ray job submit` and
``JobSubmissionClient`` call), follows the job's status and logs, and returns the stage's facts,
which the job prints as its last line (`corpusforge stage`). The job's driver runs on the head node
and, with ``execution.engine: ray``, spreads its stage over the cluster (``--ray-address auto``).

Clusters with token authentication (the default of recent Ray) get the token as Ray's own clients
find it: ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.

The REST API is used rather than ``ray.job_submission.JobSubmissionClient`` so the Airflow
environment needs no Ray wheels (~70 MB, with pins of their own): only HTTP. Paths (spec file,
workspace) must mean the same on the Airflow worker and the cluster (a shared volume, or S3 for
the publish root), as in ``infra/compose.ray.yaml``.

Nothing here imports ray.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

from corpusforge.spec import Overrides

log = logging.getLogger("corpusforge.ray_jobs")

RESULT_MARKER = "corpusforge-result: "  # the prefix of `corpusforge stage`'s last line
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The program a job runs; a cluster whose image has no `corpusforge` on PATH sets e.g. "python -m corpusforge.cli".
COMMAND_ENV = "CORPUSFORGE_RAY_JOB_COMMAND"


class RayJobError(RuntimeError):
    """A submitted stage's job failed or was stopped; the message ends with its last log lines."""


def submission_id(*parts: str) -> str:
    """A Ray submission id from an orchestrator's names (``[A-Za-z0-9_-]``, at most 128 characters).

    Args:
        parts: e.g. the DAG id, run id, task id and try number.

    Returns:
        The id: the same parts always give the same id, so a retried poll finds its job.
    """
    return re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(parts))[:128]


def stage_entrypoint(spec_path: str | Path, stage: str, workspace: str | Path, *, orchestrator: str, run_id: str,
                     force: bool = False, alias: str | None = None, engine: str = "local") -> str:
    """The shell command a stage's job runs on the cluster.

    Args:
        spec_path: the spec file, as the cluster sees it.
        stage: the stage.
        workspace: the workspace root, as the cluster sees it.
        orchestrator: tags the stage's MLflow run (``airflow``).
        run_id: the orchestrator's run id (the stage's MLflow run nests under that build's run).
        force: redo the stage even when unchanged.
        alias: the alias publish moves instead of the spec's.
        engine: the spec's engine; ``ray`` joins the job's own cluster (``--ray-address auto``).

    Returns:
        The entrypoint (program from ``$CORPUSFORGE_RAY_JOB_COMMAND``, default ``corpusforge``).
    """
    args = ["stage", str(spec_path), stage, "--workspace", str(workspace), "--orchestrator", orchestrator,
            "--run-id", run_id]
    if force:
        args.append("--force")
    if alias:
        args += ["--alias", alias]
    if engine == "ray":
        args += ["--ray-address", "auto"]
    program = os.environ.get(COMMAND_ENV) or "corpusforge"
    return f"{program} {shlex.join(args)}"


def parse_result(logs: str) -> dict[str, Any]:
    """The stage facts a job printed (the last `RESULT_MARKER` line of its logs).

    Args:
        logs: the job's logs.

    Returns:
        The facts (`StageResult.flat`).

    Raises:
        RayJobError: the logs carry no result line.
    """
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RayJobError(f"the job printed no {RESULT_MARKER.strip()!r} line:\n{_tail(logs)}")


def auth_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray cluster token, looked up as Ray's clients do (None: the cluster has no token auth).

    Args:
        environ: where ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` come from (default ``os.environ``).

    Returns:
        The token, or None.

    Raises:
        RayJobError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        except OSError as exc:
            raise RayJobError(f"RAY_AUTH_TOKEN_PATH: {exc}") from None
        if not token:
            raise RayJobError(f"RAY_AUTH_TOKEN_PATH: {environ['RAY_AUTH_TOKEN_PATH']} is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() or None if default.is_file() else None


class RayJobs:
    """A client of one cluster's Ray Jobs REST API.

    Args:
        address: the API's base address (``http://head:8265``).
        timeout: seconds per HTTP request.
        token: the cluster's auth token (default: `auth_token`).
    """

    def __init__(self, address: str, timeout: float = 30.0, token: str | None = None):
        self.address = address.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        token = token or auth_token()
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs) -> Any:
        resp = self._http.request(method, f"{self.address}/api/jobs/{path}", timeout=self.timeout, **kwargs)
        if resp.status_code >= 400:
            raise RayJobError(f"Ray Jobs API {method} /api/jobs/{path}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def submit(self, entrypoint: str, submission_id: str, env: Mapping[str, str] | None = None,
               metadata: Mapping[str, str] | None = None, entrypoint_num_cpus: float | None = None) -> str:
        """Submit a job (`POST /api/jobs/`).

        Args:
            entrypoint: the shell command.
            submission_id: the job's id.
            env: environment variables of the job (``runtime_env.env_vars``).
            metadata: the job's metadata (shown in the Ray dashboard).
            entrypoint_num_cpus: CPUs reserved for the driver.

        Returns:
            The submission id.
        """
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id,
                                "runtime_env": {"env_vars": dict(env or {})}, "metadata": dict(metadata or {})}
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        return self._call("POST", "", json=body)["submission_id"]

    def list(self) -> list[dict[str, Any]]:
        """Every job the cluster knows (``GET /api/jobs/``)."""
        return self._call("GET", "")

    def status(self, job: str) -> dict[str, Any]:
        """The job's details (``status``, ``message``...)."""
        return self._call("GET", job)

    def logs(self, job: str) -> str:
        """Everything the job has logged so far."""
        return self._call("GET", f"{job}/logs")["logs"]

    def stop(self, job: str) -> None:
        """Ask the cluster to stop the job (no error when it has ended)."""
        try:
            self._call("POST", f"{job}/stop")
        except RayJobError as exc:
            log.warning("stopping Ray job %s: %s", job, exc)

    def wait(self, job: str, poll_seconds: float = 2.0, timeout_seconds: float | None = None,
             on_logs: Callable[[str], None] | None = None) -> tuple[str, str]:
        """Follow a job to its end, passing new log text to `on_logs`; a timeout stops the job.

        Args:
            job: the submission id.
            poll_seconds: seconds between polls.
            timeout_seconds: stop the job and raise after this long (None: wait as long as it runs).
            on_logs: called with each new piece of the logs.

        Returns:
            ``(status, logs)`` at the end.

        Raises:
            RayJobError: the timeout passed (the job is stopped first).
        """
        started, seen = time.monotonic(), 0
        while True:
            details = self.status(job)
            logs = self.logs(job)
            if on_logs and len(logs) > seen:
                on_logs(logs[seen:])
            seen = len(logs)
            if details["status"] in TERMINAL:
                return details["status"], logs
            if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
                self.stop(job)
                raise RayJobError(f"Ray job {job} still {details['status']} after {timeout_seconds:.0f} s: stopped")
            time.sleep(poll_seconds)


def submit_stage(address: str, spec_path: str | Path, stage: str, workspace: str | Path, *, orchestrator: str,
                 run_id: str, job_id: str, force: bool = False, alias: str | None = None, engine: str = "local",
                 environ: Mapping[str, str] | None = None, poll_seconds: float = 2.0,
                 timeout_seconds: float | None = None) -> dict[str, Any]:
    """Run one stage as a Ray job and return its facts; the job is stopped if this call is interrupted.

    The job gets this process's per-environment settings (`Overrides.ENV`: MLflow URI, publish
    root...), so it builds what a local task would.

    Args:
        address: the Ray Jobs API address (``http://head:8265``).
        spec_path: the spec file (the same path on the cluster).
        stage: the stage.
        workspace: the workspace root (the same path on the cluster).
        orchestrator: ``airflow``.
        run_id: the orchestrator's run id.
        job_id: the submission id (`submission_id`).
        force: redo the stage even when unchanged.
        alias: the alias publish moves instead of the spec's.
        engine: the spec's ``execution.engine``.
        environ: where the settings come from (default ``os.environ``).
        poll_seconds: seconds between status polls.
        timeout_seconds: stop the job after this long.

    Returns:
        The stage's facts (`StageResult.flat`).

    Raises:
        RayJobError: the job failed, was stopped or timed out (with its last log lines).
    """
    environ = os.environ if environ is None else environ
    env = {var: environ[var] for var in Overrides.ENV.values() if environ.get(var)}
    env.pop("CORPUSFORGE_RAY_JOBS_ADDRESS", None)  # the job runs its stage; it submits nothing
    jobs = RayJobs(address)
    entrypoint = stage_entrypoint(spec_path, stage, workspace, orchestrator=orchestrator, run_id=run_id,
                                  force=force, alias=alias, engine=engine)
    log.info("submitting %s to %s as Ray job %s: %s", stage, address, job_id, entrypoint)
    jobs.submit(entrypoint, job_id, env=env,
                metadata={"corpusforge.stage": stage, "corpusforge.orchestrator": orchestrator,
                          "corpusforge.orchestrator_run_id": run_id})
    def relay(text: str) -> None:  # the job's log, line by line, into this task's log
        for line in text.splitlines():
            log.info("[%s] %s", job_id, line)

    try:
        status, logs = jobs.wait(job_id, poll_seconds, timeout_seconds, on_logs=relay)
    except BaseException:
        jobs.stop(job_id)  # killed task, timeout or API failure: leave no stage running unwatched
        raise
    if status != "SUCCEEDED":
        message = jobs.status(job_id).get("message") or ""
        raise RayJobError(f"Ray job {job_id} ({stage}) {status}: {message}\n{_tail(logs)}")
    return parse_result(logs)


def _tail(logs: str, lines: int = 30) -> str:
    return "\n".join(logs.splitlines()[-lines:])


def run_step(pipeline, spec_path: str | Path, stage: str, *, orchestrator: str, run_id: str, job_id: str,
             alias: str | None = None) -> dict[str, Any]:
    """Run one stage as an orchestrator step: here, or as a Ray job when the spec has ``execution.jobs_address``.

    Args:
        pipeline: the `Pipeline` (its spec, workspace and ``force``).
        spec_path: the spec file (the job reads it at the same path).
        stage: the stage.
        orchestrator: ``airflow``.
        run_id: the orchestrator's run id.
        job_id: the submission id, used when the stage goes to Ray.
        alias: the alias publish moves instead of the spec's (already applied to `pipeline.spec`).

    Returns:
        The stage's facts (`StageResult.flat`).
    """
    execution = pipeline.spec.execution
    if not execution.jobs_address:
        # run_stage_tracked logs the stage's one-line summary (corpusforge.orchestration logger).
        return pipeline.run_stage_tracked(stage, orchestrator, run_id).flat()
    return submit_stage(execution.jobs_address, spec_path, stage, pipeline.ws.root, orchestrator=orchestrator,
                        run_id=run_id, job_id=job_id, force=pipeline.force, alias=alias, engine=execution.engine)
