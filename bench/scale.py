"""Benchmark: chunk -> embed -> index on the local engine and on Ray (1 and 2 workers), at scale.

A deterministic synthetic corpus (seeded; Zipf-distributed words, log-normal document lengths
with a median of ~150 words and a long tail, a title per document) is written once as the
``documents_clean`` dataset of each run's workspace; each configuration then runs the pipeline's
own chunk, embed and index stages in a fresh process:

- ``local``: ``execution.engine: local``;
- ``ray1`` / ``ray2``: ``execution.engine: ray`` on a local Ray started with 1 or 2 CPUs
  (so 1 or 2 tasks, and embedding actors, at a time).

The encoder is a tiny, randomly initialised 2-layer BERT (64-d) built from the packaged model's
tokenizer, so encoding does not drown the engines' own costs on a CPU. The dense index is
``IVF256,PQ16x8`` in 4 shards; BM25 is built in two passes over parts of the chunks on both
engines (in Ray tasks on Ray).

Printed per configuration and stage: seconds and rows/s; and the peak RSS of the driver (the
benchmark's run process: per stage, as the pipeline measures each stage's own peak, and the largest
of them) and of the largest Ray worker process, overall and per task or actor name (sampled every
0.2 s).

Example:
    .venv/bin/python bench/scale.py --docs 100000
    .venv/bin/python bench/scale.py --smoke        # a few seconds' check of the whole path
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

STAGES = ("chunk", "embed", "index")
VOCAB = 30_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="synthetic documents")
    p.add_argument("--configs", default="local,ray1,ray2", help="comma-separated: local, ray1, ray2")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="200 documents, local engine only: a quick check of the "
                                                         "generator, the stages and the report")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- the corpus


def synthetic_documents(n: int, seed: int = 0, batch: int = 10_000):
    """Deterministic documents in batches (dict rows with the DOCUMENTS fields).

    Word ranks follow Zipf's law (a = 1.2) over the tokenizer's whole words; lengths are log-normal
    (median ~150 words, sigma 0.8: a few documents of several thousand words); paragraphs every
    ~60 words and a sentence end every ~15.
    """
    from corpusforge.data.hashing import content_hash

    from corpusforge.encoding.models import load_tokenizer

    rng = np.random.default_rng(seed)
    # whole words of the tokenizer's vocabulary (one token each), in id order: realistic token counts
    vocab = load_tokenizer("default").get_vocab()
    words = np.array([w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])
                      if w.isalpha() and w.isascii() and w.islower() and len(w) > 2][:VOCAB])
    for lo in range(0, n, batch):
        rows = []
        for i in range(lo, min(lo + batch, n)):
            length = int(min(8000, max(5, rng.lognormal(np.log(150), 0.8))))
            ranks = np.minimum(rng.zipf(1.2, size=length + 6), len(words)) - 1
            toks = words[ranks]
            body = toks[6:].tolist()
            for j in range(15, len(body), 15):
                body[j - 1] += "."
            paragraphs = [" ".join(body[j:j + 60]) for j in range(0, len(body), 60)]
            title, text = " ".join(toks[:6].tolist()), "\n\n".join(paragraphs)
            rows.append({"doc_id": f"doc{i:09d}", "title": title, "text": text, "source": "synthetic",
                         "metadata": "{}", "acl": [], "content_hash": content_hash(title, text)})
        yield rows


def write_corpus(path: Path, n: int) -> None:
    """The synthetic corpus as a committed DOCUMENTS dataset."""
    from corpusforge.data.datasets import DatasetWriter
    from corpusforge.data.schemas import DOCUMENTS

    with DatasetWriter(path, DOCUMENTS, rows_per_file=50_000) as w:
        for rows in synthetic_documents(n):
            w.write_rows(rows)
        w.commit({"stage": "bench"})


def tiny_encoder(path: Path) -> Path:
    """A 2-layer, 64-d BERT with the packaged model's tokenizer, seeded (built once)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import BertConfig, BertModel

    from corpusforge.encoding.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128, max_position_embeddings=512))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------- one run


class RssSampler:
    """Peak RSS of every Ray worker process started under this one, sampled every 0.2 s.

    Ray renames a worker process after the task or actor it runs (``ray::MapWorker(...)``,
    ``ray::_build_shard``, ``ray::IDLE``), so besides the peak per process the sampler keeps the peak
    per name: which kind of work needed the memory.
    """

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.workers: dict[int, int] = {}
        self.by_name: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            # only this run's own Ray (started by this process): other Rays on the machine do not count
            for p in me.children(recursive=True):
                try:
                    name, cmd = p.name(), " ".join(p.cmdline())
                    if not name.startswith("ray::") and "default_worker.py" not in cmd:
                        continue
                    rss = p.memory_info().rss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                self.workers[p.pid] = max(self.workers.get(p.pid, 0), rss)
                key = name.split("(", 1)[0]  # ray::MapWorker(MapBatches(...)) -> ray::MapWorker
                self.by_name[key] = max(self.by_name.get(key, 0), rss)
            self._stop.wait(0.2)

    def worker_peak_mb(self) -> float:
        """The largest peak RSS of one worker process, in MB (0 when no worker ran)."""
        return round(max(self.workers.values(), default=0) / 2**20, 1)

    def peaks_by_name_mb(self) -> dict[str, float]:
        """Peak RSS per worker process name (the task or actor it ran), in MB, largest first."""
        return {k: round(v / 2**20, 1) for k, v in sorted(self.by_name.items(), key=lambda kv: -kv[1])}


def run_one(config: str, work: Path, docs: int) -> dict:
    """Run chunk, embed and index for one configuration (in this process); returns the figures."""
    from corpusforge.data.datasets import count_rows
    from corpusforge.pipeline import Pipeline
    from corpusforge.spec import PipelineSpec

    encoder = tiny_encoder(work / "tiny-encoder")
    ws = work / config
    shutil.rmtree(ws, ignore_errors=True)
    execution = {"engine": "local"} if config == "local" else {
        "engine": "ray", "num_cpus": int(config[-1]), "object_store_mb": 256, "rows_per_task": 10_000}
    spec = PipelineSpec.model_validate({
        "name": "scale", "source": {"format": "dir", "path": str(work / "corpus")},
        "chunk": {"max_tokens": 128, "overlap_tokens": 16},
        "model": {"name": str(encoder), "batch_size": 64, "max_seq_length": 128},
        "index": {"dense": {"factory": "IVF256,PQ16x8" if docs >= 10_000 else "Flat", "shards": 4,
                            "train_sample": 20_000}},
        "execution": execution, "base_dir": str(work)})
    pipeline = Pipeline(spec, workspace=ws, progress=False)
    shutil.copytree(work / "corpus", pipeline.ws.dataset("documents_clean"))
    out = {"config": config, "docs": docs, "stages": {}}
    with RssSampler() as rss:
        for stage in STAGES:
            started = time.perf_counter()
            result = pipeline.run_stage(stage)
            seconds = time.perf_counter() - started
            rows = count_rows(pipeline.ws.dataset("chunks")) if stage != "chunk" else result.summary["rows"]
            unit_rows = docs if stage == "chunk" else rows
            out["stages"][stage] = {"seconds": round(seconds, 2), "rows": result.summary.get("rows"),
                                    "per_s": round(unit_rows / seconds, 1),
                                    "driver_peak_rss_mb": round(result.peak_rss_mb, 1)}
    # the pipeline resets the peak before each stage (so each stage reports its own), which lowers
    # ru_maxrss too: the run's peak is the largest stage peak, not ru_maxrss at the end
    out["driver_peak_rss_mb"] = max(s["driver_peak_rss_mb"] for s in out["stages"].values())
    out["worker_peak_rss_mb"] = rss.worker_peak_mb()
    out["worker_processes"] = len(rss.workers)
    out["worker_peak_rss_mb_by_name"] = rss.peaks_by_name_mb()
    return out


# --------------------------------------------------------------------------------- the table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.smoke:
        args.docs, args.configs = 200, "local"
    work = args.work or Path(tempfile.mkdtemp(prefix="cf-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run:
        print(json.dumps(run_one(args.run, work, args.docs)))
        return 0
    corpus = work / "corpus"
    if not (corpus / "_dataset.json").exists() or json.loads((corpus / "_dataset.json").read_text())["rows"] != args.docs:
        shutil.rmtree(corpus, ignore_errors=True)
        started = time.perf_counter()
        write_corpus(corpus, args.docs)
        print(f"corpus: {args.docs:,} documents in {time.perf_counter() - started:.1f}s ({work})", flush=True)
    tiny_encoder(work / "tiny-encoder")
    results = []
    for config in args.configs.split(","):
        # a fresh process per configuration: its peak RSS is its own
        proc = subprocess.run([sys.executable, __file__, "--run", config, "--docs", str(args.docs), "--work",
                               str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{config}: " + ", ".join(f"{s} {v['seconds']}s ({v['per_s']:,}/s, driver {v['driver_peak_rss_mb']} MB)"
                                        for s, v in r["stages"].items())
              + f"; peak RSS driver {r['driver_peak_rss_mb']} MB, worker {r['worker_peak_rss_mb']} MB", flush=True)
        if r["worker_peak_rss_mb_by_name"]:
            print("  worker peak RSS by task: " + ", ".join(
                f"{k} {v} MB" for k, v in list(r["worker_peak_rss_mb_by_name"].items())[:6]), flush=True)
    print()
    print("| config | docs | chunks | chunk docs/s | embed chunks/s | index chunks/s | driver peak RSS MB | "
          "worker peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["stages"]
        print(f"| {r['config']} | {r['docs']:,} | {s['chunk']['rows']:,} | {s['chunk']['per_s']:,} | "
              f"{s['embed']['per_s']:,} | {s['index']['per_s']:,} | {r['driver_peak_rss_mb']} | "
              f"{r['worker_peak_rss_mb'] or '-'} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
