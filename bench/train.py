"""The training branch of the stage graph, timed: `python bench/train.py [--spec ...] [--workspace ...]`.

Runs the spec's whole graph (`Pipeline.run`: the base stages when not built yet, then mine, fit the
bi-encoder, re-embed, re-index, fit the reranker, evaluate, publish) and prints wall time per stage,
training steps and examples/s, peak RSS, and test nDCG@10 per mode next to the base model's,
evaluated in the same run (the reference), as ratios. ``--smoke`` runs pipelines/demo-train.yaml
in a temporary workspace up to the bi-encoder, one step (the default suite runs it so the script
cannot rot).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default=str(ROOT / "pipelines" / "scifact-train.yaml"))
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--out", default=None, help="write the stage summaries as JSON here")
    ap.add_argument("--until", default=None, help="the last stage to run (default: the whole graph)")
    ap.add_argument("--smoke", action="store_true",
                    help="demo-train in a temporary workspace, one bi-encoder step, up to train_retriever")
    args = ap.parse_args()
    if args.smoke:
        args.spec, args.workspace = str(ROOT / "pipelines" / "demo-train.yaml"), tempfile.mkdtemp(prefix="cf-train-")
        args.until = "train_retriever"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from corpusforge.evaluation.offline import evaluate_modes, judged_queries, load_searcher
    from corpusforge.pipeline import Pipeline
    from corpusforge.spec import load_spec
    from corpusforge.stages import Retriever

    spec = load_spec(args.spec)
    if args.smoke:  # one optimiser step
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 1})})
    if not spec.train.enabled:
        raise SystemExit(f"{args.spec}: train.enabled is false")
    pipeline = Pipeline(spec, workspace=args.workspace, progress=not args.smoke)
    t0 = time.perf_counter()
    results = {r.stage: r for r in pipeline.run(until=args.until)}
    wall = time.perf_counter() - t0
    print(f"\n{spec.name}: wall time {wall:.0f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    for name, r in results.items():
        extra = ""
        if "examples_per_s" in r.summary:
            s = r.summary
            extra = (f"{s['steps']}/{s['planned_steps']} steps, {s['examples_per_s']:.2f} examples/s"
                     + (", TRUNCATED" if s.get("truncated") else ""))
        print(f"  {name:16s} {'skipped' if r.skipped else f'{r.seconds:8.1f} s'}  {extra}")
    if args.out:
        Path(args.out).write_text(json.dumps({k: r.summary for k, r in results.items()}, indent=2, default=str))
    if "publish" not in results:
        return

    # the reference, in the same run: the base model's indexes on the same test queries
    ws = pipeline.ws
    base = Retriever(spec.model, ws.dataset("embeddings"), ws.index_dir / "dense", ws.index_dir / "bm25", None, None,
                     False)
    searcher, _ = load_searcher(spec, ws, base)
    queries, qrels = judged_queries(spec, spec.evaluate.split)
    reference = evaluate_modes(searcher, queries, qrels, k=spec.evaluate.k, modes=spec.evaluate.modes)
    trained = results["evaluate"].summary["modes"]
    print(f"\nnDCG@10 ({spec.evaluate.split}, {len(qrels)} queries)   base   trained   ratio")
    for mode, values in trained.items():
        ref = reference.get(mode.split("+")[0], {}).get("ndcg@10")
        now = values["metrics"]["ndcg@10"]
        print(f"  {mode:16s} {ref:10.4f} {now:9.4f} {now / ref if ref else float('nan'):7.3f}")
    pub = results["publish"].summary
    print(f"\nsnapshot {pub['index']}/{pub['version']}: {pub['alias']} "
          f"{'moved' if pub['promoted'] else 'kept'} ({pub.get('promotion')})")


if __name__ == "__main__":
    main()
