"""Benchmark: our `Encoder.encode_passages` against `SentenceTransformer.encode` on SciFact chunks.

Both run in this process on the same model directory, the same texts and the same batch size,
after a warm-up, in alternating order (ours first on even repeats, sentence-transformers first on
odd ones) so that drifting machine load hits both alike. Prints each side's throughput per repeat,
the median ratio ours / sentence-transformers (higher is better; must be >= 1.0), the min and
mean cosine between the two sets of vectors (must be >= 0.999), and the padding each side's
batching spends, which is where the difference comes from on a CPU: both run the same kernels,
but sentence-transformers sorts texts by character count, we by exact token count.

With ``--stage`` it also times `embed_chunks` on the subset twice over one fresh cache: a cold
run (everything embedded) and a warm one (everything from the cache).

Example:
    .venv/bin/python bench/embed.py --limit 1000 --repeats 3
    .venv/bin/python bench/embed.py --smoke   # seconds: the demo corpus, one repeat (CI keeps it running)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
SMOKE_CORPUS = ROOT / "examples" / "demo" / "corpus.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl")
    p.add_argument("--limit", type=int, default=1000, help="chunks sampled (seeded) from the chunked corpus; 0 = all")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each implementation")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass, both sides")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="our encoder's precision (auto: bf16 on CPUs with native bf16); ST runs fp32")
    p.add_argument("--stage", action="store_true", help="also time embed_chunks cold and warm (cache)")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds on the demo corpus (one repeat, --stage); the speed verdict is not enforced")
    args = p.parse_args(argv)
    if args.smoke:
        args.corpus, args.limit, args.repeats, args.batch_size, args.stage = SMOKE_CORPUS, 16, 1, 8, True
    return args


def load_chunks(corpus: Path) -> list[str]:
    """SciFact chunk texts from the project's chunker with the default config and tokenizer."""
    from corpusforge.text.chunk import Chunker
    from corpusforge.encoding.models import load_tokenizer
    from corpusforge.spec import ChunkConfig

    docs = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs.append({"doc_id": str(d["_id"]), "title": d.get("title") or "", "text": d.get("text") or ""})
    chunker = Chunker(ChunkConfig(), load_tokenizer("default"))
    return [row["text"] for row in chunker.chunk_many(docs)]


def padded_tokens(lengths: np.ndarray, sort_key: np.ndarray, batch_size: int) -> int:
    """Tokens a padded forward pass processes when batches are cut from texts sorted by `sort_key`."""
    order = np.argsort(-sort_key, kind="stable")
    return int(sum(lengths[order[i:i + batch_size]].max() * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size)))


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows even when piped
    import torch
    from sentence_transformers import SentenceTransformer

    from corpusforge.encoding.encoder import Encoder
    from corpusforge.encoding.models import resolve_model_path
    from corpusforge.spec import ModelConfig

    t0 = time.perf_counter()
    all_texts = load_chunks(args.corpus)
    rng = random.Random(args.seed)
    texts = all_texts if not args.limit or args.limit >= len(all_texts) else rng.sample(all_texts, args.limit)
    print(f"corpus: {args.corpus}  chunks: {len(all_texts):,}  benchmarked: {len(texts):,} "
          f"(chunked in {time.perf_counter() - t0:.1f}s)")

    cfg = ModelConfig(batch_size=args.batch_size, precision=args.precision)
    ours = Encoder(cfg)
    st = SentenceTransformer(str(resolve_model_path(cfg.name)), device=str(ours.device))
    st.max_seq_length = ours.max_seq_length
    print(f"model: {ours.model_dir}\ndevice: {ours.device}  torch threads: {torch.get_num_threads()}  "
          f"batch size: {args.batch_size}  max_seq_length: {ours.max_seq_length}")

    lengths = np.array([len(x) for x in ours.tokenize(texts, cfg.passage_prefix)])
    chars = np.array([len(t) for t in texts])
    pad_ours = padded_tokens(lengths, lengths, args.batch_size)
    pad_st = padded_tokens(lengths, chars, args.batch_size)
    print(f"tokens: {lengths.sum():,} real (mean {lengths.mean():.0f}/chunk); padded batches process "
          f"{pad_ours:,} (ours, token-sorted) vs {pad_st:,} (sentence-transformers, char-sorted)")

    warm = texts[: 2 * args.batch_size]
    ours.encode_passages(warm, batch_size=args.batch_size)
    st.encode(warm, batch_size=args.batch_size)

    run_ours = lambda: ours.encode_passages(texts, batch_size=args.batch_size)  # noqa: E731
    run_st = lambda: st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)  # noqa: E731
    ratios, rates_ours, rates_st = [], [], []
    print(f"\n{'repeat':>6} {'order':>9} {'ours texts/s':>13} {'ST texts/s':>11} {'ratio':>7}")
    for r in range(args.repeats):
        if r % 2 == 0:
            t_ours, v_ours = timed(run_ours)
            t_st, v_st = timed(run_st)
        else:
            t_st, v_st = timed(run_st)
            t_ours, v_ours = timed(run_ours)
        rates_ours.append(len(texts) / t_ours)
        rates_st.append(len(texts) / t_st)
        ratios.append(t_st / t_ours)
        print(f"{r:>6} {'ours,ST' if r % 2 == 0 else 'ST,ours':>9} {rates_ours[-1]:>13.1f} "
              f"{rates_st[-1]:>11.1f} {ratios[-1]:>7.3f}", flush=True)

    cos = (v_ours * v_st).sum(1) / np.linalg.norm(v_ours, axis=1) / np.linalg.norm(v_st, axis=1)
    ratio = statistics.median(ratios)
    print(f"\nmedian throughput: ours {statistics.median(rates_ours):.1f} texts/s, "
          f"sentence-transformers {statistics.median(rates_st):.1f} texts/s")
    print(f"median ratio ours/ST: {ratio:.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"cosine ours vs ST: min {cos.min():.6f}  mean {cos.mean():.6f}")

    if args.stage:
        stage_bench(texts, cfg, ours)

    ok = ratio >= 1.0 and cos.min() >= 0.999
    print("PASS" if ok else "FAIL", "(needs median ratio >= 1.0 and min cosine >= 0.999)")
    if args.smoke:  # too few texts for a speed verdict; the vectors must still agree
        return 0 if cos.min() >= 0.999 else 1
    return 0 if ok else 1


def stage_bench(texts: list[str], cfg, encoder) -> None:
    """Time embed_chunks over the subset: cold (fresh cache) and warm (all cached)."""
    from corpusforge.data import datasets
    from corpusforge.encoding.embed import embed_chunks
    from corpusforge.data.schemas import CHUNKS

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with datasets.DatasetWriter(tmp / "chunks", CHUNKS) as w:
            w.write_rows({"chunk_id": f"c{i}", "doc_id": "d", "ordinal": i, "text": t, "n_tokens": 1,
                          "char_start": 0, "char_end": len(t), "acl": [], "metadata": "{}"}
                         for i, t in enumerate(texts))
            w.commit()
        for label in ("cold", "warm"):
            s = embed_chunks(tmp / "chunks", tmp / f"emb_{label}", tmp / "cache", cfg, progress=False, encoder=encoder)
            print(f"embed_chunks {label}: rows {s['rows']}, embedded {s['embedded']}, cached {s['cached']}, "
                  f"{s['seconds']:.2f}s, {s['chunks_per_s']:.1f} chunks/s")


if __name__ == "__main__":
    sys.exit(main())
