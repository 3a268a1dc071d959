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

Needs wrk (Debian: ``apt-get install -y wrk``). ``--cache-size 0`` (the default here) turns the
server's result cache off, so every request encodes and searches: with the cache on, the 300 test
queries repeat and almost every request after the first pass would be a cache hit. Pass
``--cache-size 4096`` to measure the cached path.
"""

from __future__ import annotations

import argparse
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
    from corpusforge.extract import read_qrels, read_queries

    queries = read_queries(str(data_dir))
    qrels = read_qrels(str(data_dir), "test")
    qids = [q for q in sorted(qrels) if q in queries]
    return qids, [queries[q] for q in qids], qrels


def encoder_quality(snapshot_dir: Path, data_dir: Path) -> dict[str, tuple[float, dict]]:
    """Dense nDCG@10 on the test split with each query encoder the server can use.

    The passage vectors are the snapshot's; only the query encoder differs (torch or int8, full
    model or the snapshot's distilled query tower), so this is what each fast path costs in quality.
    """
    from corpusforge.evaluate import evaluate, run_from_hits
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


def batch_totals(url: str) -> tuple[float, float]:
    """(queries, calls) of the server's search micro-batches so far (its Prometheus histogram)."""
    text = httpx.get(url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("corpusforge_search_batch_size_sum", "corpusforge_search_batch_size_count"))}
    return values.get("corpusforge_search_batch_size_sum", 0.0), values.get("corpusforge_search_batch_size_count", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "workspace" / "snapshots"))
    p.add_argument("--index", default="scifact")
    p.add_argument("--alias", default="production")
    p.add_argument("--data", default=str(SCIFACT), help="BEIR SciFact directory (test queries)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per (mode, concurrency) cell")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--modes", default="dense,bm25,hybrid")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cache-size", type=int, default=0, help="server result cache (0: every request searches)")
    p.add_argument("--query-tower", action=argparse.BooleanOptionalAction, default=True,
                   help="serve queries with the snapshot's distilled query tower when it has one")
    p.add_argument("--server-log", default=str(Path(tempfile.gettempdir()) / "corpusforge-bench-serve.log"))
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (Debian: apt-get install -y wrk)")
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
            run_wrk(url, script, bodies, 4, min(3.0, args.duration))  # warm-up, not reported
            for c in levels:
                before = batch_totals(url)
                r = run_wrk(url, script, bodies, c, args.duration)
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

    print(f"\nSciFact snapshot {args.index}/{version}, {len(queries)} test queries, k={args.k}, "
          f"{args.duration:g} s per cell, server cache size {args.cache_size}, wrk on 127.0.0.1, {os.cpu_count()} CPUs")
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
