"""The full SciFact training recipe, timed: `python bench/train.py [--spec ...] [--workspace ...]`.

Runs `corpusforge.train.loop.train_pipeline` (base pipeline up to the index when not built yet --
timed separately and excluded from the recipe figure -- then mining, bi-encoder, re-embed,
re-index, reranker, evaluation, publish) and prints wall-clock per section, training examples/s,
and test nDCG@10 per mode next to the base model's, measured in the same run (the reference), as
ratios. Run it under the heavy lock: `flock /tmp/corpusforge-heavy.lock python bench/train.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "pipelines" / "scifact-train.yaml"))
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--out", default=None, help="write the full report JSON here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("CORPUSFORGE_THREADS", "2")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("mlflow", "alembic", "great_expectations", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from corpusforge.spec import load_spec
    from corpusforge.train.loop import train_pipeline

    t0 = time.perf_counter()
    report = train_pipeline(load_spec(args.spec), workspace=args.workspace)
    wall = time.perf_counter() - t0
    sec = report["seconds"]
    print(f"\ndevice: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    print(f"wall-clock total {wall:.0f}s; base pipeline {sec.get('base_pipeline', 0):.0f}s; "
          f"training recipe {sec['recipe_without_base_pipeline']:.0f}s ({sec['recipe_without_base_pipeline'] / 60:.1f} min)")
    for name, s in sec.items():
        print(f"  {name:28s} {s:8.1f}s")
    print(f"bi-encoder: {report['biencoder']['examples_per_s']:.2f} examples/s, {report['biencoder']['steps']} steps, "
          f"dev-pool nDCG@10 per epoch {[round(x, 4) for x in report['biencoder']['dev']]}")
    if "reranker" in report:
        print(f"reranker:   {report['reranker']['examples_per_s']:.2f} examples/s, {report['reranker']['steps']} steps, "
              f"fusion weight {report['reranker']['fusion_weight']}")
    print(f"re-embed: {report['reembed']['chunks']} chunks in {report['reembed']['seconds']:.0f}s")
    print("\nnDCG@10        dev(base)  dev(trained)  test(base)  test(trained)  test ratio")
    base_t, base_d = report["test_base"], report["dev_base"]
    for mode, vals in report["test"].items():
        ref = base_t.get(mode.split("+")[0], {}).get("ndcg@10")
        print(f"{mode:14s} {base_d.get(mode, {}).get('ndcg@10', float('nan')):9.4f}  "
              f"{report['dev'].get(mode, {}).get('ndcg@10', float('nan')):12.4f}  "
              f"{ref if ref is not None else float('nan'):10.4f}  {vals['ndcg@10']:13.4f}  "
              f"{vals['ndcg@10'] / ref if ref else float('nan'):10.3f}")
    if report.get("publish"):
        p = report["publish"]
        print(f"\nsnapshot {p['index']}/{p['version']} production {'moved' if p['promoted'] else 'kept'}: "
              f"dev {p['dev_ndcg_10']:.4f} vs bar {p['bar']:.4f} ({p['bar_from']})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
