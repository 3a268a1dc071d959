"""Training the late-interaction reranker (`corpusforge.retrieval.late_interaction`).

Training is contrastive like the bi-encoder's (`biencoder.make_batches`: in-batch plus mined hard
negatives, no document twice in a batch, judged positives masked), optionally distilled from a
teacher's scores on the same candidates (KL between the softmaxes), in the shared training loop
(`corpusforge.train.core`). The fusion weight of reranker and first-stage scores is tuned on dev.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from corpusforge.evaluation.metrics import evaluate
from corpusforge.retrieval.late_interaction import LateInteraction, fuse, maxsim
from corpusforge.train.biencoder import Example, build_examples, make_batches
from corpusforge.train.core import LoopConfig, TrainLoop

log = logging.getLogger("corpusforge.train")


def train_colbert(li: LateInteraction, queries: dict[str, str], passages: dict[str, str],
                  pairs: Sequence[tuple[str, str]], negatives: dict[str, list[str]], known: dict[str, set[str]],
                  out_dir: str | Path, teacher: Callable[[str, list[str]], np.ndarray] | None = None,
                  on_step: Callable[[int, float], None] | None = None, resume: bool = True) -> dict[str, Any]:
    """Contrastive (optionally distilled) training of a late-interaction reranker; resumable.

    Args:
        li: the model to train (in place).
        queries: qid -> text.
        passages: doc id -> text.
        pairs: ``(qid, positive)`` TRAINING pairs.
        negatives: qid -> mined negatives.
        known: qid -> all judged positives (masked as negatives).
        out_dir: checkpoint directory.
        teacher: ``(qid, doc ids) -> scores`` for distillation (used when distill_weight > 0).
        on_step: called with (step, loss).
        resume: continue from ``out_dir/checkpoint.pt`` when present.

    Returns:
        The training log (`core.TrainLoop.log`: steps, planned steps, truncated, losses, examples,
        seconds, examples/s) and the config.

    Raises:
        core.TrainingBudgetExceeded: the time guard was reached with ``on_budget='fail'``.
    """
    cfg = li.cfg

    def epoch_batches(epoch: int) -> list[list[Example]]:
        return make_batches(build_examples(pairs, negatives, cfg.hard_negatives, cfg.seed, epoch),
                            cfg.batch_size, cfg.seed * 1000 + epoch)

    def step(batch: list[Example]) -> float:
        loss = _colbert_loss(li, batch, queries, passages, known, teacher)
        loss.backward()
        return float(loss.detach())

    groups = [{"params": list(li.model.backbone.parameters())},
              {"params": list(li.model.linear.parameters()), "lr": cfg.learning_rate * 10}]  # the fresh projection
    loop = TrainLoop(LoopConfig(name="reranker", epochs=cfg.epochs, max_steps=cfg.max_steps,
                                learning_rate=cfg.learning_rate, weight_decay=0.01, warmup_ratio=cfg.warmup_ratio,
                                checkpoint_every=cfg.checkpoint_every, max_seconds=cfg.max_seconds,
                                on_budget=cfg.on_budget),
                     groups, {"model": li.model}, out_dir)
    loop.plan([len(epoch_batches(e)) for e in range(cfg.epochs)])  # epochs differ in size
    if resume:
        loop.restore()
    return loop.run(epoch_batches, step, on_step=on_step) | {"config": asdict(cfg)}


def _colbert_loss(li: LateInteraction, batch: list[Example], queries, passages, known, teacher) -> torch.Tensor:
    cfg = li.cfg
    docs = [d for ex in batch for d in ex.docs]
    targets, t = [], 0
    for ex in batch:
        targets.append(t)
        t += len(ex.docs)
    q = li.encode_queries([queries[ex.qid] for ex in batch])
    d, mask = li.encode_documents([passages[x] for x in docs])
    scores = maxsim(q, d, mask) / cfg.temperature
    bad = torch.zeros_like(scores, dtype=torch.bool)
    for i, ex in enumerate(batch):
        for j, doc in enumerate(docs):
            if j != targets[i] and doc in known.get(ex.qid, ()):
                bad[i, j] = True
    scores = scores.masked_fill(bad, float("-inf"))
    loss = F.cross_entropy(scores, torch.tensor(targets, device=scores.device))
    if teacher is not None and cfg.distill_weight > 0:
        kl = []
        for i, ex in enumerate(batch):
            own = slice(targets[i], targets[i] + len(ex.docs))  # the example's own positive + negatives
            t_scores = torch.as_tensor(teacher(ex.qid, ex.docs), dtype=torch.float32, device=scores.device)
            kl.append(F.kl_div(F.log_softmax(scores[i, own], dim=-1),
                               F.softmax(t_scores / cfg.distill_temperature, dim=-1), reduction="sum"))
        loss = loss + cfg.distill_weight * torch.stack(kl).mean()
    return loss


def tune_fusion_weight(candidates: dict[str, list[tuple[str, float, float]]], dev_qrels: dict[str, dict[str, int]],
                       grid: Sequence[float] = tuple(np.round(np.arange(0, 1.01, 0.1), 2))) -> tuple[float, dict[float, float]]:
    """Pick the fusion weight with the best DEV nDCG@10.

    Args:
        candidates: dev qid -> ``[(doc_id, first-stage score, reranker score), ...]``.
        dev_qrels: the dev judgments.
        grid: weights to try.

    Returns:
        ``(best weight, {weight: dev nDCG@10})``; ties go to the smaller weight (less reranking).
    """
    results: dict[float, float] = {}
    for w in grid:
        run = {}
        for q, rows in candidates.items():
            fused = fuse(np.array([r[1] for r in rows]), np.array([r[2] for r in rows]), w)
            run[q] = dict(zip((r[0] for r in rows), fused.tolist(), strict=True))
        results[float(w)] = evaluate(run, dev_qrels, ["ndcg@10"]).mean["ndcg@10"]
    best = max(results, key=lambda w: (results[w], -w))
    return best, results
