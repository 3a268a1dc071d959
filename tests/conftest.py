"""Shared fixtures: the reference data location, the demo spec and a real S3 API server."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from tests.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches the library keeps under ~/.cache (int8 query-encoder exports, MLflow's empty migrated
# store): one per test process, so tests neither read nor leave anything in the user's home.
for _variable, _prefix in (("CORPUSFORGE_ONNX_CACHE", "cf-onnx-"), ("CORPUSFORGE_MLFLOW_SCHEMA_CACHE", "cf-mlflow-")):
    if _variable not in os.environ:
        os.environ[_variable] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_variable], ignore_errors=True)

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers with ``--dist loadgroup``) a module's tests
    stay on one worker, so its module-scoped fixtures (a Ray cluster, a built workspace) are made
    once; modules that share the session's demo builds (`tests.orchestration_runs`) name one group
    of their own, so those builds are made once too."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    """The shared BEIR SciFact copy; a clear failure (not a skip) when it is missing."""
    assert (SCIFACT / "corpus.jsonl").exists(), f"reference data missing at {SCIFACT}"
    return SCIFACT




@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's standalone server) on 127.0.0.1, for S3 code paths.

    Yields:
        A dict with ``endpoint_url`` and credentials exported into the environment.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", **env}
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"]).create_bucket(Bucket=name)
    return name
