"""The command line's faults: one clear line and a documented exit code; the traceback only with --verbose.

Exit codes (README, "Exit codes"): 2 bad spec or arguments, 6 a source or storage location
missing or unreachable, 1 anything else. Every case runs the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from corpusforge.data import fs

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "corpusforge.cli"]
DEMO = ROOT / "examples" / "demo"


def cli(*args, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=full_env,
                          timeout=timeout)


def one_line(out: subprocess.CompletedProcess, code: int) -> str:
    """The fault's single line, after checking the exit code and that no traceback was printed."""
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def write_spec(tmp_path: Path, source: str, extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: demo\nsource: {source}\n{extra}")
    return path


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validate_and_run_refuse_unsafe_publish_names(tmp_path):
    spec = write_spec(tmp_path, f"{{format: beir, path: {DEMO}}}", "publish: {alias: '../../x'}\n")
    out = cli("validate", spec)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "publish.alias" in out.stderr and "invalid alias '../../x'" in out.stderr
    # run refuses the same spec before any stage (it used to fail at publish, after every stage)
    ws = tmp_path / "ws"
    out = cli("run", spec, "-w", ws)
    assert out.returncode == 2 and "invalid alias '../../x'" in out.stderr
    assert not ws.exists()


def test_missing_local_source_fails_at_once_with_one_line(tmp_path):
    spec = write_spec(tmp_path, "{format: beir, path: no-such-folder}")
    missing = tmp_path / "no-such-folder"
    assert one_line(cli("validate", spec), 6) == f"source {missing}: no such file or directory"
    ws = tmp_path / "ws"
    assert one_line(cli("run", spec, "-w", ws), 6) == f"source {missing}: no such file or directory"
    assert not ws.exists()  # no stage ran, nothing was created
    verbose = cli("run", spec, "-w", ws, "--verbose")
    assert verbose.returncode == 6
    assert "Traceback" in verbose.stderr and "FileNotFoundError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == f"source {missing}: no such file or directory"


def test_validate_checks_a_local_source_and_leaves_s3_alone_by_default(tmp_path):
    out = cli("validate", write_spec(tmp_path, f"{{format: beir, path: {DEMO}}}"))
    assert out.returncode == 0 and "local directory" in out.stderr
    assert json.loads(out.stdout)["name"] == "demo"
    # without --check-sources nothing is contacted: the closed port is never tried
    spec = write_spec(tmp_path, f"{{format: jsonl, path: 's3://bucket/corpus', "
                                f"s3_endpoint_url: 'http://127.0.0.1:{closed_port()}'}}")
    out = cli("validate", spec)
    assert out.returncode == 0 and "not contacted" in out.stderr


def test_unreachable_s3_endpoint_is_one_line_for_validate_run_and_snapshots(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    spec = write_spec(tmp_path, f"{{format: jsonl, path: 's3://bucket/corpus', s3_endpoint_url: '{endpoint}'}}")
    line = one_line(cli("validate", spec, "--check-sources", env=creds), 6)
    assert line.startswith("source s3://bucket/corpus: Could not connect to the endpoint URL")
    ws = tmp_path / "ws"
    line = one_line(cli("run", spec, "-w", ws, env=creds), 6)
    assert line.startswith("source s3://bucket/corpus: Could not connect") and not ws.exists()
    # a snapshot store on S3 fails through boto3 itself: the same one line and code
    line = one_line(cli("snapshots", "list", "--root", "s3://bucket/snapshots", "--index", "demo",
                        "--endpoint-url", endpoint, env=creds), 6)
    assert line.startswith("S3: Could not connect to the endpoint URL")
    out = cli("-v", "snapshots", "list", "--root", "s3://bucket/snapshots", "--index", "demo",
              "--endpoint-url", endpoint, env=creds)
    assert out.returncode == 6 and "Traceback" in out.stderr and "EndpointConnectionError" in out.stderr


def test_s3_source_without_credentials_is_one_line(tmp_path, s3_server):
    spec = write_spec(tmp_path, f"{{format: jsonl, path: 's3://bucket/corpus', "
                                f"s3_endpoint_url: '{s3_server['endpoint_url']}'}}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    out = subprocess.run([*CLI, "validate", str(spec), "--check-sources"], capture_output=True, text=True,
                         cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}, timeout=120)
    assert one_line(out, 6) == "source s3://bucket/corpus: Unable to locate credentials"


def test_check_sources_lists_s3_on_a_real_server(tmp_path, s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"])
    client.put_object(Bucket=s3_bucket, Key="corpus/part-1.jsonl", Body=b'{"_id": "a", "text": "x"}\n')
    client.put_object(Bucket=s3_bucket, Key="corpus-old/part-1.jsonl", Body=b"")
    endpoint = s3_server["endpoint_url"]
    assert fs.check_source(f"s3://{s3_bucket}/corpus", endpoint, list_remote=True) == "S3 prefix"
    assert fs.check_source(f"s3://{s3_bucket}/corpus/", endpoint, list_remote=True) == "S3 prefix"
    assert fs.check_source(f"s3://{s3_bucket}/corpus/part-1.jsonl", endpoint, list_remote=True) == "S3 object"
    assert fs.check_source(f"s3://{s3_bucket}", endpoint, list_remote=True) == "S3 prefix"
    # "corp" only prefixes other names' characters: not a folder, not an object
    with pytest.raises(FileNotFoundError, match="no object at or under"):
        fs.check_source(f"s3://{s3_bucket}/corp", endpoint, list_remote=True)
    with pytest.raises(fs.SourceUnreachableError, match="NoSuchBucket"):
        fs.check_source("s3://no-such-bucket-here/corpus", endpoint, list_remote=True)

    spec = write_spec(tmp_path, f"{{format: jsonl, path: 's3://{s3_bucket}/corpus', s3_endpoint_url: '{endpoint}'}}")
    out = cli("validate", spec, "--check-sources")
    assert out.returncode == 0 and "S3 prefix" in out.stderr
    spec = write_spec(tmp_path, f"{{format: jsonl, path: 's3://{s3_bucket}/nothing', s3_endpoint_url: '{endpoint}'}}")
    assert one_line(cli("validate", spec, "--check-sources"), 6) == (
        f"source s3://{s3_bucket}/nothing: no object at or under this prefix")


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "_dataset.json").write_text("{}")
    (broken / "part-00000.parquet").write_bytes(b"not parquet at all")
    line = one_line(cli("inspect", broken), 1)
    assert line.startswith("unexpected error: ArrowInvalid: ") and line.endswith("(--verbose shows where)")
    out = cli("-v", "inspect", broken)
    assert out.returncode == 1 and "Traceback" in out.stderr
