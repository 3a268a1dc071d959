"""DPR-style bi-encoder training: InfoNCE over in-batch and mined hard negatives.

For a batch of B training examples (query, positive passage, h hard negatives), every query is
scored against all B x (1 + h) passages of the batch; the loss is the cross-entropy of picking
its own positive, with scores ``cos(q, p) / temperature``. Batches never hold the same document
twice (as anyone's positive or negative), so no passage is at once a target and a negative; a
passage that is a *judged* positive of another query in the batch is masked out of that query's
candidates for the same reason.

Options: separate query and passage towers (``separate_towers``), gradient caching
(``grad_cache_chunk``: the batch's representations are computed without a graph, the loss's
gradients with respect to them are taken, then each chunk is re-encoded with a graph and
back-propagated; memory is that of one chunk, the result that of the whole batch, as in
Gao et al. 2021). The optimiser, schedule, clipping, checkpoints, resume and time guard are the
shared training loop's (`corpusforge.train.core`): a run is defined by its epochs and seed.

Model selection uses the DEV split only: after each epoch the model ranks a fixed dev pool (every
dev positive plus the top BM25 and dense documents of every dev query), scored by
`corpusforge.evaluation.metrics` (the metrics tested equal to pytrec_eval), and the best epoch is kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from corpusforge.encoding.encoder import pool, read_layout
from corpusforge.evaluation.metrics import evaluate
from corpusforge.encoding.models import resolve_model_path
from corpusforge.encoding.encoder import autocast_for, seed_everything
from corpusforge.train.core import LoopConfig, TrainLoop

log = logging.getLogger("corpusforge.train")


@dataclass
class BiEncoderConfig:
    """Bi-encoder training settings.

    Attributes:
        base_model: 'default' (packaged MiniLM) or a model directory to start from.
        epochs: passes over the training pairs.
        batch_size: examples (queries) per optimiser step.
        learning_rate: AdamW peak learning rate.
        warmup_ratio: share of steps with linear warmup; linear decay after.
        weight_decay: AdamW weight decay.
        temperature: InfoNCE temperature.
        hard_negatives: mined negatives per example (0: in-batch only).
        max_query_length: query truncation (tokens).
        max_passage_length: passage truncation (tokens).
        separate_towers: independent query and passage encoders.
        grad_cache_chunk: gradient-caching chunk size in texts; 0 turns caching off.
        seed: seeds batching, dropout and initialisation.
        checkpoint_every: steps between checkpoints (0: only at epoch ends).
        max_steps: stop after this many steps in total (0: no cap); for smoke runs.
        max_seconds: time guard on training (0: none); the recipe is its epochs, not its time.
        on_budget: at the guard, 'fail' (`core.TrainingBudgetExceeded`) or 'stop' (log ``truncated``).
        threads: torch CPU threads (0: torch's default, one per core).
        device: 'auto', 'cpu' or 'cuda'.
        precision: 'auto' (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), 'bf16'
            or 'fp32'. Weights and optimiser state stay fp32 either way.
    """

    base_model: str = "default"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    hard_negatives: int = 1
    max_query_length: int = 64
    max_passage_length: int = 256
    separate_towers: bool = False
    grad_cache_chunk: int = 0
    seed: int = 13
    checkpoint_every: int = 50
    max_steps: int = 0
    max_seconds: float = 0.0
    on_budget: str = "fail"
    threads: int = 0
    device: str = "auto"
    precision: str = "auto"


@dataclass
class Example:
    """One training example: a query, its positive and its hard negatives (doc ids)."""

    qid: str
    positive: str
    negatives: list[str] = field(default_factory=list)

    @property
    def docs(self) -> list[str]:
        return [self.positive, *self.negatives]


def build_examples(pairs: Sequence[tuple[str, str]], negatives: dict[str, list[str]], n_neg: int,
                   seed: int, epoch: int) -> list[Example]:
    """Examples for one epoch: one per (query, positive), negatives rotated per epoch.

    Args:
        pairs: ``(qid, positive doc id)`` training pairs.
        negatives: qid -> mined negative doc ids.
        n_neg: negatives per example.
        seed: base seed.
        epoch: the epoch (rotates which mined negatives are used, so every mined one is seen).

    Returns:
        The examples, in pair order.
    """
    out = []
    for i, (q, d) in enumerate(pairs):
        pool_ = negatives.get(q, [])
        if pool_ and n_neg:
            start = (epoch * n_neg + i) % len(pool_)
            picked = [pool_[(start + j) % len(pool_)] for j in range(min(n_neg, len(pool_)))]
        else:
            picked = []
        out.append(Example(q, d, picked))
    return out


def make_batches(examples: Sequence[Example], batch_size: int, seed: int) -> list[list[Example]]:
    """Shuffle examples (seeded) and pack them into batches with no document twice in a batch.

    An example whose documents clash with the open batch waits for a later one; the order is
    otherwise the shuffled order, so the batching is deterministic for a seed.

    Args:
        examples: the epoch's examples.
        batch_size: examples per batch.
        seed: the shuffle seed.

    Returns:
        Batches; only the last may be smaller than `batch_size`.
    """
    order = list(examples)
    random.Random(seed).shuffle(order)
    batches: list[list[Example]] = []
    pending = order
    while pending:
        batch, used, deferred = [], set(), []
        for ex in pending:
            # negatives clashing with the batch are dropped rather than the whole example deferred
            if len(batch) < batch_size and ex.positive not in used:
                negs = [d for d in ex.negatives if d not in used and d != ex.positive]
                ex = Example(ex.qid, ex.positive, negs)
                batch.append(ex)
                used.update(ex.docs)
            else:
                deferred.append(ex)
        batches.append(batch)
        pending = deferred
    return batches


def infonce_loss(q: torch.Tensor, p: torch.Tensor, targets: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE / multiple-negatives ranking loss.

    Args:
        q: query vectors ``(B, d)`` (normalised).
        p: passage vectors ``(P, d)`` (normalised), all passages of the batch.
        targets: index into `p` of each query's positive ``(B,)``.
        temperature: the softmax temperature.
        mask: ``(B, P)`` True where a passage must not count as a negative for a query.

    Returns:
        The mean loss (scalar).
    """
    scores = q @ p.T / temperature
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores, targets)


class Tower(torch.nn.Module):
    """A transformer plus the model's pooling and L2 normalisation: texts in, unit vectors out.

    Args:
        model_dir: a sentence-transformers / Hugging Face model directory.
    """

    def __init__(self, model_dir: Path):
        super().__init__()
        from transformers import AutoModel

        self.model_dir = model_dir
        self.pooling = read_layout(model_dir).pooling
        self.model = AutoModel.from_pretrained(str(model_dir))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors ``(batch, dim)`` of padded token ids."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(pool(hidden.float(), attention_mask, self.pooling), p=2, dim=1)


class _RandState:
    """Captures the torch RNG states so a chunk re-encoded for gradient caching gets the same dropout."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)`` tensors.

    Args:
        ids: token id lists.
        pad_id: the padding token id.
        device: where the tensors go.

    Returns:
        The two int64 tensors.
    """
    width = max(len(x) for x in ids)
    out = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)


class BiEncoderTrainer:
    """Trains a bi-encoder on (query, positive, hard negatives) examples; resumable.

    Args:
        cfg: the training settings.
        queries: qid -> query text (training and dev queries).
        passages: doc id -> passage text.
        out_dir: where checkpoints, the best model and ``train_log.json`` go.
    """

    def __init__(self, cfg: BiEncoderConfig, queries: dict[str, str], passages: dict[str, str], out_dir: str | Path):
        from transformers import AutoTokenizer

        from corpusforge.encoding.encoder import pick_device

        seed_everything(cfg.seed, cfg.threads)
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.device)
        self.base_dir = resolve_model_path(cfg.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir), use_fast=True)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.passage_tower = Tower(self.base_dir).to(self.device)
        self.query_tower = Tower(self.base_dir).to(self.device) if cfg.separate_towers else self.passage_tower
        self.queries, self.passages = queries, passages
        self._q_ids: dict[str, list[int]] = {}
        self._p_ids: dict[str, list[int]] = {}
        self.state: dict[str, Any] = {"dev": [], "best_dev": None, "best_epoch": None}

    # -- tokenisation ------------------------------------------------------------------------------

    def _ids(self, cache: dict[str, list[int]], keys: Sequence[str], texts: dict[str, str], max_len: int) -> list[list[int]]:
        todo = [k for k in dict.fromkeys(keys) if k not in cache]
        if todo:
            enc = self.tokenizer([texts[k] for k in todo], truncation=True, max_length=max_len, padding=False,
                                 return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            cache.update(zip(todo, enc, strict=True))
        return [cache[k] for k in keys]

    def _qids(self, keys: Sequence[str]) -> list[list[int]]:
        return self._ids(self._q_ids, keys, self.queries, self.cfg.max_query_length)

    def _pids(self, keys: Sequence[str]) -> list[list[int]]:
        return self._ids(self._p_ids, keys, self.passages, self.cfg.max_passage_length)

    # -- encoding (no graph) ----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, keys: Sequence[str], kind: str, batch_size: int = 64) -> np.ndarray:
        """Unit vectors for queries (kind='query') or passages (kind='passage'), in eval mode.

        Args:
            keys: query ids or doc ids.
            kind: 'query' or 'passage'.
            batch_size: texts per forward pass.

        Returns:
            float32 ``(len(keys), dim)``.
        """
        tower = self.query_tower if kind == "query" else self.passage_tower
        ids = self._qids(keys) if kind == "query" else self._pids(keys)
        was = tower.training
        tower.eval()
        out = np.zeros((len(ids), tower.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for s in range(0, len(order), batch_size):
            pos = order[s:s + batch_size]
            inp, mask = pad_batch([ids[i] for i in pos], self.pad_id, self.device)
            with self._autocast():
                out[pos] = tower(inp, mask).float().cpu().numpy()
        tower.train(was)
        return out

    def _autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    # -- one step ---------------------------------------------------------------------------------

    def _batch_tensors(self, batch: list[Example], known: dict[str, set[str]]):
        docs = [d for ex in batch for d in ex.docs]
        targets, t = [], 0
        for ex in batch:
            targets.append(t)
            t += len(ex.docs)
        mask = torch.zeros(len(batch), len(docs), dtype=torch.bool)
        for i, ex in enumerate(batch):
            for j, d in enumerate(docs):
                if j != targets[i] and d in known.get(ex.qid, ()):
                    mask[i, j] = True  # another judged positive of this query is not a negative
        return docs, torch.tensor(targets, device=self.device), mask.to(self.device)

    def _reps(self, tower: Tower, ids: list[list[int]], chunk: int) -> torch.Tensor:
        outs = []
        for s in range(0, len(ids), chunk or len(ids)):
            inp, mask = pad_batch(ids[s:s + (chunk or len(ids))], self.pad_id, self.device)
            with self._autocast():
                outs.append(tower(inp, mask).float())
        return torch.cat(outs)

    def step_loss(self, batch: list[Example], known: dict[str, set[str]]) -> float:
        """Forward and backward for one batch (gradients accumulate in the towers).

        Args:
            batch: the examples.
            known: qid -> every judged positive (for masking).

        Returns:
            The batch loss.
        """
        docs, targets, mask = self._batch_tensors(batch, known)
        q_ids, p_ids = self._qids([ex.qid for ex in batch]), self._pids(docs)
        chunk = self.cfg.grad_cache_chunk
        if not chunk:
            q = self._reps(self.query_tower, q_ids, 0)
            p = self._reps(self.passage_tower, p_ids, 0)
            loss = infonce_loss(q, p, targets, self.cfg.temperature, mask)
            loss.backward()
            return float(loss.detach())
        return self._grad_cache_step(q_ids, p_ids, targets, mask, chunk)

    def _grad_cache_step(self, q_ids, p_ids, targets, mask, chunk: int) -> float:
        """Gradient caching: loss on graph-free representations, then chunk-wise re-encoding."""
        plans = [(self.query_tower, q_ids), (self.passage_tower, p_ids)]
        reps, states = [], []
        with torch.no_grad():
            for tower, ids in plans:
                parts, st = [], []
                for s in range(0, len(ids), chunk):
                    st.append(_RandState(self.device))
                    inp, m = pad_batch(ids[s:s + chunk], self.pad_id, self.device)
                    with self._autocast():
                        parts.append(tower(inp, m).float())
                reps.append(torch.cat(parts).requires_grad_())
                states.append(st)
        loss = infonce_loss(reps[0], reps[1], targets, self.cfg.temperature, mask)
        loss.backward()
        loss = loss.detach()
        for (tower, ids), rep, st in zip(plans, reps, states, strict=True):
            for n, s in enumerate(range(0, len(ids), chunk)):
                current = _RandState(self.device)
                st[n].restore()  # same dropout masks as the graph-free pass
                inp, m = pad_batch(ids[s:s + chunk], self.pad_id, self.device)
                with self._autocast():
                    out = tower(inp, m).float()
                out.backward(gradient=rep.grad[s:s + chunk])
                current.restore()
        return float(loss)

    # -- training loop ----------------------------------------------------------------------------

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of both towers (once when shared)."""
        params = list(self.passage_tower.parameters())
        if self.query_tower is not self.passage_tower:
            params += list(self.query_tower.parameters())
        return params

    def train(self, pairs: Sequence[tuple[str, str]], negatives: dict[str, list[str]], known: dict[str, set[str]],
              dev_eval: Callable[["BiEncoderTrainer"], float] | None = None,
              on_step: Callable[[int, float], None] | None = None,
              on_epoch: Callable[[int, float | None], None] | None = None, resume: bool = True) -> dict[str, Any]:
        """Train, checkpointing as it goes; resumes from the last checkpoint of `out_dir`.

        Args:
            pairs: ``(qid, positive)`` TRAINING pairs.
            negatives: qid -> mined hard negatives.
            known: qid -> all judged positives (masked out as negatives).
            dev_eval: the dev metric of the current model (higher is better); drives selection.
            on_step: called with (step, loss) after every optimiser step.
            on_epoch: called with (selection point, dev metric) after every epoch and where a run
                ends mid-epoch.
            resume: continue from ``out_dir/checkpoint.pt`` when present.

        Returns:
            The training log: steps, planned steps, truncated, losses, dev metric per selection
            point (index 0 = before training), best epoch, examples/s, seconds, config.

        Raises:
            core.TrainingBudgetExceeded: the time guard was reached with ``on_budget='fail'``.
        """
        cfg = self.cfg

        def epoch_batches(epoch: int) -> list[list[Example]]:
            return make_batches(build_examples(pairs, negatives, cfg.hard_negatives, cfg.seed, epoch),
                                cfg.batch_size, cfg.seed * 1000 + epoch)

        modules = {"passage": self.passage_tower}
        if self.query_tower is not self.passage_tower:
            modules["query"] = self.query_tower
        loop = TrainLoop(LoopConfig(name="bi-encoder", epochs=cfg.epochs, max_steps=cfg.max_steps,
                                    learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                    warmup_ratio=cfg.warmup_ratio, checkpoint_every=cfg.checkpoint_every,
                                    max_seconds=cfg.max_seconds, on_budget=cfg.on_budget),
                         self.parameters(), modules, self.out_dir, state=self.state)
        loop.plan([len(epoch_batches(e)) for e in range(cfg.epochs)])  # epochs differ in size
        resumed = resume and loop.restore()
        if not resumed and dev_eval is not None and not loop.state["dev"]:
            loop.state["dev"].append(dev_eval(self))  # the base model's dev metric, epoch 0
            loop.state["best_dev"], loop.state["best_epoch"] = loop.state["dev"][0], 0
            self._save_best()
        self.state = loop.state

        def select() -> None:
            dev = dev_eval(self) if dev_eval is not None else None
            if dev is not None:
                self.state["dev"].append(dev)
                if self.state["best_dev"] is None or dev > self.state["best_dev"]:
                    self.state["best_dev"], self.state["best_epoch"] = dev, len(self.state["dev"]) - 1
                    self._save_best()
            if on_epoch:
                on_epoch(len(self.state["dev"]) - 1 if dev is not None else self.state["epoch"], dev)

        train_log = loop.run(epoch_batches, lambda batch: self.step_loss(batch, known), on_step=on_step,
                             on_selection=select)
        if dev_eval is None:
            self._save_best()
        return train_log | {"dev": list(self.state["dev"]), "best_dev": self.state["best_dev"],
                            "best_epoch": self.state["best_epoch"], "config": asdict(cfg)}

    @property
    def best_dir(self) -> Path:
        """The sentence-transformers directory of the best model so far."""
        return self.out_dir / "best"

    def _save_best(self) -> None:
        save_sentence_transformer(self.passage_tower, self.tokenizer, self.base_dir, self.best_dir,
                                  self.cfg.max_passage_length,
                                  query_tower=self.query_tower if self.cfg.separate_towers else None)


def save_sentence_transformer(tower: Tower, tokenizer, base_dir: Path, out_dir: Path, max_seq_length: int,
                              query_tower: Tower | None = None) -> Path:
    """Write a tower as a sentence-transformers directory that `Encoder` and ST load unchanged.

    Layout as the packaged model: ``config.json``, ``model.safetensors``, tokenizer files,
    ``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``. With separate
    towers the query tower goes to ``query_tower/`` beside it (same layout). Written to a
    temporary sibling and renamed, so a reader never sees half a model.

    Args:
        tower: the (passage) tower.
        tokenizer: its tokenizer.
        base_dir: the model it was trained from (pooling and module files are copied from it).
        out_dir: the directory to (re)place.
        max_seq_length: recorded in ``sentence_bert_config.json``.
        query_tower: an independent query tower, if any.

    Returns:
        `out_dir`.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_sentence_transformer(tower.model, tokenizer, base_dir, tmp, max_seq_length)
    if query_tower is not None:
        write_sentence_transformer(query_tower.model, tokenizer, base_dir, tmp / "query_tower", max_seq_length)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def write_sentence_transformer(model, tokenizer, base_dir: Path, out: Path, max_seq_length: int) -> None:
    """Write a transformer into `out` (created if missing) as a sentence-transformers directory.

    Args:
        model: the Hugging Face model (its ``config.json`` and ``model.safetensors``).
        tokenizer: its tokenizer.
        base_dir: the model it derives from; its ``modules.json`` and pooling/normalise module
            directories are copied.
        out: the directory.
        max_seq_length: recorded in ``sentence_bert_config.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    for name in ("modules.json", "config_sentence_transformers.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out / name)
    for sub in base_dir.iterdir():
        if sub.is_dir() and sub.name[:1].isdigit():  # 1_Pooling, 2_Normalize, ...
            shutil.copytree(sub, out / sub.name)
    st_cfg = {"max_seq_length": max_seq_length, "do_lower_case": read_layout(base_dir).do_lower_case}
    (out / "sentence_bert_config.json").write_text(json.dumps(st_cfg, indent=2))


class DevPool:
    """A fixed dev retrieval task for model selection: dev queries rank a shared pool of documents.

    The pool is every dev positive plus the top `depth` documents of each candidate list given
    (BM25 and base dense), so judging a model costs encoding the pool, not the corpus.

    Args:
        dev_qrels: the DEV judgments.
        candidates: qid -> candidate doc ids (any number of sources concatenated).
        depth: candidates taken per query from the list.
    """

    def __init__(self, dev_qrels: dict[str, dict[str, int]], candidates: dict[str, list[str]], depth: int = 20):
        docs: dict[str, None] = {}
        for q in sorted(dev_qrels):
            for d in sorted(dev_qrels[q]):
                docs[d] = None
            for d in candidates.get(q, [])[:depth]:
                docs[d] = None
        self.qrels = dev_qrels
        self.docs = list(docs)

    def __call__(self, trainer: BiEncoderTrainer) -> float:
        """The dev nDCG@10 of the trainer's current model over the pool (`corpusforge.evaluation.metrics`)."""
        docs = [d for d in self.docs if d in trainer.passages]
        qids = sorted(self.qrels)
        qv, pv = trainer.encode(qids, "query"), trainer.encode(docs, "passage")
        return pool_ndcg_at_10(qids, docs, qv @ pv.T, self.qrels)


def pool_ndcg_at_10(qids: Sequence[str], docs: Sequence[str], scores: np.ndarray,
                    qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 of every query ranking a shared document pool, by `corpusforge.evaluation.metrics`.

    Args:
        qids: the queries (rows of `scores`).
        docs: the pool (columns of `scores`).
        scores: ``(len(qids), len(docs))`` similarities.
        qrels: the judgments; every qrels query counts (trec_eval semantics).

    Returns:
        The mean nDCG@10.
    """
    run = {q: dict(zip(docs, scores[i].tolist(), strict=True)) for i, q in enumerate(qids)}
    return evaluate(run, qrels, ["ndcg@10"]).mean["ndcg@10"]
