"""Load test of the query endpoint with wrk over a SciFact snapshot, against the library in-process.

Starts ``corpusforge serve`` on 127.0.0.1 over the aliased snapshot, then drives it with wrk (a
Lua script POSTing the SciFact test queries round-robin) for every mode x concurrency, and prints
requests/s, p50/p99 latency and errors. The reference is the library itself: `Searcher.search`
called in-process on the same queries, one at a time (median per query); the table shows the
endpoint's per-query time over it -- at concurrency 1 the p50 latency, at higher concurrency
the time per query implied by the throughput (1 / requests per second).

Run it under the heavy lock (it keeps both cores busy)::

    flock /tmp/corpusforge-heavy.lock .venv/bin/python bench/serve.py            # 60 s per cell
    .venv/bin/python bench/serve.py --duration 5                                  # development

``--index scifact-tower`` measures the snapshot of ``pipelines/scifact-tower.yaml`` (build it with
``corpusforge run pipelines/scifact-tower.yaml``), whose queries the endpoint encodes with a
distilled 3-layer query tower; ``--no-query-tower`` serves the same snapshot with the full model.

Before the load it measures dense nDCG@10 on the SciFact test split with each query encoder the
server may use (torch, and ``auto`` = int8 ONNX on a CPU), over the snapshot's passage vectors, so
the quality price of the fast path is printed next to its speed. wrk runs one thread (it is event
driven; a second one only takes CPU from the server on this 2-core machine).

The load comes from wrk (Debian: ``apt-get install -y wrk``); where wrk is missing, or with
``--load-generator python``, from a Python event loop (httpx, one connection per concurrent
client, the same round-robin bodies and the same figures; it shares the CPU with the server less
frugally than wrk, so its req/s are a lower bound). ``--smoke`` runs everything in seconds on the
demo corpus, building its snapshot in a temporary workspace (CI keeps the script running; its
figures mean nothing). ``--cache-size 0`` (the default here) turns the
server's result cache off, so every request encodes and searches: with the cache on, the 300 test
queries repeat and almost every request after the first pass would be a cache hit. Pass
``--cache-size 4096`` to measure the cached path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
DEMO = ROOT / "examples" / "demo"

LUA = r"""
local bodies = {}
for line in io.lines(os.getenv("CF_BODIES")) do bodies[#bodies + 1] = line end
local counter = 0
local threads = {}
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
local i = 0
function init(args) i = (tid or 0) * 37 end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'CFRESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, ' ..
    '"timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def test_split(data_dir: Path) -> tuple[list[str], list[str], dict]:
    """The SciFact test split: query ids with judgments (sorted), their texts, and the qrels."""
    from corpusforge.text.extract import read_qrels, read_queries

    queries = read_queries(str(data_dir))
    qrels = read_qrels(str(data_dir), "test")
    qids = [q for q in sorted(qrels) if q in queries]
    return qids, [queries[q] for q in qids], qrels


def encoder_quality(snapshot_dir: Path, data_dir: Path) -> dict[str, tuple[float, dict]]:
    """Dense nDCG@10 on the test split with each query encoder the server can use.

    The passage vectors are the snapshot's; only the query encoder differs (torch or int8, full
    model or the snapshot's distilled query tower), so this is what each fast path costs in quality.
    """
    from corpusforge.evaluation.metrics import evaluate, run_from_hits
    from corpusforge.serve import open_snapshot

    qids, texts, qrels = test_split(data_dir)
    has_tower = (snapshot_dir / "query_tower").is_dir()
    out = {}
    for tower in ((False, True) if has_tower else (False,)):
        for runtime in ("torch", "auto"):
            snap = open_snapshot(snapshot_dir, query_runtime=runtime, query_tower=tower)
            hits = snap.searcher.search_batch(texts, k=100, mode="dense")
            run = run_from_hits(qids, [[(h.doc_id, h.score) for h in hs] for hs in hits])
            label = f"{'tower' if tower else 'full'} {runtime}"
            out[label] = (evaluate(run, qrels, ["ndcg@10"]).mean["ndcg@10"], snap.query_encoder)
    return out


def library_times(snapshot_dir: Path, queries: list[str], modes: list[str], k: int,
                  query_tower: bool = True) -> dict[str, float]:
    """Median in-process seconds per query of `Searcher.search`, per mode (anonymous caller).

    The snapshot is opened as the server opens it (``query_runtime=auto``, the query tower when
    it has one, unless ``query_tower`` is False), so both sides encode queries with the same encoder.
    """
    from corpusforge.serve import open_snapshot

    snap = open_snapshot(snapshot_dir, query_tower=query_tower)
    out = {}
    for mode in modes:
        for q in queries[:20]:  # warm-up
            snap.searcher.search(q, k=k, mode=mode)
        times = []
        for q in queries:
            t0 = time.perf_counter()
            snap.searcher.search(q, k=k, mode=mode)
            times.append(time.perf_counter() - t0)
        out[mode] = statistics.median(times)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "corpusforge.cli", "serve", "--root", args.root, "--index", args.index,
           "--alias", args.alias, "--port", str(port), "--poll-seconds", "0", "--no-access-log",
           "--cache-size", str(args.cache_size), "--query-tower" if args.query_tower else "--no-query-tower"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not become ready; see {args.server_log}")
        time.sleep(0.5)


def run_wrk(url: str, script: Path, bodies: Path, concurrency: int, duration: float) -> dict:
    threads = 1  # one event-driven wrk thread drives 64 connections and leaves the server more CPU
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration:g}s", "--timeout", "10s",
           "-s", str(script), url + "/search"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CF_BODIES": str(bodies)}, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("CFRESULT "))
    result = json.loads(line[len("CFRESULT "):])
    result["errors"] = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def run_python_load(url: str, bodies: Path, concurrency: int, duration: float) -> dict:
    """`run_wrk`'s measurement without wrk: `concurrency` connections POST the bodies round-robin.

    Args:
        url: the server's base URL.
        bodies: a file of JSON request bodies, one a line.
        concurrency: connections, each with one request in flight at a time.
        duration: seconds of load.

    Returns:
        The same keys as `run_wrk` (requests, duration_us, per-kind errors, p50/p99/mean latency,
        errors, rps).
    """
    import httpx
    import numpy as np

    lines = bodies.read_text().splitlines()
    latencies: list[float] = []
    errors = dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0)

    async def client_loop(client, cid: int, stop_at: float) -> None:
        i = cid * 37  # clients start at different bodies, as wrk's threads do
        while time.perf_counter() < stop_at:
            i += 1
            start = time.perf_counter()
            try:
                r = await client.post(url + "/search", content=lines[i % len(lines)],
                                      headers={"content-type": "application/json"})
                if r.status_code > 399:  # wrk's definition of a status error
                    errors["status"] += 1
            except httpx.TimeoutException:
                errors["timeout"] += 1
            except httpx.ConnectError:
                errors["connect"] += 1
            except httpx.WriteError:
                errors["write"] += 1
            except httpx.TransportError:
                errors["read"] += 1
            latencies.append(time.perf_counter() - start)

    async def load() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(client, c, start + duration) for c in range(concurrency)))
            return time.perf_counter() - start

    elapsed = asyncio.run(load())
    lat_us = np.array(latencies or [0.0]) * 1e6
    result = {"requests": len(latencies), "duration_us": int(elapsed * 1e6), **errors,
              "p50_us": int(np.percentile(lat_us, 50)), "p99_us": int(np.percentile(lat_us, 99)),
              "mean_us": float(lat_us.mean())}
    result["errors"] = sum(errors.values())
    result["rps"] = result["requests"] / elapsed
    return result


def build_demo_snapshot(work: Path) -> str:
    """Run the demo pipeline into `work` (the CLI, as a user would); returns its snapshot root."""
    out = subprocess.run([sys.executable, "-m", "corpusforge.cli", "run", str(ROOT / "pipelines" / "demo.yaml"),
                          "-w", str(work)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise SystemExit(f"the demo pipeline failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return str(work / "snapshots")


def batch_totals(url: str) -> tuple[float, float]:
    """(queries, calls) of the server's search micro-batches so far (its Prometheus histogram)."""
    text = httpx.get(url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("corpusforge_search_batch_size_sum", "corpusforge_search_batch_size_count"))}
    return values.get("corpusforge_search_batch_size_sum", 0.0), values.get("corpusforge_search_batch_size_count", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="snapshot store root (default workspace/snapshots)")
    p.add_argument("--index", default=None, help="index name (default scifact, demo with --smoke)")
    p.add_argument("--alias", default="production")
    p.add_argument("--data", default=str(SCIFACT), help="BEIR directory whose test queries are sent (SciFact)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per (mode, concurrency) cell")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--modes", default="dense,bm25,hybrid")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cache-size", type=int, default=0, help="server result cache (0: every request searches)")
    p.add_argument("--query-tower", action=argparse.BooleanOptionalAction, default=True,
                   help="serve queries with the snapshot's distilled query tower when it has one")
    p.add_argument("--server-log", default=str(Path(tempfile.gettempdir()) / "corpusforge-bench-serve.log"))
    p.add_argument("--load-generator", choices=["auto", "wrk", "python"], default="auto",
                   help="auto: wrk when installed, else the Python event loop")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: the demo snapshot (built in a temporary workspace unless --root is given), "
                        "its test queries, 1 s per cell at concurrency 1 and 4")
    args = p.parse_args()
    smoke_ws = None
    if args.smoke:
        args.data, args.duration, args.concurrency = str(DEMO), 1.0, "1,4"
        args.index = args.index or "demo"
        if args.root is None:
            smoke_ws = Path(tempfile.mkdtemp(prefix="cf-bench-serve-smoke-"))
            args.root = build_demo_snapshot(smoke_ws)
    args.root = args.root or str(ROOT / "workspace" / "snapshots")
    args.index = args.index or "scifact"
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    if generator == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk not found (Debian: apt-get install -y wrk); --load-generator python needs none")
    load = run_wrk if generator == "wrk" else (lambda url, script, bodies, c, d: run_python_load(url, bodies, c, d))
    try:
        bench(args, generator, load)
    finally:
        if smoke_ws is not None:
            shutil.rmtree(smoke_ws, ignore_errors=True)


def bench(args, generator: str, load) -> None:
    """Measure the library, then the endpoint under load (see the module docstring)."""
    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    _, queries, _ = test_split(Path(args.data))

    from corpusforge.snapshots import SnapshotStore

    store = SnapshotStore(args.root)
    version = store.resolve(args.index, args.alias)
    snapshot_dir = store.fetch(args.index, version)
    quality = encoder_quality(snapshot_dir, Path(args.data))
    lib = library_times(snapshot_dir, queries, modes, args.k, args.query_tower)

    work = Path(tempfile.mkdtemp(prefix="cf-bench-serve-"))
    script = work / "post.lua"
    script.write_text(LUA)
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for mode in modes:
            bodies = work / f"{mode}.jsonl"
            bodies.write_text("".join(json.dumps({"query": q, "k": args.k, "mode": mode}) + "\n" for q in queries))
            load(url, script, bodies, 4, min(3.0, args.duration))  # warm-up, not reported
            for c in levels:
                before = batch_totals(url)
                r = load(url, script, bodies, c, args.duration)
                after = batch_totals(url)
                calls = after[1] - before[1]
                r["batch"] = (after[0] - before[0]) / calls if calls else float("nan")
                per_query = r["p50_us"] / 1e3 if c == 1 else 1e3 / r["rps"]
                rows.append((mode, c, r, per_query, per_query / (lib[mode] * 1e3)))
                print(f"{mode:7s} c={c:<3d} {r['rps']:8.1f} req/s  p50 {r['p50_us'] / 1e3:7.2f} ms  "
                      f"p99 {r['p99_us'] / 1e3:7.2f} ms  errors {r['errors']}  batch {r['batch']:.2f}", flush=True)
        served = httpx.get(url + "/snapshot").json()["manifest"]["query_encoder"]
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nsnapshot {args.index}/{version}, {len(queries)} test queries, k={args.k}, "
          f"{args.duration:g} s per cell, server cache size {args.cache_size}, load from {generator} on 127.0.0.1, "
          f"{os.cpu_count()} CPUs")
    for label, (ndcg, info) in quality.items():
        print(f"query encoder {label:11s}: dense nDCG@10 on the test split {ndcg:.4f}  ({json.dumps(info)})")
    print(f"served query encoder: {json.dumps(served)}")
    print("library in-process Searcher.search, median per query: "
          + ", ".join(f"{m} {lib[m] * 1e3:.2f} ms" for m in modes))
    head = f"{'mode':7s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s} " \
           f"{'ms/query':>9s} {'x library':>9s} {'batch':>6s}"
    print(head)
    print("-" * len(head))
    for mode, c, r, per_query, ratio in rows:
        print(f"{mode:7s} {c:4d} {r['rps']:8.1f} {r['p50_us'] / 1e3:8.2f} {r['p99_us'] / 1e3:8.2f} "
              f"{r['errors']:6d} {per_query:9.2f} {ratio:9.2f} {r['batch']:6.2f}")
    print("ms/query: p50 latency at concurrency 1, else 1000 / (req/s); x library: ms/query over the "
          "library's median in-process time per query; batch: mean queries per search call (micro-batching)")
    total_errors = sum(r["errors"] for _, _, r, _, _ in rows)
    dense16 = [r for m, c, r, _, _ in rows if m == "dense" and c == 16]
    if dense16:
        print(f"dense p99 at concurrency 16: {dense16[0]['p99_us'] / 1e3:.2f} ms (target < 50 ms)")
    print(f"total errors: {total_errors}")
    if total_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
