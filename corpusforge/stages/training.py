"""The training stages: mine hard negatives, fit the bi-encoder, fit the late-interaction reranker.

All three read the TRAINING judgments only (a seeded share of them is the dev split used for model
selection); the test split is never read here. Each trains for a fixed number of steps from its
seed, so the same spec gives the same model on the same hardware whatever the machine's load; a
time budget (``max_train_seconds``) is only a guard. Checkpoints live under a directory named by
the stage's fingerprint, so a killed run resumes where it stopped and a changed spec never
resumes someone else's checkpoint.

Memory: mining holds the base dense vectors whole (similarities to positives); training holds the
training passages (one per judged document) and the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from corpusforge.data import datasets
from corpusforge.spec import PipelineSpec
from corpusforge.stages import StageContext, retriever
from corpusforge.stages.checks import enforce

log = logging.getLogger("corpusforge.train")

TRAINING_PAIRS = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("grade", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=False),  # train | dev
], metadata={"dataset": "training_pairs"})

DEV_POOL = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("doc_ids", pa.list_(pa.string()), nullable=False),  # BM25 #1, dense #1, BM25 #2, ...
], metadata={"dataset": "dev_pool"})

MODEL_INFO = "corpusforge.json"  # written last into a trained model directory


def training_data(ctx: StageContext):
    """The spec's training queries, train/dev judgments and passages (`train.data.TrainingData`)."""
    from corpusforge.train.data import training_data_for

    return training_data_for(ctx.spec, ctx.ws)


def _searcher(ctx: StageContext, trained: bool):
    """The searcher over the base build or the trained retriever, and its encoder."""
    from corpusforge.evaluation.offline import load_searcher
    from corpusforge.stages import Retriever

    r = retriever(ctx.spec, ctx.ws)
    if not trained:
        ws = ctx.ws
        r = Retriever(ctx.spec.model, ws.dataset("embeddings"), ws.index_dir / "dense", ws.index_dir / "bm25",
                      None, None, False)
    return load_searcher(ctx.spec, ctx.ws, r)


def mine(ctx: StageContext) -> dict[str, Any]:
    """Hard negatives (BM25 + base dense, positives excluded, margin-filtered), training pairs, dev pool.

    Returns:
        Counts, and the base model's dev metrics per mode (the bar the trained build is compared with).
    """
    from corpusforge.evaluation.offline import evaluate_modes, ranked_docs
    from corpusforge.index.bm25 import BM25Index
    from corpusforge.index.dense import DenseIndex
    from corpusforge.stages.model import load_vectors
    from corpusforge.train.mining import MiningConfig, mine_hard_negatives

    spec, ws = ctx.spec, ctx.ws
    data = training_data(ctx)
    searcher, encoder = _searcher(ctx, trained=False)
    _, vectors = load_vectors(ws.dataset("embeddings"))
    chunk_docs = datasets.read_table(ws.dataset("chunks"), columns=["doc_id"]).column("doc_id").to_pylist()
    bm25 = BM25Index.load(ws.index_dir / "bm25")
    dense = DenseIndex.load(ws.index_dir / "dense")
    mcfg = MiningConfig(n=spec.train.hard_negatives, depth=spec.train.mining_depth, margin=spec.train.margin)
    mined = mine_hard_negatives(data.queries, data.train_qrels, chunk_docs, vectors, encoder.encode_queries,
                                bm25.search, dense.search, mcfg, out_path=ws.train_dir / "hard_negatives")
    del vectors
    rows = [(q, d, int(g), split) for split, qrels in (("train", data.train_qrels), ("dev", data.dev_qrels))
            for q in sorted(qrels) for d, g in sorted(qrels[q].items())]
    _write(ws.train_dir / "training_pairs", TRAINING_PAIRS, {
        "query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows], "grade": [r[2] for r in rows],
        "split": [r[3] for r in rows]})
    dev_texts = [data.queries[q] for q in data.dev_ids]
    pool = [[x for pair in zip(b, d) for x in pair]  # interleaved: bm25 #1, dense #1, ...
            for b, d in zip(ranked_docs(searcher, dev_texts, "bm25", 50), ranked_docs(searcher, dev_texts, "dense", 50),
                            strict=True)]
    _write(ws.train_dir / "dev_pool", DEV_POOL, {"query_id": data.dev_ids, "doc_ids": pool})
    enforce(spec, ws, ["training_pairs", "hard_negatives"])
    dev_base = evaluate_modes(searcher, data.queries, data.dev_qrels)
    return {"rows": mined.num_rows, "queries": len(set(mined.column("query_id").to_pylist())), **data.summary(),
            "mining": {"n": mcfg.n, "depth": mcfg.depth, "margin": mcfg.margin},
            "dev_base": {m: v["ndcg@10"] for m, v in dev_base.items()}}


def _write(path: Path, schema: pa.Schema, columns: dict[str, list]) -> None:
    with datasets.DatasetWriter(path, schema) as writer:
        writer.write_table(pa.table(columns, schema=schema))
        writer.commit({"stage": "mine"})


def _negatives(ctx: StageContext) -> dict[str, list[str]]:
    from corpusforge.train.mining import negatives_by_query

    return negatives_by_query(datasets.read_table(ctx.ws.train_dir / "hard_negatives"))


def _known(data) -> dict[str, set[str]]:
    return {q: set(v) for q, v in {**data.train_qrels, **data.dev_qrels}.items()}


def biencoder_config(spec: PipelineSpec):
    """The bi-encoder settings of a spec's ``train`` section (starting from the spec's model)."""
    from corpusforge.train.biencoder import BiEncoderConfig

    t = spec.train
    return BiEncoderConfig(base_model=spec.model.name, epochs=t.epochs, batch_size=t.batch_size,
                           learning_rate=t.learning_rate, warmup_ratio=t.warmup_ratio, temperature=t.temperature,
                           hard_negatives=t.negatives_per_example, max_query_length=t.max_query_length,
                           max_passage_length=t.max_passage_length, separate_towers=t.separate_towers,
                           grad_cache_chunk=t.grad_cache_chunk, seed=t.seed, checkpoint_every=t.checkpoint_every,
                           max_steps=t.max_steps, max_seconds=t.max_train_seconds, on_budget=t.on_budget,
                           threads=t.threads, device=spec.model.device, precision=_precision(spec))


def colbert_config(spec: PipelineSpec, biencoder_dir: Path):
    """The reranker settings of a spec's ``train.reranker`` section."""
    from corpusforge.retrieval.late_interaction import ColBERTConfig

    r, t = spec.train.reranker, spec.train
    return ColBERTConfig(base_model=str(biencoder_dir) if r.init == "biencoder" else "default", dim=r.dim,
                         query_length=r.query_length, doc_length=r.doc_length, epochs=r.epochs,
                         batch_size=r.batch_size, learning_rate=r.learning_rate, temperature=r.temperature,
                         hard_negatives=r.hard_negatives, distill_weight=r.distill_weight, seed=t.seed,
                         checkpoint_every=t.checkpoint_every, max_steps=t.max_steps, max_seconds=r.max_train_seconds,
                         on_budget=r.on_budget, threads=t.threads, device=spec.model.device,
                         precision=_precision(spec))


def _precision(spec: PipelineSpec) -> str:
    """Training precision from the spec's model precision (fp16 trains as bf16: no loss scaling)."""
    return getattr(spec.model, "precision", "auto")


def _checkpoints(ctx: StageContext, family: str) -> Path:
    """The checkpoint directory of this stage's recipe (named by its fingerprint)."""
    return ctx.ws.train_dir / f"{family}-{ctx.fingerprint[:16]}"


def _install(src: Path, dest: Path, info: dict[str, Any]) -> None:
    """Copy a model directory into place atomically, with `MODEL_INFO` written inside."""
    from corpusforge.data.datasets import atomic_dir

    with atomic_dir(dest) as out:
        shutil.copytree(src, out, dirs_exist_ok=True)
        (out / MODEL_INFO).write_text(json.dumps(info, indent=2, default=str))


def _log_training(ctx: StageContext, family: str, params: dict[str, Any], log_: dict[str, Any]) -> None:
    if ctx.tracker is None:
        return
    ctx.tracker.log_params({f"{family}.{k}": v for k, v in params.items()})
    for step, loss in enumerate(log_.get("losses", []), 1):
        ctx.tracker.log_metrics({f"{family}/loss": loss}, step=step)
    for epoch, dev in enumerate(log_.get("dev") or []):  # epoch 0: before training
        ctx.tracker.log_metrics({f"{family}/dev_pool/ndcg_10": dev}, step=epoch)
    ctx.tracker.log_metrics({f"{family}/examples_per_s": log_["examples_per_s"],
                             f"{family}/train_seconds": log_["train_seconds"], f"{family}/steps": log_["steps"]})
    ctx.tracker.set_tags({f"{family}.truncated": str(bool(log_.get("truncated")))})


def _register(ctx: StageContext, model_dir: Path, family: str, dev: float,
              params: dict[str, Any]) -> dict[str, Any] | None:
    """Log the model as a loadable MLflow model (bi-encoder: sentence_transformers flavor; reranker:
    pyfunc), register it as ``<prefix>-<family>`` and move ``champion`` when dev improved."""
    if ctx.tracker is None:
        return None
    from corpusforge.train.registry import register_model

    prefix = ctx.spec.train.registered_model or ctx.spec.name
    return register_model(ctx.tracker, model_dir, f"{prefix}-{family}", dev,
                          kind="biencoder" if family == "biencoder" else "reranker",
                          tags={"spec": ctx.spec.name, "fingerprint": ctx.fingerprint}, params=params,
                          metric=f"{family}/dev/ndcg_10").as_dict()


def train_retriever(ctx: StageContext) -> dict[str, Any]:
    """Fit the bi-encoder from the spec's model; keep the epoch with the best dev nDCG@10.

    Returns:
        Steps, examples/s, dev nDCG@10 per epoch (0 = before training), whether a budget
        truncated it, and its registered model version (when tracked).
    """
    from corpusforge.train.biencoder import BiEncoderTrainer, DevPool

    data = training_data(ctx)
    cfg = biencoder_config(ctx.spec)
    pool_table = datasets.read_table(ctx.ws.train_dir / "dev_pool")
    candidates = dict(zip(pool_table.column("query_id").to_pylist(), pool_table.column("doc_ids").to_pylist(),
                          strict=True))
    out = _checkpoints(ctx, "biencoder")
    trainer = BiEncoderTrainer(cfg, data.queries, data.passages, out)
    result = trainer.train(data.pairs(), _negatives(ctx), _known(data),
                           dev_eval=DevPool(data.dev_qrels, candidates, depth=ctx.spec.train.dev_pool_depth))
    summary = {k: v for k, v in result.items() if k not in ("losses", "config", "dev")}
    summary |= {"dev_per_epoch": result["dev"], "loss_first": result["losses"][:3],
                "loss_last": result["losses"][-3:], "truncated": bool(result.get("truncated")),
                "fingerprint": ctx.fingerprint}
    # what the model is, not how long it took: equal recipes give byte-equal model folders. The
    # stage fingerprint is recorded here, not stamped afterwards: the model's fingerprint covers this file.
    info = {k: summary.get(k) for k in ("fingerprint", "steps", "planned_steps", "truncated", "best_dev",
                                        "best_epoch", "dev_per_epoch")}
    _install(trainer.best_dir, ctx.ws.trained_model_dir, info | {datasets.FINGERPRINT_KEY: ctx.fingerprint})
    from corpusforge.encoding.models import model_fingerprint

    model_fingerprint.cache_clear()  # the model directory's content just changed
    params = dict(result["config"])
    _log_training(ctx, "biencoder", params, result)
    summary["registry"] = _register(ctx, ctx.ws.trained_model_dir, "biencoder", result["best_dev"] or 0.0, params)
    del trainer
    shutil.rmtree(out, ignore_errors=True)  # the model is in place; checkpoints are done with
    return summary


def train_reranker(ctx: StageContext) -> dict[str, Any]:
    """Fit the late-interaction reranker, precompute its document vectors, tune the fusion weight on dev.

    Returns:
        Steps, examples/s, the tuned weight with its dev grid, dev nDCG@10 of reranked hybrid,
        truncation and the registered model version (when tracked).
    """
    from corpusforge.data.datasets import atomic_dir
    from corpusforge.evaluation.offline import evaluate_modes
    from corpusforge.retrieval.late_interaction import LateInteraction
    from corpusforge.retrieval.rerank import RERANKER_DIR, Reranker, add_reranker_to_build
    from corpusforge.train.colbert import train_colbert, tune_fusion_weight

    spec, ws = ctx.spec, ctx.ws
    rr = spec.train.reranker
    data = training_data(ctx)
    cfg = colbert_config(spec, ws.trained_model_dir)
    li = LateInteraction(cfg)
    teacher = _teacher(ctx, data) if cfg.distill_weight > 0 else None
    out = _checkpoints(ctx, "colbert")
    result = train_colbert(li, data.queries, data.passages, data.pairs(), _negatives(ctx), _known(data), out,
                           teacher=teacher)
    with atomic_dir(ws.reranker_model_dir) as model_dir:
        li.save(model_dir)
    del li
    searcher, _ = _searcher(ctx, trained=True)
    staging = ws.base / f".reranker-build-{ctx.fingerprint[:16]}"
    shutil.rmtree(staging, ignore_errors=True)
    add_reranker_to_build(staging, ws.reranker_model_dir, ws.dataset("chunks"), fusion_weight=1.0, depth=rr.depth,
                          precompute=rr.precompute)
    reranker = Reranker(staging / RERANKER_DIR, fusion_weight=1.0)
    texts = [data.queries[q] for q in data.dev_ids]
    from corpusforge.retrieval.search import UNRESTRICTED

    hits = searcher.search_batch(texts, k=rr.depth, mode="hybrid", acl=UNRESTRICTED)
    candidates = {q: [(h.doc_id, h.score, float(x)) for h, x in zip(hs, reranker.scores(text, hs), strict=True)]
                  for q, text, hs in zip(data.dev_ids, texts, hits, strict=True)}
    weight, grid = tune_fusion_weight(candidates, data.dev_qrels)
    reranker.fusion_weight = weight
    dev = evaluate_modes(searcher, data.queries, data.dev_qrels, modes=(), reranker=reranker, depth=rr.depth)
    summary = {k: v for k, v in result.items() if k not in ("losses", "config")}
    summary |= {"fusion_weight": weight, "dev_grid": {str(k): v for k, v in grid.items()},
                "dev": {m: v["ndcg@10"] for m, v in dev.items()}, "truncated": bool(result.get("truncated")),
                "loss_first": result["losses"][:3], "loss_last": result["losses"][-3:],
                "fingerprint": ctx.fingerprint}
    meta_path = staging / RERANKER_DIR / "reranker.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"fusion_weight": weight,
                                                                         "dev_grid": summary["dev_grid"]}, indent=2))
    params = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    _log_training(ctx, "colbert", params, result)
    summary["registry"] = _register(ctx, ws.reranker_model_dir, "colbert", dev["hybrid+rerank"]["ndcg@10"], params)
    with atomic_dir(ws.reranker_build_dir) as final:
        shutil.rmtree(final)
        (staging / RERANKER_DIR).rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return summary


def _teacher(ctx: StageContext, data):
    """Distillation teacher: the trained bi-encoder's cosine scores."""
    from corpusforge.encoding.encoder import Encoder

    enc = Encoder(retriever(ctx.spec, ctx.ws).model)

    def score(qid: str, docs: list[str]):
        q = enc.encode_queries([data.queries[qid]])[0]
        return enc.encode_passages([data.passages[d] for d in docs]) @ q
    return score
