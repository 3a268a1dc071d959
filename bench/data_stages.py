"""Throughput of the data stages (extract, clean, chunk) on a pipeline spec, SciFact by default.

Runs the real stages through `Pipeline.run_stage` in a fresh temporary workspace, `--repeats`
times, and prints documents/s per stage (median over repeats) and the total time of the three.

    python bench/data_stages.py [--spec pipelines/scifact.yaml] [--repeats 3]
    python bench/data_stages.py --smoke   # seconds: the demo spec once (CI keeps it running)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from corpusforge.pipeline import Pipeline
from corpusforge.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("extract", "clean", "chunk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "pipelines" / "scifact.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the demo spec, one repeat")
    args = parser.parse_args()
    if args.smoke:
        args.spec, args.repeats = str(ROOT / "pipelines" / "demo.yaml"), 1
    spec = load_spec(args.spec)
    seconds = {s: [] for s in STAGES}
    docs_in = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as ws:
            pipeline = Pipeline(spec, workspace=ws, progress=False, force=True)
            for stage in STAGES:
                t0 = time.perf_counter()
                result = pipeline.run_stage(stage)
                seconds[stage].append(time.perf_counter() - t0)
                s = result.summary
                docs_in[stage] = s["rows"] + s["quarantined"] if stage != "chunk" else \
                    pipeline_docs(pipeline)
            chunks = result.summary
    print(f"spec: {spec.name}  repeats: {args.repeats}")
    print(f"{'stage':<8} {'docs':>7} {'median s':>9} {'docs/s':>9}")
    total = 0.0
    for stage in STAGES:
        med = statistics.median(seconds[stage])
        total += med
        print(f"{stage:<8} {docs_in[stage]:>7} {med:>9.2f} {docs_in[stage] / med:>9.0f}")
    print(f"total    {'':>7} {total:>9.2f}  (budget 60 s)")
    print(f"chunks: {chunks['rows']}  tokens: {chunks['tokens']}")


def pipeline_docs(pipeline: Pipeline) -> int:
    from corpusforge.data import datasets

    return datasets.count_rows(pipeline.ws.dataset("documents_clean"))


if __name__ == "__main__":
    main()
