"""ColBERT-style late interaction: the reranker's model, shared by training, evaluation and serving.

Model (Khattab & Zaharia 2020): the transformer's token states go through a linear projection to
``dim`` (128) and are L2-normalised. Queries are ``[CLS] [Q] tokens [SEP]`` padded with
``[MASK]`` to exactly ``query_length`` tokens, all attended (query augmentation); documents are
``[CLS] [D] tokens [SEP]`` up to ``doc_length``, padding masked out. The markers are BERT's
``[unused0]`` / ``[unused1]`` vocabulary entries. The score is MaxSim:

    score(q, d) = sum over query tokens i of max over document tokens j of <q_i, d_j>

Document vectors for reranking are always computed in fp32 (`DOC_VECTOR_PRECISION`), whatever the
training precision: reduced precision kernels (bf16 on GPUs and some CPUs) give results that
depend on the batch's shape, so a precomputed vector and the same document encoded among other
hits would differ by bf16 noise (~0.05 on a MaxSim score of 9); in fp32 they differ only by the
float16 storage. Training lives in `corpusforge.train.colbert`; `corpusforge.retrieval.rerank` serves it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from corpusforge.encoding.encoder import autocast_for, seed_everything
from corpusforge.encoding.models import DEFAULT_MODEL, model_fingerprint, resolve_model_path

log = logging.getLogger("corpusforge")

Q_MARKER, D_MARKER = "[unused0]", "[unused1]"
CONFIG_FILE = "colbert.json"
LINEAR_FILE = "linear.pt"
DOC_VECTOR_PRECISION = "fp32"  # precomputed and query-time document vectors (see the module docstring)


@dataclass
class ColBERTConfig:
    """Late-interaction reranker settings.

    Attributes:
        base_model: 'default' (packaged MiniLM) or a model directory (e.g. the trained bi-encoder).
        dim: projection dimension.
        query_length: queries are padded with [MASK] (or cut) to exactly this many tokens.
        doc_length: document truncation (tokens).
        epochs: passes over the training pairs.
        batch_size: queries per step.
        learning_rate: AdamW peak learning rate (the projection gets 10x).
        warmup_ratio: linear warmup share.
        temperature: softmax temperature on MaxSim scores.
        hard_negatives: mined negatives per example.
        distill_weight: weight of the KL term towards teacher scores (0: off).
        distill_temperature: temperature of the teacher's softmax.
        seed: seeds batching and dropout.
        checkpoint_every: steps between checkpoints.
        max_steps: cap on steps (0: none).
        max_seconds: time guard on training (0: none); the recipe is its epochs, not its time.
        on_budget: at the guard, 'fail' (`core.TrainingBudgetExceeded`) or 'stop' (log ``truncated``).
        threads: torch CPU threads (0: torch's default, one per core).
        device: 'auto', 'cpu' or 'cuda'.
        precision: 'auto', 'bf16' or 'fp32' (see `encoder.autocast_for`).
    """

    base_model: str = "default"
    dim: int = 128
    query_length: int = 32
    doc_length: int = 180
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.1
    temperature: float = 1.0
    hard_negatives: int = 1
    distill_weight: float = 0.0
    distill_temperature: float = 0.05
    seed: int = 13
    checkpoint_every: int = 50
    max_steps: int = 0
    max_seconds: float = 0.0
    on_budget: str = "fail"
    threads: int = 0
    device: str = "auto"
    precision: str = "auto"


def maxsim(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """All-pairs MaxSim scores.

    Args:
        q: query token vectors ``(Bq, Lq, dim)``.
        d: document token vectors ``(Bd, Ld, dim)``.
        d_mask: ``(Bd, Ld)``, 1 for real document tokens (padding never matches).

    Returns:
        ``(Bq, Bd)``: sum over query tokens of the best document-token inner product.
    """
    sim = torch.einsum("qid,njd->qnij", q, d)
    sim = sim.masked_fill(~d_mask.bool()[None, :, None, :], float("-inf"))
    return sim.max(dim=-1).values.sum(dim=-1)


def maxsim_pairs(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """MaxSim of one query against each of its own documents.

    Args:
        q: ``(Lq, dim)``.
        d: ``(N, Ld, dim)``.
        d_mask: ``(N, Ld)``.

    Returns:
        ``(N,)`` scores.
    """
    return maxsim(q[None], d, d_mask)[0]


class ColBERT(torch.nn.Module):
    """Transformer + linear projection producing normalised token vectors.

    Args:
        model_dir: backbone directory (a HF / sentence-transformers model, or a saved reranker).
        dim: projection dimension (ignored when loading a saved projection).
    """

    def __init__(self, model_dir: Path, dim: int = 128):
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(str(model_dir))
        self.linear = torch.nn.Linear(self.backbone.config.hidden_size, dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised token vectors ``(B, L, dim)``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.linear(hidden.float()), p=2, dim=-1)


class ColBERTTokenizer:
    """Builds marked, padded query and document token ids.

    Args:
        tokenizer: the backbone's fast tokenizer.
        query_length: fixed query length.
        doc_length: maximum document length.
    """

    def __init__(self, tokenizer, query_length: int, doc_length: int):
        self.tok = tokenizer
        self.query_length, self.doc_length = query_length, doc_length
        vocab = tokenizer.get_vocab()
        missing = [m for m in (Q_MARKER, D_MARKER) if m not in vocab]
        if missing or tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer lacks marker tokens {missing or '[MASK]'}; ColBERT needs a BERT vocabulary")
        self.q_id, self.d_id = vocab[Q_MARKER], vocab[D_MARKER]
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask, self.pad = tokenizer.mask_token_id, tokenizer.pad_token_id or 0

    def _body(self, texts: Sequence[str], limit: int) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=limit,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def queries(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of shape ``(n, query_length)``; [MASK] padding is attended."""
        L = self.query_length
        ids = np.full((len(texts), L), self.mask, dtype=np.int64)
        for i, body in enumerate(self._body(texts, L - 3)):
            row = [self.cls, self.q_id, *body, self.sep]
            ids[i, :len(row)] = row
        return torch.from_numpy(ids), torch.ones_like(torch.from_numpy(ids))

    def documents(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` right-padded to the longest document (at most doc_length)."""
        rows = [[self.cls, self.d_id, *b, self.sep] for b in self._body(texts, self.doc_length - 3)]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


class LateInteraction:
    """A ColBERT model with its tokenizer: encode queries/documents, score, save, load.

    Args:
        cfg: settings (base_model, dim, lengths, device).
        model_dir: a saved reranker directory to load instead of initialising from the base model.
    """

    def __init__(self, cfg: ColBERTConfig, model_dir: str | Path | None = None):
        from transformers import AutoTokenizer

        from corpusforge.encoding.encoder import pick_device

        seed_everything(cfg.seed, cfg.threads)
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        src = Path(model_dir) if model_dir else resolve_model_path(cfg.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(src), use_fast=True)
        self.tok = ColBERTTokenizer(self.tokenizer, cfg.query_length, cfg.doc_length)
        self.model = ColBERT(src, cfg.dim)
        if model_dir:
            self.model.linear.load_state_dict(torch.load(Path(model_dir) / LINEAR_FILE, map_location="cpu"))
        self.model.to(self.device)

    def _autocast(self):
        return autocast_for(self.device, self.cfg.precision)

    def encode_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """Query token vectors ``(n, query_length, dim)`` (with the current grad mode)."""
        ids, mask = self.tok.queries(texts)
        with self._autocast():
            return self.model(ids.to(self.device), mask.to(self.device)).float()

    def encode_documents(self, texts: Sequence[str], precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Document token vectors and their mask (with the current grad mode).

        Args:
            texts: the documents.
            precision: overrides the config's precision ('fp32' for vectors that are served).

        Returns:
            ``(n, L, dim)`` float32 vectors and the ``(n, L)`` mask.
        """
        ids, mask = self.tok.documents(texts)
        mask = mask.to(self.device)
        with autocast_for(self.device, precision or self.cfg.precision):
            return self.model(ids.to(self.device), mask).float(), mask

    @torch.no_grad()
    def precompute(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
                   out_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token vectors of many documents (computed in fp32), packed: float16 ``(total_tokens, dim)`` and offsets.

        Args:
            texts: the documents (e.g. every chunk, in chunk-row order).
            batch_size: documents per forward pass (sorted by length to limit padding).
            progress: log progress every 20 batches.
            out_path: write the vectors straight into this ``.npy`` file (memory-mapped) instead of
                holding them whole: about 470 MB for SciFact, 45 GB for a million chunks.

        Returns:
            ``(vectors, offsets)``: document i's tokens are ``vectors[offsets[i]:offsets[i+1]]``
            (with `out_path`, `vectors` is the read-only memory map of the written file).
        """
        self.model.eval()
        lengths = np.array([len(x) for x in self.tok._body(texts, self.cfg.doc_length - 3)]) + 3
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        shape = (int(offsets[-1]), self.cfg.dim)
        out = (np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16, shape=shape) if out_path is not None
               else np.zeros(shape, dtype=np.float16))
        order = np.argsort(-lengths, kind="stable")
        for b, s in enumerate(range(0, len(order), batch_size)):
            pos = order[s:s + batch_size]
            vecs, mask = self.encode_documents([texts[i] for i in pos], precision=DOC_VECTOR_PRECISION)
            vecs = vecs.cpu().numpy().astype(np.float16)
            for j, i in enumerate(pos):
                out[offsets[i]:offsets[i + 1]] = vecs[j, :lengths[i]]
            if progress and b % 20 == 0:
                log.info("reranker precompute: %d/%d documents", s + len(pos), len(texts))
        if out_path is not None:
            out.flush()
            del out
            return np.load(out_path, mmap_mode="r"), offsets
        return out, offsets

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the reranker (backbone, tokenizer, projection, config) atomically.

        Args:
            out_dir: the directory to (re)place.
            extra: more config entries to record (e.g. the fusion weight).

        Returns:
            `out_dir`.
        """
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.backbone.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        torch.save(self.model.linear.state_dict(), tmp / LINEAR_FILE)
        config = asdict(self.cfg)
        if config["base_model"] != DEFAULT_MODEL:  # the starting model by content, not by where it lay
            config["base_model"] = f"fingerprint:{model_fingerprint(config['base_model'])}"
        (tmp / CONFIG_FILE).write_text(json.dumps({**config, **(extra or {}),
                                                   "q_marker": Q_MARKER, "d_marker": D_MARKER}, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto") -> "LateInteraction":
        """Load a reranker saved by `save`.

        Args:
            model_dir: the directory.
            device: 'auto', 'cpu' or 'cuda'.

        Returns:
            The reranker model, in eval mode.
        """
        raw = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
        known = {k: v for k, v in raw.items() if k in ColBERTConfig.__dataclass_fields__}
        cfg = ColBERTConfig(**{**known, "device": device})
        obj = cls(cfg, model_dir)
        obj.model.eval()
        obj.extra = raw
        return obj


def fuse(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """``weight * minmax(second) + (1 - weight) * minmax(first)`` over one query's candidates.

    Args:
        first: first-stage scores.
        second: reranker scores.
        weight: the reranker's weight in [0, 1].

    Returns:
        The fused scores.
    """
    def mm(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
        return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)
    return weight * mm(second) + (1.0 - weight) * mm(first)
