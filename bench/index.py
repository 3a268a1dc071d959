"""Dense index benchmark: HNSW and IVF-PQ on synthetic clustered vectors, and our search overhead.

Data: ``--n`` (default 1,000,000) deterministic 384-d vectors around 1,000 gaussian cluster centres
(each point = centre + a shared 16-d latent perturbation + small isotropic noise, so clusters
have the low intrinsic dimension real embeddings have), L2-normalised; 1,000 held-out queries from
the same distribution. Ground truth: exact inner-product search (IndexFlatIP kernel, faiss.knn).

For each index (HNSW32,Flat with efConstruction 40; IVF{nlist},PQ48x8,RFlat = IVF-PQ whose top
``k_factor*k`` candidates (k_factor 4) are re-scored exactly against the stored float vectors)
it prints build time, peak RSS during the build, recall@10 and queries/s (single-query loop and
one batched call) at two efSearch / nprobe settings. Then it times, in the same process on the
same queries, alternating and taking medians of repeats: raw ``faiss.Index.search`` with the same
SearchParameters, our ``DenseIndex.search``, and the ``Searcher`` dense path (chunk hits with
ids, text and metadata), and prints ours / raw (target <= 1.10).

Usage: ``python bench/index.py [--n 1000000] [--threads 2]``; ``--smoke`` runs the same code on
3,000 small vectors in seconds (CI keeps it running; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corpusforge.index.dense import DenseIndex, recall_at_k  # noqa: E402
from corpusforge.index.factory import ivf_nlist  # noqa: E402
from corpusforge.data.schemas import CHUNKS  # noqa: E402
from corpusforge.retrieval.search import UNRESTRICTED, Searcher  # noqa: E402
from corpusforge.spec import DenseIndexConfig, SearchConfig  # noqa: E402


def make_data(n: int, nq: int, dim: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and held-out queries from one clustered distribution (fixed seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = rng.standard_normal((16, dim), dtype=np.float32) / 4.0  # latent dims ~N(0,1) each

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for lo in range(0, m, 100_000):  # blocks keep temporaries small
            hi = min(lo + 100_000, m)
            c = centres[rng.integers(0, clusters, hi - lo)]
            z = rng.standard_normal((hi - lo, 16), dtype=np.float32)
            out[lo:hi] = c + 0.6 * (z @ basis) + 0.05 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        faiss.normalize_L2(out)
        return out

    return draw(n), draw(nq)


def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """RSS high-water mark in MiB (VmHWM since the last reset, else ru_maxrss)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def qps_single(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    for i in range(len(queries)):
        fn(queries[i:i + 1])
    return len(queries) / (time.perf_counter() - t)


def qps_batch(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - t)


def bench_index(name: str, cfg: DenseIndexConfig, settings: list[dict], xb, xq, gt) -> DenseIndex:
    """Build one index, print build time / peak memory, and recall + QPS per search setting."""
    gc.collect()
    base = rss_mb()
    reset_peak()
    index = DenseIndex.build(xb, cfg, progress=True)
    peak = peak_mb()
    rep = index.report()
    print(f"\n== {name}: factory={rep['factory']} build={rep['build_seconds']:.1f}s "
          f"(train {rep['train_seconds']:.1f}s on {rep['train_rows']} rows) "
          f"peak RSS={peak:.0f} MiB (+{peak - base:.0f} MiB over the {base:.0f} MiB before the build); "
          f"build-time recall@10 (sampled corpus queries, default params)={rep['recall_at_10']:.4f}")
    print(f"{'setting':>16} {'recall@10':>10} {'QPS single':>11} {'QPS batch':>10}")
    nsingle = min(300, len(xq))
    for s in settings:
        _, rows = index.search(xq, 10, **s)
        rec = recall_at_k(rows, gt[:, :10])
        single = qps_single(lambda q: index.search(q, 10, **s), xq[:nsingle])
        batch = qps_batch(lambda q: index.search(q, 10, **s), xq)
        label = ",".join(f"{k}={v}" for k, v in s.items())
        print(f"{label:>16} {rec:>10.4f} {single:>11.0f} {batch:>10.0f}")
        rep.setdefault("bench", []).append({"setting": s, "recall_at_10": rec, "qps_single": single,
                                             "qps_batch": batch})
    RESULTS[name] = {"report": rep, "peak_rss_mb": peak, "rss_before_mb": base}
    return index


def overhead(name: str, index: DenseIndex, searcher: Searcher, s: dict, xq: np.ndarray, repeats: int) -> None:
    """Alternate raw FAISS / DenseIndex / Searcher on the same queries; print median ratios."""
    raw = index.shards[0]
    params = index._params_for(s.get("ef_search"), s.get("nprobe"), None)  # the very same params object
    nsingle = min(300, len(xq))
    variants = {
        "raw faiss": (lambda q: raw.search(q, 10, params=params)),
        "DenseIndex": (lambda q: index.search(q, 10, **s)),
        "Searcher": (lambda q: searcher.search_batch([""] * len(q), 10, mode="dense", level="chunk",
                                                     acl=UNRESTRICTED, query_vectors=q)),
    }
    times = {(v, kind): [] for v in variants for kind in ("single", "batch")}
    names = list(variants)
    for rep in range(repeats):
        # single queries: alternate the variants query by query (rotating the order), so load
        # from other processes hits all of them alike; sum per variant per repeat
        tot = dict.fromkeys(names, 0.0)
        for i in range(nsingle):
            q = xq[i:i + 1]
            for v in names[i % 3:] + names[:i % 3]:
                t = time.perf_counter()
                variants[v](q)
                tot[v] += time.perf_counter() - t
        for v in names:
            times[(v, "single")].append(tot[v])
        for v in names[rep % 3:] + names[:rep % 3]:
            t = time.perf_counter()
            variants[v](xq)
            times[(v, "batch")].append(time.perf_counter() - t)
    print(f"\n-- search-layer overhead, {name} {s} (median of {repeats}; single = {nsingle} one-query calls, "
          f"batch = one call of {len(xq)})")
    out = {}
    for kind in ("single", "batch"):
        ref = statistics.median(times[("raw faiss", kind)])
        for v in variants:
            med = statistics.median(times[(v, kind)])
            out[f"{v}/{kind}"] = med / ref
            print(f"   {kind:>6} {v:>11}: {med * 1e3:9.1f} ms   ratio vs raw faiss = {med / ref:.3f}")
    RESULTS[name]["overhead"] = {"setting": s, **out}


RESULTS: dict = {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="corpus vectors (default 1,000,000)")
    ap.add_argument("--nq", type=int, default=1000, help="held-out queries (default 1000)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    ap.add_argument("--repeats", type=int, default=5, help="repeats for the overhead medians")
    ap.add_argument("--skip-hnsw", action="store_true", help="only the IVF-PQ index")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pq-bits", type=int, default=8, help="bits per PQ code (8: 256 centroids per sub-quantizer)")
    ap.add_argument("--smoke", action="store_true",
                    help="3,000 64-d vectors, 100 queries, 4-bit PQ, one thread, one repeat")
    args = ap.parse_args(argv)
    if args.smoke:  # 4-bit PQ: training 256-centroid codebooks alone would take most of a minute
        args.n, args.nq, args.dim, args.clusters, args.repeats, args.threads, args.pq_bits = 3000, 100, 64, 50, 1, 1, 4
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} threads, n={args.n}, nq={args.nq}, dim={args.dim}")

    t = time.perf_counter()
    xb, xq = make_data(args.n, args.nq, args.dim, args.clusters)
    print(f"data: {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    _, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"ground truth (exact inner product, 10-NN): {time.perf_counter() - t:.1f}s", flush=True)

    n = args.n
    chunks = pa.table({
        "chunk_id": pa.array([f"c{i}" for i in range(n)]), "doc_id": pa.array([f"d{i}" for i in range(n)]),
        "ordinal": pa.array(np.zeros(n, np.int32)), "text": pa.array([f"text {i}" for i in range(n)]),
        "n_tokens": pa.array(np.full(n, 2, np.int32)), "char_start": pa.array(np.zeros(n, np.int64)),
        "char_end": pa.array(np.full(n, 6, np.int64)),
        "acl": pa.array([[]] * n, type=pa.list_(pa.string())), "metadata": pa.array(["{}"] * n),
    }, schema=CHUNKS)

    if not args.skip_hnsw:
        cfg = DenseIndexConfig(factory="HNSW32,Flat", hnsw_ef_search=128)
        index = bench_index("HNSW32,Flat", cfg, [{"ef_search": 32}, {"ef_search": 128}], xb, xq, gt)
        overhead("HNSW32,Flat", index, Searcher(chunks, index, None, None, SearchConfig()),
                 {"ef_search": 128}, xq, args.repeats)
        del index
    nlist = ivf_nlist(n)
    m = 48 if args.dim % 48 == 0 else args.dim // 8
    factory = f"IVF{nlist},PQ{m}x{args.pq_bits},RFlat"
    cfg = DenseIndexConfig(factory=factory, ivf_nprobe=64, train_sample=max(100_000, 40 * nlist))
    index = bench_index(factory, cfg, [{"nprobe": 16}, {"nprobe": 64}], xb, xq, gt)
    overhead(factory, index, Searcher(chunks, index, None, None, SearchConfig()), {"nprobe": 64}, xq,
             args.repeats)
    best = max(b["recall_at_10"] for b in RESULTS[factory]["report"]["bench"])
    print(f"\nIVF-PQ best recall@10 = {best:.4f} (target >= 0.90): {'OK' if best >= 0.90 else 'BELOW TARGET'}")
    worst = max(v for r in RESULTS.values() for k2, v in r.get("overhead", {}).items()
                if isinstance(v, float) and not k2.startswith("raw"))
    print(f"worst search-layer / raw FAISS ratio = {worst:.3f} (target <= 1.10): "
          f"{'OK' if worst <= 1.10 else 'ABOVE TARGET'}")
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
