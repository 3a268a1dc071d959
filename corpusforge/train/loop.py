"""The closed training loop: mine, train both models, re-embed, re-index, evaluate, publish, promote.

`train_pipeline(spec)` does, in order (each step timed and logged to one MLflow parent run with a
child run per model family, so bi-encoder and reranker runs sit side by side in the UI):

1. run the spec's pipeline up to ``index`` with its current model (skipped when unchanged);
2. load the training data (train qrels only; dev carved from them, see `data`);
3. evaluate the current model on DEV (the bar a new snapshot must clear);
4. mine hard negatives from BM25 and the current dense index (Parquet under ``train/``);
5. train the bi-encoder, selecting the epoch by dev nDCG@10 on a fixed dev pool; save it as a
   sentence-transformers directory; register it (``champion`` moves only when better on dev);
6. re-embed the corpus with it through the normal embed stage (a new model fingerprint, hence
   new cache keys) and rebuild the indexes;
7. train the late-interaction reranker, precompute its float16 document token vectors, tune the
   fusion weight on DEV, register it;
8. evaluate every mode on DEV and, for the report only, on TEST;
9. publish a snapshot whose manifest names the model versions, under alias ``candidate``; move
   ``production`` to it only when its dev nDCG@10 beats the current one's.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from corpusforge.spec import PipelineSpec
from corpusforge.train.biencoder import BiEncoderConfig, BiEncoderTrainer, DevPool
from corpusforge.train.colbert import ColBERTConfig, LateInteraction, train_colbert, tune_fusion_weight
from corpusforge.train.data import TrainingData, load_test_split, load_training_data
from corpusforge.train.mining import MiningConfig, docs_from_chunk_hits, mine_hard_negatives, negatives_by_query

log = logging.getLogger("corpusforge.train")

CANDIDATE_ALIAS = "candidate"
MODES = ("bm25", "dense", "hybrid")


class _Timer:
    """Named wall-clock sections for the report."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def section(self, name: str):
        timer = self

        class _S:
            def __enter__(self):
                self.start = time.perf_counter()
                log.info("train: %s ...", name)

            def __exit__(self, *exc):
                timer.sections[name] = time.perf_counter() - self.start
                log.info("train: %s done in %.1fs", name, timer.sections[name])
        return _S()

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def biencoder_config(spec: PipelineSpec) -> BiEncoderConfig:
    """The bi-encoder settings of a spec's ``train`` section (starting from the spec's model)."""
    t = spec.train
    return BiEncoderConfig(base_model=spec.model.name, epochs=t.epochs, batch_size=t.batch_size,
                           learning_rate=t.learning_rate, warmup_ratio=t.warmup_ratio, temperature=t.temperature,
                           hard_negatives=t.negatives_per_example, max_query_length=t.max_query_length,
                           max_passage_length=t.max_passage_length, separate_towers=t.separate_towers,
                           grad_cache_chunk=t.grad_cache_chunk, seed=t.seed, checkpoint_every=t.checkpoint_every,
                           max_steps=t.max_steps, max_seconds=t.max_train_seconds, threads=t.threads,
                           device=spec.model.device, precision=_precision(spec))


def colbert_config(spec: PipelineSpec, biencoder_dir: Path) -> ColBERTConfig:
    """The reranker settings of a spec's ``train.reranker`` section."""
    r, t = spec.train.reranker, spec.train
    return ColBERTConfig(base_model=str(biencoder_dir) if r.init == "biencoder" else "default", dim=r.dim,
                         query_length=r.query_length, doc_length=r.doc_length, epochs=r.epochs,
                         batch_size=r.batch_size, learning_rate=r.learning_rate, temperature=r.temperature,
                         hard_negatives=r.hard_negatives, distill_weight=r.distill_weight, seed=t.seed,
                         checkpoint_every=t.checkpoint_every, max_steps=t.max_steps, max_seconds=r.max_train_seconds,
                         threads=t.threads, device=spec.model.device, precision=_precision(spec))


def _precision(spec: PipelineSpec) -> str:
    """Training precision from the spec's model precision (fp16 trains as bf16: no loss scaling)."""
    return getattr(spec.model, "precision", "auto")


def _searcher(pipeline):
    from corpusforge.offline_eval import load_searcher

    return load_searcher(pipeline)


def evaluate_modes(searcher, queries: dict[str, str], qrels: dict[str, dict[str, int]], k: int = 100,
                   modes=MODES, reranker=None, depth: int = 100) -> dict[str, dict[str, float]]:
    """Mean metrics per mode (and reranked hybrid when a reranker is given).

    Args:
        searcher: a `search.Searcher`.
        queries: query id -> text.
        qrels: the judgments to evaluate against.
        k: depth of the evaluated runs.
        modes: first-stage modes.
        reranker: a `rerank.Reranker`; adds ``hybrid+rerank`` and ``dense+rerank``.
        depth: hits reranked.

    Returns:
        ``{mode: {metric: value}}``.
    """
    from corpusforge.evaluate import evaluate_searcher
    from corpusforge.search import UNRESTRICTED
    from corpusforge.train.rerank import RerankingSearcher

    out = {}
    for mode in modes:
        fn = _run_fn(searcher, mode, k)
        out[mode] = evaluate_searcher(fn, queries, qrels, k=k, batch_size=64)[0].mean
    if reranker is not None:
        rs = RerankingSearcher(searcher, reranker, depth)
        for mode in ("hybrid", "dense"):
            def fn(texts, mode=mode):
                return [[(h.doc_id, h.score) for h in hits]
                        for hits in rs.search_batch(texts, k=min(k, depth), mode=mode, acl=UNRESTRICTED)]
            out[f"{mode}+rerank"] = evaluate_searcher(fn, queries, qrels, k=min(k, depth), batch_size=64)[0].mean
    return out


def _run_fn(searcher, mode: str, k: int):
    from corpusforge.search import UNRESTRICTED

    def run(texts):
        return [[(h.doc_id, h.score) for h in hits] for hits in searcher.search_batch(texts, k=k, mode=mode,
                                                                                      acl=UNRESTRICTED)]
    return run


def _ranked_docs(searcher, texts: list[str], mode: str, k: int) -> list[list[str]]:
    from corpusforge.search import UNRESTRICTED

    return [[h.doc_id for h in hits] for hits in searcher.search_batch(texts, k=k, mode=mode, acl=UNRESTRICTED)]


def _sub(qrels: dict[str, dict[str, int]], ids) -> dict[str, dict[str, int]]:
    return {q: qrels[q] for q in ids}


def train_pipeline(spec: PipelineSpec, workspace: str | Path | None = None, progress: bool = False,
                   publish: bool = True) -> dict[str, Any]:
    """Run the closed training loop for a spec (see the module docstring).

    Args:
        spec: the pipeline spec (its ``train`` section configures training).
        workspace: the workspace root (default: the spec's).
        progress: progress bars in the pipeline stages.
        publish: publish a snapshot and consider moving ``production``.

    Returns:
        The report: timings, examples/s, dev and test metrics per mode, model versions, snapshot
        version and whether production moved.
    """
    from corpusforge import datasets
    from corpusforge.index.bm25 import BM25Index
    from corpusforge.index.dense import DenseIndex
    from corpusforge.pipeline import Pipeline, load_vectors

    timer = _Timer()
    base = Pipeline(spec, workspace=workspace, progress=progress)
    ws = base.ws
    train_dir = ws.base / "train"
    run_tag = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    prefix = spec.train.registered_model or spec.name
    report: dict[str, Any] = {"spec": spec.name, "run": run_tag}
    with timer.section("base_pipeline"):
        base.run(until="index")
    with base.tracker(run_name=f"{spec.name}-train") as parent:
        parent.set_tags({"corpusforge.train": run_tag})
        with timer.section("load_data"):
            data = load_training_data(spec.source_uri, ws.dataset("chunks"), spec.train.dev_fraction, spec.train.seed,
                                      spec.source.s3_endpoint_url)
        report["data"] = data.summary()
        parent.log_params({f"train.data.{k}": v for k, v in data.summary().items()})
        searcher, encoder = _searcher(base)
        with timer.section("dev_eval_base"):
            base_dev = evaluate_modes(searcher, data.queries, data.dev_qrels)
        report["dev_base"] = base_dev
        with timer.section("test_eval_base"):  # REPORT ONLY: the reference the trained models are compared with
            test_queries, test_qrels = load_test_split(spec.source_uri, spec.source.s3_endpoint_url)
            report["test_base"] = evaluate_modes(searcher, test_queries, test_qrels)
        parent.log_metrics({f"dev.base.{m}.ndcg@10": v["ndcg@10"] for m, v in base_dev.items()})

        # -- mining (training queries only) --------------------------------------------------------
        with timer.section("mining"):
            chunk_ids, vectors = load_vectors(ws.dataset("embeddings"))
            chunk_docs = datasets.read_table(ws.dataset("chunks"), columns=["doc_id"]).column("doc_id").to_pylist()
            bm25 = BM25Index.load(ws.index_dir / "bm25")
            dense = DenseIndex.load(ws.index_dir / "dense")
            mcfg = MiningConfig(n=spec.train.hard_negatives, depth=spec.train.mining_depth, margin=spec.train.margin)
            mined = mine_hard_negatives(data.queries, data.train_qrels, chunk_docs, vectors, encoder.encode_queries,
                                        bm25.search, dense.search, mcfg, out_path=train_dir / "hard_negatives")
            negatives = negatives_by_query(mined)
            dev_texts = [data.queries[q] for q in data.dev_ids]
            cand = {q: [x for pair in zip(b, d) for x in pair]  # interleaved: bm25 #1, dense #1, ...
                    for q, b, d in zip(data.dev_ids, _ranked_docs(searcher, dev_texts, "bm25", 50),
                                       _ranked_docs(searcher, dev_texts, "dense", 50), strict=True)}
            del vectors
        report["mining"] = {"rows": mined.num_rows, "queries": len(negatives), "n": mcfg.n, "depth": mcfg.depth,
                            "margin": mcfg.margin, "path": str(train_dir / "hard_negatives")}
        known = {q: set(v) for q, v in {**data.train_qrels, **data.dev_qrels}.items()}

        # -- bi-encoder ------------------------------------------------------------------------------
        bcfg = biencoder_config(spec)
        bi_dir = train_dir / f"biencoder-{run_tag}"
        with timer.section("biencoder_all"), parent.child("biencoder", tags={"family": "biencoder"}) as run:
            run.log_params({f"biencoder.{k}": v for k, v in bcfg.__dict__.items()} | {"mining.n": mcfg.n,
                           "mining.margin": mcfg.margin, "mining.depth": mcfg.depth})
            trainer = BiEncoderTrainer(bcfg, data.queries, data.passages, bi_dir)
            pool = DevPool(data.dev_qrels, cand, depth=spec.train.dev_pool_depth)
            with timer.section("biencoder_fit"):  # training + per-epoch dev selection only
                bi_log = trainer.train(
                    data.pairs(), negatives, known, dev_eval=pool,
                    on_step=lambda s, loss: run.log_metrics({"loss": loss}, step=s),
                    on_epoch=lambda e, dev: run.log_metrics({"dev_pool.ndcg@10": dev}, step=e) if dev is not None else None)
            if bi_log["dev"]:  # epoch 0 = the starting model, measured before the first step
                run.log_metrics({"dev_pool.ndcg@10": bi_log["dev"][0]}, step=0)
            run.log_metrics({"examples_per_s": bi_log["examples_per_s"], "train_seconds": bi_log["train_seconds"]})
            model_dir = ws.root / "models" / spec.name / f"biencoder-{run_tag}"
            model_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(trainer.best_dir, model_dir)
            report["biencoder"] = {k: v for k, v in bi_log.items() if k != "losses"} | {
                "model_dir": str(model_dir), "loss_first": bi_log["losses"][:5], "loss_last": bi_log["losses"][-5:]}
            bi_run = run
            del trainer

            # -- re-embed and re-index with the new encoder (the normal stages) -----------------------
            new_spec = spec.model_copy(update={"model": spec.model.model_copy(update={"name": str(model_dir)})})
            trained = Pipeline(new_spec, workspace=ws.root, progress=progress)
            with timer.section("reembed"):
                embed = trained.run_stage("embed")
            with timer.section("reindex"):
                trained.run_stage("index")
            report["reembed"] = {"chunks": embed.summary.get("rows"), "seconds": embed.seconds,
                                 "embedded": embed.summary.get("embedded"), "fingerprint": trained.fingerprint("embed")}
            searcher, encoder = _searcher(trained)
            with timer.section("dev_eval_trained"):
                dev_trained = evaluate_modes(searcher, data.queries, data.dev_qrels)
            run.log_metrics({f"dev.{m}.ndcg@10": v["ndcg@10"] for m, v in dev_trained.items()})
            from corpusforge.train.registry import register_model

            bi_reg = register_model(run, model_dir, f"{prefix}-biencoder", dev_trained["dense"]["ndcg@10"],
                                    tags={"spec": spec.name, "train_run": run_tag})
            report["biencoder"]["registry"] = bi_reg.as_dict()

        # -- reranker ---------------------------------------------------------------------------------
        rr = spec.train.reranker
        reranker = None
        staged_rr = None
        if rr.enabled:
            ccfg = colbert_config(spec, model_dir)
            with timer.section("reranker_all"), parent.child("colbert", tags={"family": "colbert"}) as run:
                run.log_params({f"colbert.{k}": v for k, v in ccfg.__dict__.items()})
                li = LateInteraction(ccfg)
                teacher = _teacher(trained, data) if ccfg.distill_weight > 0 else None
                with timer.section("reranker_fit"):
                    c_log = train_colbert(li, data.queries, data.passages, data.pairs(), negatives, known,
                                          train_dir / f"colbert-{run_tag}", teacher=teacher,
                                          on_step=lambda s, loss: run.log_metrics({"loss": loss}, step=s))
                rr_dir = ws.root / "models" / spec.name / f"colbert-{run_tag}"
                li.save(rr_dir)
                del li
                report["reranker"] = {k: v for k, v in c_log.items() if k != "losses"} | {
                    "model_dir": str(rr_dir), "loss_first": c_log["losses"][:5], "loss_last": c_log["losses"][-5:]}
                run.log_metrics({"examples_per_s": c_log["examples_per_s"], "train_seconds": c_log["train_seconds"]})
                from corpusforge.train.rerank import Reranker, add_reranker_to_build

                staged_rr = train_dir / f"reranker-{run_tag}"
                with timer.section("reranker_precompute"):
                    add_reranker_to_build(staged_rr, rr_dir, trained.ws.dataset("chunks"), fusion_weight=1.0,
                                          depth=rr.depth, precompute=rr.precompute)
                reranker = Reranker(staged_rr / "reranker", fusion_weight=1.0)
                with timer.section("tune_fusion"):
                    weight, grid = _tune_on_dev(searcher, reranker, data, rr.depth)
                reranker.fusion_weight = weight
                meta_path = staged_rr / "reranker" / "reranker.json"
                meta = json.loads(meta_path.read_text()) | {"fusion_weight": weight, "dev_grid": grid}
                meta_path.write_text(json.dumps(meta, indent=2))
                with timer.section("dev_eval_rerank"):
                    dev_rr = evaluate_modes(searcher, data.queries, data.dev_qrels, modes=(), reranker=reranker,
                                            depth=rr.depth)
                dev_trained |= dev_rr
                run.log_metrics({f"dev.{m}.ndcg@10": v["ndcg@10"] for m, v in dev_rr.items()} | {"fusion_weight": weight})
                rr_reg = register_model(run, rr_dir, f"{prefix}-colbert", dev_rr["hybrid+rerank"]["ndcg@10"],
                                        tags={"spec": spec.name, "train_run": run_tag, "fusion_weight": str(weight)})
                report["reranker"]["registry"] = rr_reg.as_dict()
                report["reranker"]["fusion_weight"] = weight
                report["reranker"]["dev_grid"] = grid
        report["dev"] = dev_trained

        # -- final TEST report (never used for any decision) ------------------------------------------
        with timer.section("test_eval"):
            test = evaluate_modes(searcher, test_queries, test_qrels, reranker=reranker, depth=rr.depth)
        report["test"] = test
        parent.log_metrics({f"test.{m}.{k}": v for m, vals in test.items() for k, v in vals.items()})
        parent.log_metrics({f"dev.{m}.ndcg@10": v["ndcg@10"] for m, v in dev_trained.items()})

        if publish:
            with timer.section("evaluate_publish"):
                trained.run_stage("evaluate")
                report["publish"] = publish_trained(trained, staged_rr, report, base_dev, dev_trained)
        report["seconds"] = timer.sections | {"total": timer.total}
        report["seconds"]["recipe_without_base_pipeline"] = timer.total - timer.sections.get("base_pipeline", 0.0)
        parent.log_metrics({f"seconds.{k}": v for k, v in report["seconds"].items()})
        parent.log_dict(report, "train_report.json")
    (train_dir / f"report-{run_tag}.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _teacher(pipeline, data: TrainingData):
    """Distillation teacher: the trained bi-encoder's cosine scores."""
    from corpusforge.encoder import Encoder

    enc = Encoder(pipeline.spec.model)

    def score(qid: str, docs: list[str]) -> np.ndarray:
        q = enc.encode_queries([data.queries[qid]])[0]
        return enc.encode_passages([data.passages[d] for d in docs]) @ q
    return score


def _tune_on_dev(searcher, reranker, data: TrainingData, depth: int) -> tuple[float, dict[float, float]]:
    """The fusion weight of reranker vs hybrid first stage that maximises DEV nDCG@10."""
    from corpusforge.search import UNRESTRICTED

    texts = [data.queries[q] for q in data.dev_ids]
    hits = searcher.search_batch(texts, k=depth, mode="hybrid", acl=UNRESTRICTED)
    cands = {}
    for q, text, hs in zip(data.dev_ids, texts, hits, strict=True):
        s = reranker.scores(text, hs)
        cands[q] = [(h.doc_id, h.score, float(x)) for h, x in zip(hs, s, strict=True)]
    return tune_fusion_weight(cands, data.dev_qrels)


def _best_dev(dev: dict[str, dict[str, float]]) -> float:
    return max(v["ndcg@10"] for v in dev.values())


def publish_trained(pipeline, staged_reranker: Path | None, report: dict[str, Any],
                    base_dev: dict[str, dict[str, float]], new_dev: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Publish the trained build under alias ``candidate``; move ``production`` only if dev improves.

    The bar is the dev nDCG@10 recorded in the current production snapshot's manifest (its best
    mode), else the dev metric of the model this run started from.

    Args:
        pipeline: the pipeline bound to the trained model (evaluate stage done).
        staged_reranker: a directory holding ``reranker/`` to include, or None.
        report: the training report so far (model versions go into the manifest).
        base_dev: dev metrics of the starting model.
        new_dev: dev metrics of the trained build.

    Returns:
        Version, aliases, bar and decision.
    """
    from corpusforge.snapshot_build import assemble, build_pipeline_manifest, index_name, snapshot_store

    ws = pipeline.ws
    staging = ws.base / f".staging-train-{uuid.uuid4().hex[:8]}"
    store = snapshot_store(pipeline)
    name = index_name(pipeline)
    try:
        assemble(pipeline, staging)
        if staged_reranker is not None:
            shutil.copytree(staged_reranker / "reranker", staging / "reranker",
                            copy_function=_link_or_copy)
        manifest = build_pipeline_manifest(pipeline, staging)
        manifest["training"] = {
            "run": report["run"],
            "models": {"biencoder": report["biencoder"]["registry"],
                       **({"reranker": report["reranker"]["registry"]} if "reranker" in report else {})},
            "dev_ndcg_10": {m: v["ndcg@10"] for m, v in new_dev.items()},
            "fusion_weight": report.get("reranker", {}).get("fusion_weight"),
        }
        version = store.publish(staging, manifest)
        check = store.verify(name, version)
        if not check.ok:
            raise RuntimeError(f"snapshot {name}/{version} failed verification: {check.problems}")
        store.set_alias(name, CANDIDATE_ALIAS, version)
        bar, bar_from = _production_bar(store, name, pipeline.spec.publish.alias)
        if bar is None:
            bar, bar_from = _best_dev(base_dev), "starting model (dev)"
        new = _best_dev(new_dev)
        promoted = new > bar
        if promoted:
            store.set_alias(name, pipeline.spec.publish.alias, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"index": name, "version": version, "candidate_alias": CANDIDATE_ALIAS,
            "production_alias": pipeline.spec.publish.alias, "dev_ndcg_10": new, "bar": bar, "bar_from": bar_from,
            "promoted": promoted}


def _production_bar(store, name: str, alias: str) -> tuple[float | None, str]:
    """The dev nDCG@10 recorded by the snapshot an alias points at, if any."""
    try:
        version = store.resolve(name, alias)
        manifest = store.manifest(name, version)
    except Exception:  # noqa: BLE001 - no alias yet, or a snapshot without training info
        return None, ""
    dev = (manifest.get("training") or {}).get("dev_ndcg_10")
    return (max(dev.values()), f"{alias} snapshot {version}") if dev else (None, "")


def _link_or_copy(src, dst) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
