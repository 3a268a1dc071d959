"""`corpusforge datasets fetch` and a spec's `source.fetch`, against a real HTTP server on 127.0.0.1.

The server serves a small zip built here; the registry's `scifact` entry is pointed at it (URL
and digests of that zip) in the CLI subprocess, so every case runs the real command: download,
digest checks, resume of a short transfer, extraction, and the one-line faults with their exit
codes (README, "Errors and exit codes").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from corpusforge.data import benchmarks
from corpusforge.graph import stage
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")
# The CLI, with the registry's scifact entry replaced by the JSON in CF_TEST_DATASET.
_RUNNER = """
import json, os, sys
from corpusforge.data import benchmarks
e = json.loads(os.environ["CF_TEST_DATASET"])
benchmarks.DATASETS[e["name"]] = benchmarks.BenchmarkDataset(**{**e, "files": tuple(e["files"])})
from corpusforge.cli import app
app()
"""


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def demo_members(prefix: str = "scifact/") -> dict[str, bytes]:
    """The demo corpus in BEIR's archive layout, plus files that must not be extracted."""
    members = {prefix + rel: (DEMO / rel).read_bytes() for rel in FILES}
    members[prefix + "README.txt"] = b"not a dataset file"
    members["other/notes.txt"] = b"outside the prefix"
    return members


class _Handler(BaseHTTPRequestHandler):
    """GET /scifact.zip: the server's payload; ranges when `honour_range`; the first `truncate`
    responses send half their body under the full Content-Length (HTTP/1.0: then the connection
    closes, as a dropped transfer does)."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        if self.path != "/scifact.zip":
            self.send_error(404)
            return
        data, start = srv.payload, 0
        ranged = self.headers.get("Range")
        if ranged and srv.honour_range:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.truncate > 0:
            srv.truncate -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A threaded HTTP server on a free port of 127.0.0.1 (payload, truncate, honour_range, requests)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.truncate, srv.honour_range, srv.requests = make_zip(demo_members()), 0, True, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/scifact.zip"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def entry_for(payload: bytes, url: str, **changes) -> benchmarks.BenchmarkDataset:
    """The scifact entry pinned to `payload` and served from `url` (`changes` override fields)."""
    pinned = replace(benchmarks.DATASETS["scifact"], url=url, md5=hashlib.md5(payload).hexdigest(),
                     sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    return replace(pinned, **changes)


def cli(entry: benchmarks.BenchmarkDataset, *args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "CF_TEST_DATASET": json.dumps(asdict(entry))}
    return subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180)


def one_line(out: subprocess.CompletedProcess, code: int) -> str:
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Everything under `folder` (relative paths), to show what a failed fetch left behind."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def test_fetch_downloads_verifies_and_extracts_only_the_expected_files(server, tmp_path):
    entry, dest, ws = entry_for(server.payload, server.url), tmp_path / "data" / "scifact", tmp_path / "ws"
    out = cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", ws)
    assert out.returncode == 0, out.stderr
    assert f"scifact: extracted into {dest}" in out.stderr and "in 1 request(s)" in out.stderr
    assert leftovers(dest) == ["corpus.jsonl", "qrels", "qrels/test.tsv", "qrels/train.tsv", "queries.jsonl"]
    assert all((dest / rel).read_bytes() == (DEMO / rel).read_bytes() for rel in FILES)
    cache = ws / "cache" / "datasets"
    assert (cache / "scifact.zip").read_bytes() == server.payload
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob(".tmp-*"))
    assert server.requests == [None]

    again = cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", ws)
    assert again.returncode == 0 and f"scifact: already present in {dest}" in again.stderr
    other = tmp_path / "other"  # a second destination comes from the verified cached archive
    third = cli(entry, "datasets", "fetch", "scifact", "--dest", other, "-w", ws)
    assert third.returncode == 0 and "from the cached archive" in third.stderr
    assert (other / "corpus.jsonl").read_bytes() == (DEMO / "corpus.jsonl").read_bytes()
    assert server.requests == [None]  # neither went to the network


@pytest.mark.parametrize("wrong", ["sha256", "md5"])
def test_a_wrong_checksum_is_an_error_and_nothing_is_extracted(server, tmp_path, wrong):
    entry = entry_for(server.payload, server.url, **{wrong: "0" * (64 if wrong == "sha256" else 32)})
    dest, ws = tmp_path / "data" / "scifact", tmp_path / "ws"
    line = one_line(cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", ws), 1)
    assert f"has {wrong} {getattr(entry_for(server.payload, server.url), wrong)}" in line
    assert "nothing was extracted" in line
    assert not dest.exists() and not (tmp_path / "data").exists()
    assert leftovers(ws / "cache" / "datasets") == [".scifact.lock"]  # the bad download was deleted


def test_a_truncated_download_is_resumed_with_a_range_request(server, tmp_path):
    server.truncate = 1
    entry, dest = entry_for(server.payload, server.url), tmp_path / "scifact"
    out = cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", tmp_path / "ws")
    assert out.returncode == 0, out.stderr
    half = len(server.payload) // 2
    assert server.requests == [None, f"bytes={half}-"]
    assert "in 2 request(s)" in out.stderr
    assert (dest / "queries.jsonl").read_bytes() == (DEMO / "queries.jsonl").read_bytes()


def test_a_download_that_stays_truncated_is_reported_kept_and_resumed_later(server, tmp_path):
    server.truncate, server.honour_range = 3, False  # three short transfers, no ranges
    entry, dest, ws = entry_for(server.payload, server.url), tmp_path / "scifact", tmp_path / "ws"
    out = cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", ws)
    assert out.returncode == 6 and "Traceback" not in out.stderr
    *retries, line = [line for line in out.stderr.splitlines() if line.strip()]
    assert [r.split(" (attempt ")[1] for r in retries] == ["1 of 3)", "2 of 3)", "3 of 3)"]
    assert "stopped at" in line and "after 3 attempts" in line and "nothing was extracted" in line
    assert not dest.exists()
    part = ws / "cache" / "datasets" / "scifact.zip.part"
    assert 0 < part.stat().st_size < len(server.payload)
    assert not (ws / "cache" / "datasets" / "scifact.zip").exists()

    server.honour_range = True  # the server recovers: the next fetch continues the partial file
    have = part.stat().st_size
    out = cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", ws)
    assert out.returncode == 0, out.stderr
    assert server.requests[-1] == f"bytes={have}-"
    assert "resuming" in out.stderr and not part.exists()
    assert (dest / "corpus.jsonl").read_bytes() == (DEMO / "corpus.jsonl").read_bytes()


def test_offline_is_one_line_pointing_to_the_demo(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = entry_for(b"unused", f"http://127.0.0.1:{port}/scifact.zip")
    dest = tmp_path / "scifact"
    line = one_line(cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", tmp_path / "ws"), 6)
    assert line.startswith("cannot download scifact from 127.0.0.1:")
    assert "offline?" in line and line.endswith("corpusforge run pipelines/demo.yaml")
    assert not dest.exists()


def test_http_errors_and_unknown_names_have_their_exit_codes(server, tmp_path):
    entry = entry_for(server.payload, server.url.replace("scifact.zip", "gone.zip"))
    line = one_line(cli(entry, "datasets", "fetch", "scifact", "--dest", tmp_path / "d", "-w", tmp_path / "ws"), 6)
    assert "HTTP 404" in line and not (tmp_path / "d").exists()
    assert one_line(cli(entry, "datasets", "fetch", "scifakt"), 2) == "unknown dataset 'scifakt'; known: scifact"


@pytest.mark.parametrize("member", ["scifact/../../escaped.txt", "/tmp/cf-absolute-member.txt"])
def test_an_archive_with_unsafe_members_is_refused_whole(server, tmp_path, member):
    server.payload = make_zip({**demo_members(), member: b"escaped"})
    entry, dest = entry_for(server.payload, server.url), tmp_path / "a" / "b" / "scifact"
    line = one_line(cli(entry, "datasets", "fetch", "scifact", "--dest", dest, "-w", tmp_path / "ws"), 1)
    assert "unsafe members" in line and repr(member) in line
    assert not dest.exists() and not (tmp_path / "a").exists()
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/cf-absolute-member.txt").exists()


def test_an_existing_destination_is_never_overwritten(server, tmp_path):
    dest = tmp_path / "scifact"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    line = one_line(cli(entry_for(server.payload, server.url), "datasets", "fetch", "scifact", "--dest", dest,
                        "-w", tmp_path / "ws"), 2)
    assert "is not overwritten" in line and leftovers(dest) == ["mine.txt"] and server.requests == []


def test_run_fetches_a_missing_spec_source_and_reads_it(server, tmp_path):
    spec = tmp_path / "pipelines" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text("name: fetched\nsource: {format: beir, path: ../data/scifact, fetch: scifact}\n")
    entry, ws = entry_for(server.payload, server.url), tmp_path / "ws"
    checked = cli(entry, "validate", spec)
    assert checked.returncode == 0
    assert "absent; `corpusforge run` fetches 'scifact' into it" in " ".join(checked.stderr.split())
    out = cli(entry, "run", spec, "-w", ws, "--until", "extract")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "data" / "scifact" / "corpus.jsonl").read_bytes() == (DEMO / "corpus.jsonl").read_bytes()
    assert (ws / "cache" / "datasets" / "scifact.zip").exists()
    summary = json.loads((ws / "fetched" / "state" / "extract.json").read_text())["summary"]
    assert summary["rows"] == sum(1 for line in (DEMO / "corpus.jsonl").open() if line.strip())


def test_the_pipeline_core_fetches_a_missing_source_for_every_runner(server, tmp_path, monkeypatch):
    """Dagster assets and Airflow tasks run stages through `Pipeline.run_stage`, not the CLI: the
    fetch happens there, before the source is fingerprinted."""
    from corpusforge.pipeline import Pipeline

    monkeypatch.setitem(benchmarks.DATASETS, "scifact", entry_for(server.payload, server.url))
    spec = tmp_path / "pipelines" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text("name: fetched\nsource: {format: beir, path: ../data/scifact, fetch: scifact}\n")
    result = Pipeline(load_spec(spec), workspace=tmp_path / "ws", progress=False).run_stage("extract")
    assert (tmp_path / "data" / "scifact" / "qrels" / "test.tsv").read_bytes() == (DEMO / "qrels/test.tsv").read_bytes()
    assert result.summary["rows"] == sum(1 for line in (DEMO / "corpus.jsonl").open() if line.strip())
    assert server.requests == [None]  # one download, no retry


def test_spec_fetch_is_checked_and_left_out_of_the_extract_fingerprint(tmp_path):
    def spec(source: str):
        path = tmp_path / "spec.yaml"
        path.write_text(f"name: x\nsource: {source}\n")
        return load_spec(path)

    plain, fetching = spec("{format: beir, path: d}"), spec("{format: beir, path: d, fetch: scifact}")
    assert stage("extract").config(plain) == stage("extract").config(fetching)
    for source, reason in [("{format: beir, path: d, fetch: nope}", "unknown dataset 'nope'"),
                           ("{format: beir, path: 's3://b/d', fetch: scifact}", "needs a local path"),
                           ("{format: jsonl, path: d, fetch: scifact}", "is read with format 'beir'")]:
        with pytest.raises(Exception, match=reason):
            spec(source)

