"""A distilled query tower: a shallower copy of the passage encoder that maps queries into the same space.

Serving spends most of a dense query's CPU time in the query encoder, and that time scales with
the encoder's depth. The passages are encoded once, offline, so they keep the full model; only
queries go through the tower. The tower starts as the teacher with some of its layers removed
(``layers`` names the ones kept) and is trained to reproduce the teacher's sentence vectors and,
per kept layer, the teacher's token states at the matching depth (TinyBERT-style layer mapping),
on sentences cut from the corpus itself: no queries and no judgments are used, so it works for
any corpus and cannot see the evaluation split.

The index stage distils it into ``index/query_tower/`` (a sentence-transformers directory that
`Encoder` loads unchanged, plus ``tower.json``), the evaluate stage measures retrieval with it
next to the full encoder, publishing ships it inside the snapshot (checksummed like every file),
and the endpoint encodes queries with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from corpusforge.encoding.encoder import Encoder, cpu_has_native_bf16, pool
from corpusforge.data.hashing import config_fingerprint
from corpusforge.spec import ModelConfig, QueryTowerConfig
from corpusforge.encoding.encoder import seed_everything
from corpusforge.train.core import LoopConfig, TrainLoop

log = logging.getLogger(__name__)

TOWER_FILE = "tower.json"
FORMAT_VERSION = 2  # 2: the shared training loop's schedule (warmup, then linear decay from its end)
GUARD_FIELDS = {"max_train_seconds", "on_budget"}  # a time guard is not part of the recipe
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def training_sentences(texts: Sequence[str], min_words: int = 4, max_words: int = 60) -> list[str]:
    """Distinct sentence-like spans of the corpus: the tower's training texts.

    Queries are short, so the tower learns on sentences rather than whole chunks. The split is a
    plain punctuation rule (good enough to make short spans; the spans need not be grammatical).

    Args:
        texts: chunk texts.
        min_words: shorter spans are dropped.
        max_words: longer spans are dropped.

    Returns:
        The distinct spans, sorted (deterministic for a corpus).
    """
    spans = set()
    for text in texts:
        for span in _SENTENCE_END.split(text):
            n = len(span.split())
            if min_words <= n <= max_words:
                spans.add(span.strip())
    return sorted(spans)


def tower_key(teacher: Encoder, cfg: QueryTowerConfig, texts: Sequence[str]) -> str:
    """Identifies a distillation run's output: teacher, tower settings (not the time guard) and training texts."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\x1e")
    recipe = cfg.model_dump(mode="json", exclude=GUARD_FIELDS)
    return config_fingerprint(teacher.fingerprint, {"format": FORMAT_VERSION, "config": recipe, "texts": h.hexdigest()})


def read_tower_info(tower_dir: str | Path) -> dict[str, Any] | None:
    """The ``tower.json`` of a tower directory, or None when there is no (complete) tower."""
    path = Path(tower_dir) / TOWER_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def tower_model_config(base: ModelConfig, tower_dir: str | Path) -> ModelConfig:
    """The model config that loads a tower: the teacher's settings with the tower's weights.

    Args:
        base: the passage encoder's config (prefixes, normalisation, device and precision carry over).
        tower_dir: the tower directory.

    Returns:
        A `ModelConfig` whose ``name`` is the tower directory.
    """
    return base.model_copy(update={"name": str(Path(tower_dir).resolve())})


class _Student(torch.nn.Module):
    """The teacher's transformer with only ``layers`` kept, returning every kept layer's states."""

    def __init__(self, model_dir: Path, layers: Sequence[int]):
        super().__init__()
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
        blocks = _layer_list(model)
        n = len(blocks)
        if any(i < 0 or i >= n for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"query_tower.layers {list(layers)} must be distinct, increasing indices into the "
                             f"teacher's {n} layers (0..{n - 1})")
        kept = torch.nn.ModuleList([blocks[i] for i in layers])
        _set_layer_list(model, kept)
        model.config.num_hidden_layers = len(layers)
        for p in model.get_input_embeddings().parameters():
            # The word embeddings are the teacher's and stay so: most of the parameters, and the
            # vocabulary the queries share with the passages.
            p.requires_grad_(False)
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[1:]


def _layer_list(model) -> torch.nn.ModuleList:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"query_tower: cannot find the transformer layers of a {type(model).__name__}; "
                         "only BERT-style encoders (model.encoder.layer) can be distilled")
    return layers


def _set_layer_list(model, layers: torch.nn.ModuleList) -> None:
    if hasattr(model.encoder, "layer"):
        model.encoder.layer = layers
    else:
        model.encoder.layers = layers


def distill(teacher: Encoder, texts: Sequence[str], cfg: QueryTowerConfig, out_dir: str | Path,
            progress: bool = False) -> dict[str, Any]:
    """Train a query tower against `teacher` and write it to `out_dir`.

    Args:
        teacher: the passage encoder (its vectors are the ones in the index).
        texts: training texts (`training_sentences`); ``cfg.holdout`` of them are kept out of
            training to measure how closely the tower follows the teacher.
        cfg: the tower settings.
        out_dir: an empty directory to write into (the caller publishes it atomically).
        progress: show a progress bar with steps, rate and the running loss.

    Returns:
        The summary also written to ``tower.json``: layers, steps, seconds, training texts and the
        held-out cosine to the teacher before and after training.
    """
    from corpusforge.progress import make_progress

    out_dir = Path(out_dir)
    seed_everything(cfg.seed, cfg.threads)
    texts = list(texts)
    random.Random(cfg.seed).shuffle(texts)
    n_hold = min(cfg.holdout, len(texts) // 5)
    held, train = texts[:n_hold], texts[n_hold:]
    if len(train) < cfg.batch_size:
        raise ValueError(f"query_tower: {len(train)} training texts, fewer than one batch of {cfg.batch_size}; "
                         "the corpus is too small to distil a tower (set index.query_tower.enabled: false)")
    device = teacher.device
    student = _Student(teacher.model_dir, cfg.layers).to(device).train()
    teacher_layers = [i + 1 for i in cfg.layers]  # hidden_states[0] is the embedding output
    ids = [x[: cfg.max_length] for x in teacher.tokenize(train, teacher.cfg.query_prefix)]
    # Held-out texts go through both models as queries are served: full length, teacher as is.
    held_ids = teacher.tokenize(held, teacher.cfg.query_prefix)
    held_teacher = teacher.encode_queries(held) if held else np.zeros((0, teacher.dim), np.float32)
    before = _agreement(student, teacher, held_ids, held_teacher)

    use_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    # Each pass over the texts is one shuffle of a generator seeded once: pass e is the e-th draw.
    draws, drawn = random.Random(cfg.seed + 1), []
    n_batches = len(ids) // cfg.batch_size

    def epoch_batches(epoch: int) -> list[list[list[int]]]:
        while len(drawn) <= epoch:
            order = list(range(len(ids)))
            draws.shuffle(order)
            drawn.append(order[::-1])  # batches are taken from the end of the shuffled order
        order = drawn[epoch]
        return [[ids[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]] for b in range(n_batches)]

    running: list[float] = []  # the running sentence-vector loss, for the progress bar

    def step(batch: list[list[int]]) -> float:
        loss = _step(student, teacher, batch, teacher_layers, cfg.hidden_weight, use_bf16)
        loss["total"].backward()
        running[:] = [loss["vector"] if not running else 0.98 * running[0] + 0.02 * loss["vector"]]
        return float(loss["total"].detach())

    loop = TrainLoop(LoopConfig(name="query tower", epochs=None, max_steps=cfg.steps, learning_rate=cfg.learning_rate,
                                weight_decay=0.01, warmup_ratio=cfg.warmup_ratio, max_seconds=cfg.max_train_seconds,
                                on_budget=cfg.on_budget),
                     [p for p in student.parameters() if p.requires_grad], {"student": student})
    loop.plan(n_batches)
    started = time.perf_counter()
    with make_progress() as bar:
        task = bar.add_task("distil query tower", total=cfg.steps, unit="steps", visible=progress)
        train_log = loop.run(epoch_batches, step, on_step=lambda s, _: bar.update(
            task, advance=1, description=f"distil query tower (cos {1 - running[0] / 2:.3f})"))
    steps = train_log["steps"]
    seconds = time.perf_counter() - started
    after = _agreement(student, teacher, held_ids, held_teacher)
    info = {"format": FORMAT_VERSION, "teacher": teacher.fingerprint, "teacher_layers": _count_layers(teacher),
            "layers": list(cfg.layers), "steps": steps, "planned_steps": cfg.steps, "truncated": train_log["truncated"],
            "seconds": round(seconds, 1),
            "train_texts": len(train), "holdout_texts": len(held), "holdout_cosine_before": before,
            "holdout_cosine": after, "config": cfg.model_dump(mode="json")}
    _save(student.model, teacher, out_dir)
    (out_dir / TOWER_FILE).write_text(json.dumps(info, indent=2))
    log.info("query tower: %d of %d layers, %d steps in %.0f s, held-out cosine to the teacher %.4f (was %.4f)",
             len(cfg.layers), info["teacher_layers"], steps, seconds, after["mean"], before["mean"])
    return info


def _step(student: _Student, teacher: Encoder, batch: list[list[int]], teacher_layers: list[int],
          hidden_weight: float, use_bf16: bool) -> dict[str, Any]:
    """The distillation loss of one batch: sentence-vector loss + weighted token-state loss."""
    ids, mask = (torch.from_numpy(a).to(teacher.device) for a in teacher.pad(batch))
    with torch.inference_mode():
        out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        t_vec = F.normalize(pool(out.last_hidden_state.float(), mask, teacher.pooling), dim=1)
        t_states = [out.hidden_states[i].float() for i in teacher_layers]
    t_vec, t_states = t_vec.clone(), [s.clone() for s in t_states]  # inference tensors -> autograd-safe
    with torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        last, states = student(ids, mask)
    s_vec = F.normalize(pool(last.float(), mask, teacher.pooling), dim=1)
    vector = ((s_vec - t_vec) ** 2).sum(dim=1).mean()  # = 2 - 2 cos for unit vectors
    m = mask.unsqueeze(-1).float()
    tokens = m.sum() * last.shape[-1]
    hidden = sum((((s.float() - t) ** 2) * m).sum() / tokens for s, t in zip(states, t_states, strict=True))
    return {"total": vector + hidden_weight * hidden, "vector": vector.item()}


@torch.inference_mode()
def _agreement(student: _Student, teacher: Encoder, ids: list[list[int]], reference: np.ndarray,
               batch_size: int = 128) -> dict[str, float]:
    """Cosine between the student's and the teacher's vectors of held-out texts (mean, p5, min)."""
    if not ids:
        return {"mean": math.nan, "p5": math.nan, "min": math.nan}
    was_training = student.training
    student.eval()
    vecs = []
    for i in range(0, len(ids), batch_size):
        a, m = (torch.from_numpy(x).to(teacher.device) for x in teacher.pad(ids[i:i + batch_size]))
        last, _ = student(a, m)
        vecs.append(F.normalize(pool(last.float(), m, teacher.pooling), dim=1).cpu().numpy())
    student.train(was_training)
    cos = (np.concatenate(vecs) * reference).sum(axis=1)
    return {"mean": round(float(cos.mean()), 5), "p5": round(float(np.percentile(cos, 5)), 5),
            "min": round(float(cos.min()), 5)}


def _count_layers(teacher: Encoder) -> int:
    return len(_layer_list(teacher.model))


def _save(model, teacher: Encoder, out_dir: Path) -> None:
    """The tower as a sentence-transformers directory laid out like the teacher's."""
    from corpusforge.train.biencoder import write_sentence_transformer

    write_sentence_transformer(model, teacher.tokenizer, teacher.model_dir, out_dir, teacher.max_seq_length)


def build_query_tower(model_cfg: ModelConfig, cfg: QueryTowerConfig, chunk_texts: Sequence[str],
                      out_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Distil the tower of a corpus into `out_dir`, or keep the one there when nothing changed (and it ran its steps).

    The directory is replaced atomically, so a killed run leaves the previous tower (or none).

    Args:
        model_cfg: the passage encoder's config (the teacher).
        cfg: the tower settings.
        chunk_texts: the corpus chunks (training sentences are cut from them).
        out_dir: the tower directory.
        progress: show a progress bar.

    Returns:
        The tower's ``tower.json`` contents, with ``reused`` telling whether it was kept.
    """
    from corpusforge.data.datasets import atomic_dir

    texts = training_sentences(chunk_texts)
    if len(texts) > cfg.max_texts:
        texts = sorted(random.Random(cfg.seed).sample(texts, cfg.max_texts))
    teacher = Encoder(model_cfg)
    key = tower_key(teacher, cfg, texts)
    info = read_tower_info(out_dir)
    if info is not None and info.get("key") == key and not info.get("truncated"):  # a truncated one is redone
        log.info("query tower: unchanged (%s), kept", key)
        return {**info, "reused": True}
    with atomic_dir(out_dir) as tmp:
        info = distill(teacher, texts, cfg, tmp, progress=progress)
        info["key"] = key
        (tmp / TOWER_FILE).write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}
