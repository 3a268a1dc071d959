"""Bounded request cost and a server with nothing to serve, over real HTTP against real processes.

The amplification tests run the query endpoint in a subprocess (so its RSS, read from
``/proc/<pid>/status``, is the server's alone) over an empty snapshot store: every body here is
refused before the served snapshot would matter.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from corpusforge.serve.auth import Caller, RateLimiter
from corpusforge.snapshots import SnapshotStore, build_manifest
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = {"X-API-Key": "limits-key-00001"}
SLOW_KEY = {"X-API-Key": "one-per-minute-1"}
KEYS = {"limits-key-00001": {"name": "client"}, "one-per-minute-1": {"name": "slow", "rate_limit_per_minute": 1}}
SERVER = """
import sys, uvicorn
from corpusforge.serve import ServeSettings, create_app
from tests.ports import free_port
root, keys, port = sys.argv[1:4]
app = create_app(ServeSettings(root=root, index="demo", keys_file=keys, poll_seconds=0))
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
"""


def _json_list(item: bytes, n: int) -> bytes:
    return b"[" + b",".join([item] * n) + b"]"


# The reproductions of issue 13, item 1, and their variants through every way into the parser.
NULLS = b'{"query":"x","filters":{"a":' + _json_list(b"null", 200000) + b"}}"  # ~1 MB -> was a 110 MB 422
AMPLIFIERS = {
    "filter values [null]*200000": ("/search", NULLS, "application/json"),
    "filters [{}]*100000": ("/search", b'{"filters":' + _json_list(b"{}", 100000) + b"}", "application/json"),
    "filter values [{}]*100000": ("/search", b'{"query":"x","filters":{"a":' + _json_list(b"{}", 100000) + b"}}",
                                  "application/json"),
    "filter keys 50000": ("/search", b'{"query":"x","filters":{' + b",".join(b'"k%d":1' % i for i in range(50000))
                          + b"}}", "application/json"),
    "top-level keys 50000": ("/search", b'{"query":"x",' + b",".join(b'"k%d":1' % i for i in range(50000)) + b"}",
                             "application/json"),
    "top-level array": ("/search", _json_list(b"[]", 300000), "application/json"),
    "array in an unknown field": ("/search", b'{"query":"x","z":' + _json_list(b"[]", 300000) + b"}",
                                  "application/json"),
    "array as the query": ("/search", b'{"query":' + _json_list(b"{}", 300000) + b"}", "application/json"),
    "nested filter values": ("/search", b'{"query":"x","filters":{"a":' + b"[" * 500 + b"]" * 500 + b"}}",
                             "application/json"),
    "batch of 200000": ("/search/batch", b'{"queries":' + _json_list(b"1", 200000) + b"}", "application/json"),
    "batch filter values [{}]*100000": ("/search/batch", b'{"queries":["x"],"filters":{"a":'
                                        + _json_list(b"{}", 100000) + b"}}", "application/json"),
    # orjson refuses NaN, Python's json (what FastAPI's own path reads) does not, and takes its time
    "NaN body": ("/search", NULLS[:-1] + b',"z":NaN}', "application/json"),
    "NaN after 340000 arrays": ("/search", b'{"query":"x","z":[' + b",".join([b"[]"] * 340000) + b',NaN]}',
                                "application/json"),
    "charset content type": ("/search", NULLS, "application/json; charset=utf-8"),
    "no content type": ("/search", NULLS, ""),
    "text/plain": ("/search", NULLS, "text/plain"),
}




def _rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def _wait_for_http(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the server did not start"
        try:
            httpx.get(url + "/healthz")
            return
        except httpx.TransportError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A keyed server process over an empty store (default limits); yields (url, port, pid)."""
    tmp = tmp_path_factory.mktemp("limits")
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp / "store"), str(keys), str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(proc, url)
        yield url, port, proc.pid
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _post(url: str, path: str, body: bytes, content_type: str, headers=None) -> httpx.Response:
    head = {"content-type": content_type} if content_type else {}
    return httpx.post(url + path, content=body, headers={**head, **(headers or {})}, timeout=60)


@pytest.mark.parametrize("case", list(AMPLIFIERS))
def test_amplifying_bodies_get_a_small_4xx(bare, case):
    url = bare[0]
    path, body, content_type = AMPLIFIERS[case]
    r = _post(url, path, body, content_type, KEY)
    assert 400 <= r.status_code < 500 and r.status_code != 429, (r.status_code, r.content[:300])
    assert len(r.content) < 16 * 1024, f"{case}: a {len(r.content)} byte answer to a {len(body)} byte body"
    assert r.json()["request_id"] == r.headers["x-request-id"]
    unauthenticated = _post(url, path, body, content_type)
    assert unauthenticated.status_code == 401 and len(unauthenticated.content) < 1024


def test_server_rss_stays_flat_over_100_amplifying_requests(bare):
    url, _, pid = bare
    with httpx.Client(timeout=60) as client:
        client.get(url + "/healthz")
        before = _rss_mb(pid)
        for i in range(100):
            path, body, content_type = AMPLIFIERS[("filter values [null]*200000", "filter values [{}]*100000")[i % 2]]
            r = client.post(url + path, content=body, headers={"content-type": content_type, **KEY})
            assert r.status_code == 422 and len(r.content) < 16 * 1024
    grown = _rss_mb(pid) - before
    assert grown < 50, f"server RSS grew by {grown:.0f} MB over 100 requests"


def _answer_to_a_partial_body(port: int, path: str, body: bytes, headers: dict, sent: int) -> bytes:
    """POST with the full Content-Length but only the first `sent` bytes of the body, and read the
    response head: a server that answers has decided without the rest of the body."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode() + body[:sent])
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except socket.timeout:
            pytest.fail(f"no answer within 60 s to {path} {headers}: the server waited for the rest of the body")
    return answer


def test_auth_and_rate_limit_answer_before_the_body_is_read(bare):
    url, port, _ = bare
    for headers in ({}, {"X-API-Key": "not-a-real-key-00"}, {"Authorization": "Bearer nope-nope-nope"}):
        for path in ("/search", "/search/batch"):
            answer = _answer_to_a_partial_body(port, path, NULLS, headers, sent=1000)
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    # the rate limit is charged before the body too: one request per minute, whatever it asks
    first = _post(url, "/search", b'{"query": "x", "k": 0}', "application/json", SLOW_KEY)
    assert first.status_code == 422
    answer = _answer_to_a_partial_body(port, "/search", NULLS, SLOW_KEY, sent=1000)
    assert answer.startswith(b"HTTP/1.1 429 ") and b"retry-after" in answer.lower(), answer[:300]


def test_body_size_cap_by_content_length_and_while_streaming(bare):
    url, port, _ = bare
    big = b'{"query": "' + b"z" * (2 << 20) + b'"}'
    declared = _answer_to_a_partial_body(port, "/search", big, KEY, sent=0)  # refused on Content-Length alone
    assert declared.startswith(b"HTTP/1.1 413 ")

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it arrives
        yield big[: 1 << 19]
        yield big[1 << 19:]

    streamed = httpx.post(url + "/search", content=chunks(), headers={"content-type": "application/json", **KEY},
                          timeout=60)
    assert streamed.status_code == 413 and "larger than 1048576 bytes" in streamed.json()["detail"]


def test_validation_errors_are_capped_with_a_count(bare):
    url = bare[0]
    r = httpx.post(url + "/search/batch", json={"queries": list(range(64)), "k": "many", "mode": 7}, headers=KEY)
    assert r.status_code == 422
    body = r.json()
    assert len(body["detail"]) == 20 and body["error_count"] == 66
    assert all(set(e) == {"loc", "msg", "type"} and e["loc"][0] == "body" for e in body["detail"])
    long_key = httpx.post(url + "/search", json={"query": "x", "k" * 100000: 1}, headers=KEY)
    assert long_key.status_code == 422 and len(long_key.content) < 2048


def test_rate_limit_charged_in_two_steps_gives_back_a_refused_rest():
    limiter, caller = RateLimiter(), Caller("c", rate_limit_per_minute=3)
    assert limiter.acquire(caller) == 0  # a search: one token before its body is read (3 -> 2)
    assert limiter.acquire(caller) == 0  # a batch of 2: its first token (2 -> 1)...
    assert limiter.acquire(caller, 2, paid=1) == 0  # ...and the rest once its body is known (1 -> 0)
    assert limiter.acquire(caller) > 0  # empty
    other = Caller("d", rate_limit_per_minute=3)
    for _ in range(2):
        assert limiter.acquire(other) == 0  # 3 -> 1
    assert limiter.acquire(other) == 0  # a batch of 3: its first token (1 -> 0)
    wait = limiter.acquire(other, 3, paid=1)  # the rest is refused: the first token comes back
    assert 0 < wait <= 40 and limiter.acquire(other) == 0  # and serves the next request
    big = Caller("e", rate_limit_per_minute=3)
    assert limiter.acquire(big) == 0 and limiter.acquire(big, 100, paid=1) == 0  # larger than the bucket: all of it


# ------------------------------------------------------------------------------------ item 7
def _serve_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "corpusforge.cli", "serve", "--poll-seconds", "0",
                             "--no-access-log", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200"})


def _exit_of(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out = proc.communicate(timeout=120)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server kept running with nothing to serve: " + proc.communicate()[0].decode()[-2000:])
    return proc.returncode, out


def test_serve_with_nothing_to_serve_exits_with_a_clear_message(tmp_path):
    code, out = _exit_of(_serve_cli("--root", str(tmp_path / "nothing"), "--index", "nope",
                                    "--port", str(free_port())))
    assert code == 7, out
    lines = [line for line in out.splitlines() if "nothing to serve" in line]
    assert len(lines) == 1 and "index 'nope' has no alias 'production'" in lines[0], out
    assert "--wait-for-snapshot" in lines[0] and "Traceback" not in out


def test_serve_exits_when_the_aliased_snapshot_is_refused_at_start(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    (build / "notes.txt").write_text("not a snapshot: no chunks, no indexes")
    store = SnapshotStore(tmp_path / "store")
    manifest = build_manifest(build, index_name="demo", spec={"name": "demo"}, model={"name": "none"},
                              corpus_hash="0" * 16, index={}, metrics={})
    version = store.publish(build, manifest)
    store.set_alias("demo", "production", version)
    code, out = _exit_of(_serve_cli("--root", str(tmp_path / "store"), "--index", "demo",
                                    "--port", str(free_port())))
    assert code == 7, out
    [line] = [line for line in out.splitlines() if "nothing to serve" in line]
    assert version in line and "refused" in line, out


def test_wait_for_snapshot_keeps_serving_not_ready(tmp_path):
    port = free_port()
    proc = _serve_cli("--root", str(tmp_path / "nothing"), "--index", "nope", "--port", str(port),
                      "--wait-for-snapshot")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_http(proc, url)
        deadline = time.monotonic() + 60
        while not any(b"cannot resolve alias" in line for line in lines):  # the first alias check failed
            assert time.monotonic() < deadline and proc.poll() is None, b"".join(lines).decode()
            time.sleep(0.1)
        for _ in range(5):  # and the server stays up, not ready
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 503 and ready.json() == {"status": "loading", "version": None}
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(30)
    out = b"".join(lines).decode(errors="replace")
    assert "Finished server process" in out and "nothing to serve" not in out, out[-2000:]


def test_the_kubernetes_deployment_waits_for_a_snapshot():
    """The image's command passes --wait-for-snapshot exactly when CF_WAIT_FOR_SNAPSHOT is set, and
    the Kubernetes manifest sets it (its pods start before the first publish)."""
    cmd = next(json.loads(line[len("CMD "):]) for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines()
               if line.startswith("CMD "))
    assert cmd[:2] == ["sh", "-c"] and cmd[2].startswith("exec corpusforge serve ")
    echo = cmd[2].replace("exec corpusforge", "exec printf '%s\\n' corpusforge", 1)
    base = {"PATH": os.environ["PATH"], "CF_ROOT": "/snapshots", "CF_INDEX": "scifact", "CF_ALIAS": "production",
            "CF_POLL_SECONDS": "10"}
    for extra, expected in (({}, False), ({"CF_WAIT_FOR_SNAPSHOT": "1"}, True)):
        argv = subprocess.run(["sh", "-c", echo], env={**base, **extra}, capture_output=True, text=True,
                              check=True).stdout.splitlines()
        assert argv[:3] == ["corpusforge", "serve", "--root"] and ("--wait-for-snapshot" in argv) == expected
    config = next(doc for doc in yaml.safe_load_all((ROOT / "infra" / "k8s" / "serve.yaml").read_text())
                  if doc["kind"] == "ConfigMap")
    assert config["data"]["CF_WAIT_FOR_SNAPSHOT"]
