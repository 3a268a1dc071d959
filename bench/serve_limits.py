"""What oversized and hostile request bodies cost the query endpoint (issue 13, item 1).

Starts ``corpusforge serve`` on 127.0.0.1 over a published snapshot (default: the demo pipeline's,
``corpusforge run pipelines/demo.yaml``), once without and once with API keys, and sends each
amplification body ``--repeat`` times. Per case it prints the status, the response bytes, the
server's time per request (from the server's own ``corpusforge_request_latency_seconds`` sum, so
the client's reading of a large answer is not counted), the server's RSS growth over the first
request and then over the repeats (``/proc/<pid>/status``), and the slowest ``/healthz`` answer
seen meanwhile::

    .venv/bin/python bench/serve_limits.py --root workspace/snapshots --index demo --repeat 100

To measure another version of the code with the same script, run it from outside this checkout
(the server runs ``python -m``, which puts the working directory first on the path) with
``PYTHONPATH=<the other version's root>``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = "bench-key-000001"
# (name, path, body, send the key): the reproductions of issue 13, item 1
CASES = [
    ("filters {a: [null]*200000}", "/search", b'{"query":"x","filters":{"a":[' + b",".join([b"null"] * 200000) + b"]}}",
     True),
    ("filters [{}]*100000", "/search", b'{"filters":[' + b",".join([b"{}"] * 100000) + b"]}", True),
    ("filters {a: [{}]*100000}", "/search", b'{"query":"x","filters":{"a":[' + b",".join([b"{}"] * 100000) + b"]}}",
     True),
    ("batch queries [1]*200000", "/search/batch", b'{"queries":[' + b",".join([b"1"] * 200000) + b"]}", True),
    ("NaN after [[]]*340000", "/search", b'{"query":"x","z":[' + b",".join([b"[]"] * 340000) + b",NaN]}", True),
    ("no key, filters {a: [null]*200000}", "/search",
     b'{"query":"x","filters":{"a":[' + b",".join([b"null"] * 200000) + b"]}}", False),
    ("well-formed search", "/search", b'{"query":"black hole","k":5,"mode":"bm25"}', True),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def latency_sum(url: str, endpoint: str) -> tuple[float, float]:
    """The server's request-latency sum and count for one endpoint."""
    text = httpx.get(url + "/metrics", timeout=60).text
    total = count = 0.0
    for line in text.splitlines():
        if f'endpoint="{endpoint}"' in line:
            if line.startswith("corpusforge_request_latency_seconds_sum"):
                total = float(line.split()[-1])
            elif line.startswith("corpusforge_request_latency_seconds_count"):
                count = float(line.split()[-1])
    return total, count


class HealthProbe:
    """Polls /healthz every 50 ms and keeps the slowest answer (or a timeout of 10 s)."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.stop = url, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.get(self.url + "/healthz")
                except httpx.TimeoutException:
                    pass
                self.worst = max(self.worst, time.perf_counter() - t0)
                time.sleep(0.05)

    def finish(self) -> float:
        self.stop.set()
        self.thread.join(30)
        return self.worst


def serve(args, port: int, keys: Path | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "corpusforge.cli", "serve", "--root", args.root, "--index", args.index,
           "--port", str(port), "--poll-seconds", "0", "--no-access-log"]
    if keys:
        cmd += ["--keys", str(keys)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def run_case(url: str, pid: int, path: str, body: bytes, headers: dict, repeat: int) -> dict:
    headers = {"content-type": "application/json", **headers}
    statuses, sizes = set(), []
    with httpx.Client(timeout=600) as client:
        rss_first = rss_mb(pid)
        client.post(url + path, content=body, headers=headers)  # warm-up: first-use allocations
        s0, c0 = latency_sum(url, path)
        rss0 = rss_mb(pid)
        probe = HealthProbe(url)
        for _ in range(repeat):
            r = client.post(url + path, content=body, headers=headers)
            statuses.add(r.status_code)
            sizes.append(len(r.content))
        worst_health = probe.finish()
        rss1 = rss_mb(pid)
        s1, c1 = latency_sum(url, path)
    return {"status": sorted(statuses), "body_bytes": max(sizes), "server_ms": (s1 - s0) / max(c1 - c0, 1) * 1000,
            "rss_first_mb": rss0 - rss_first, "rss_delta_mb": rss1 - rss0, "rss_mb": rss1,
            "healthz_worst_ms": worst_health * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="snapshot store root (required unless --smoke)")
    parser.add_argument("--index", default="demo")
    parser.add_argument("--repeat", type=int, default=100, help="requests per case")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--smoke", action="store_true",
                        help="the demo snapshot built in a temporary workspace (unless --root), 2 requests per case")
    args = parser.parse_args()
    if args.smoke:
        from serve import build_demo_snapshot  # bench/serve.py: the same demo snapshot, built by the CLI

        args.repeat = 2
        args.root = args.root or build_demo_snapshot(Path(tempfile.mkdtemp(prefix="cf-bench-limits-smoke-")))
    if args.root is None:
        parser.error("--root is required (or --smoke)")
    keys = Path(tempfile.mkdtemp(prefix="cf-bench-keys-")) / "keys.yaml"
    keys.write_text(f"{KEY}: {{name: bench}}\n")
    import corpusforge

    print(f"code: {Path(corpusforge.__file__).parent}")
    print(f"{'case':40} {'server':7} {'status':10} {'request B':>10} {'response B':>12} {'server ms':>10} "
          f"{'RSS +MB 1st':>11} {'+MB repeats':>11} {'RSS MB':>7} {'healthz max ms':>14}")
    for keyed in (False, True):
        port = free_port()
        proc = serve(args, port, keys if keyed else None)
        try:
            for name, path, body, send_key in CASES:
                if args.only not in name:
                    continue
                if not keyed and not send_key:
                    continue  # 'no key' only means something on a server with keys
                r = run_case(f"http://127.0.0.1:{port}", proc.pid, path, body,
                             {"X-API-Key": KEY} if keyed and send_key else {}, args.repeat)
                print(f"{name:40} {'keys' if keyed else 'anon':7} {str(r['status']):10} {len(body):>10} "
                      f"{r['body_bytes']:>12} {r['server_ms']:>10.2f} {r['rss_first_mb']:>11.1f} "
                      f"{r['rss_delta_mb']:>11.1f} {r['rss_mb']:>7.0f} {r['healthz_worst_ms']:>14.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
