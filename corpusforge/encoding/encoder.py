"""A bi-encoder for passages and queries: a Hugging Face transformer plus sentence pooling.

`Encoder` reads a sentence-transformers model directory (or a plain Hugging Face one) and
reproduces `SentenceTransformer.encode` for it -- transformer, pooling as configured in the
model's Pooling module, optional L2 normalisation -- with less overhead:

* every text is tokenised once, up front, by the fast (Rust) tokenizer in one parallel call;
* batches are formed from texts sorted by their exact token count (not their character count),
  so a batch is padded only to the longest of near-equal lengths, and results are restored to
  input order;
* the model runs under `torch.inference_mode`, on CUDA with fp16 autocast when available, else
  on the CPU in float32.

The model is loaded once per `Encoder`; keep the object around to encode many batches.
"""

from __future__ import annotations

import random

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpusforge.data.hashing import config_fingerprint
from corpusforge.encoding.models import model_fingerprint, resolve_model_path
from corpusforge.encoding.numerics import ensure_strict_gemm, gemm_mode
from corpusforge.spec import ModelConfig

log = logging.getLogger("corpusforge.encoding.encoder")

# Pooling modes as named in sentence-transformers' 1_Pooling/config.json.
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = tuple(_POOLING_KEYS.values())


@dataclass(frozen=True)
class ModelLayout:
    """What a sentence-transformers directory says about how to turn tokens into a vector.

    Attributes:
        pooling: one of `POOLING_MODES`.
        has_normalize: the model ships a Normalize module (informational; `ModelConfig.normalize`
            decides).
        do_lower_case: the Transformer module lower-cases text before tokenising.
        max_seq_length: the module's configured maximum length, when it has one.
    """

    pooling: str = "mean"
    has_normalize: bool = False
    do_lower_case: bool = False
    max_seq_length: int | None = None


def read_layout(model_dir: Path) -> ModelLayout:
    """Read pooling / normalisation / lower-casing settings from a model directory.

    A plain Hugging Face directory (no ``modules.json``) gets mean pooling, as
    sentence-transformers itself does for such models.

    Args:
        model_dir: the model directory.

    Returns:
        The layout.

    Raises:
        ValueError: the pooling config enables no mode or several, or one we do not implement.
    """
    modules = _read_json(model_dir / "modules.json") or []
    pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
    has_normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling = _pooling_mode(model_dir / pooling_dir / "config.json")
    st_cfg = _read_json(model_dir / "sentence_bert_config.json") or {}
    return ModelLayout(pooling=pooling, has_normalize=has_normalize,
                       do_lower_case=bool(st_cfg.get("do_lower_case", False)),
                       max_seq_length=st_cfg.get("max_seq_length"))


def _pooling_mode(path: Path) -> str:
    cfg = _read_json(path)
    if cfg is None:
        return "mean"
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers write one key
        mode = cfg["pooling_mode"]
        modes = [mode if mode != "mean_sqrt_len" else "mean_sqrt_len_tokens"]
    else:
        modes = [name for key, name in _POOLING_KEYS.items() if cfg.get(key)]
        unknown = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_KEYS]
        modes += unknown
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{path}: pooling {modes or 'none'} is not supported; "
                         f"expected exactly one of {', '.join(POOLING_MODES)}")
    return modes[0]


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def pick_device(requested: str) -> torch.device:
    """The torch device for a `ModelConfig.device` value.

    Args:
        requested: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Returns:
        The device.

    Raises:
        RuntimeError: ``cuda`` was requested and no CUDA device is available.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def pick_precision(requested: str, device: torch.device) -> str:
    """The working precision for a `ModelConfig.precision` value on a device.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: where the model runs.

    Returns:
        ``fp32``, ``bf16`` or ``fp16``. ``auto`` gives fp16 on CUDA, bf16 on a CPU with native
        bf16 (about 1.6x fp32 on all-MiniLM-L6-v2, vectors at cosine >= 0.9999 to fp32's), and
        fp32 elsewhere.

    Raises:
        ValueError: fp16 requested on a CPU (slow and poorly supported there).
    """
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("model.precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return requested


class Encoder:
    """Encodes passages and queries into dense vectors with a local transformer model.

    Args:
        cfg: the model section of the pipeline spec. ``cfg.name`` is ``default`` (the packaged
            all-MiniLM-L6-v2) or a sentence-transformers / Hugging Face model directory.

    Attributes:
        dim: the vector dimension.
        fingerprint: identifies the passage vectors this encoder produces: the model files'
            fingerprint plus pooling, normalisation, maximum length, passage prefix and working
            precision, MKL's reproducibility mode and, in bf16, the torch thread count (bf16 vectors
            change with it; fp32 ones do not). The embedding cache is keyed by it. (The query prefix
            is left out: it does not change passage vectors.)
        precision: ``fp32``, ``bf16`` or ``fp16`` (see `pick_precision`).
        device: the torch device the model runs on.
        max_seq_length: the truncation length in tokens (special tokens included).
        pooling: the pooling mode.
    """

    def __init__(self, cfg: ModelConfig):
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        ensure_strict_gemm()  # before this process's first matrix product, where it still can
        self.model_dir = resolve_model_path(cfg.name)
        self.layout = read_layout(self.model_dir)
        self.pooling = self.layout.pooling
        self.device = pick_device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), use_fast=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"model {cfg.name!r}: no fast tokenizer (tokenizer.json) in {self.model_dir}")
        self.precision = pick_precision(cfg.precision, self.device)
        # bf16 weights outright on a CPU (autocast re-casts every weight on every call: slower).
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = AutoModel.from_pretrained(str(self.model_dir), dtype=dtype).eval().to(self.device)
        self.max_seq_length = self._max_length(cfg.max_seq_length)
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = config_fingerprint(model_fingerprint(cfg.name), {
            "pooling": self.pooling,
            "normalize": cfg.normalize,
            "max_seq_length": self.max_seq_length,
            "do_lower_case": self.layout.do_lower_case,
            "passage_prefix": cfg.passage_prefix,
            "precision": self.precision,
            "one_text_batches": "as two",  # vectors of one-text batches changed with this (see _forward)
            # vectors changed with the thread count before MKL's strict mode (encoding.numerics)
            "mkl_cbwr": gemm_mode()["mkl_cbwr"],
            # bf16 products (oneDNN) split their sums by the thread count, which MKL's mode does not
            # cover: a Ray actor with one CPU and the local engine make different bf16 vectors.
            "bf16_threads": torch.get_num_threads() if self.precision == "bf16" else None,
        })
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._backend = _truncating_backend(self.tokenizer, self.max_seq_length)
        self._fp16 = self.precision == "fp16"

    def _max_length(self, requested: int) -> int:
        """`requested`, capped at what the model's position embeddings and tokenizer allow."""
        limits = [requested]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        if self.tokenizer.model_max_length and self.tokenizer.model_max_length < 1_000_000:
            limits.append(int(self.tokenizer.model_max_length))
        length = min(limits)
        if length < requested:
            log.warning("model %s: max_seq_length %d capped at %d", self.cfg.name, requested, length)
        return length

    # -- public API ------------------------------------------------------------------------------

    def encode_passages(self, texts: Sequence[str], batch_size: int | None = None,
                        progress: bool = False) -> np.ndarray:
        """Embed passages (with ``cfg.passage_prefix``).

        Args:
            texts: the passages.
            batch_size: texts per forward pass; default ``cfg.batch_size``.
            progress: show a progress bar with counts and rate.

        Returns:
            A float32 array of shape ``(len(texts), dim)``, rows in input order.
        """
        return self._encode_all(texts, self.cfg.passage_prefix, batch_size, progress)

    def encode_queries(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed queries (with ``cfg.query_prefix``).

        Args:
            texts: the queries.
            batch_size: texts per forward pass; default ``cfg.batch_size``.

        Returns:
            A float32 array of shape ``(len(texts), dim)``, rows in input order.
        """
        return self._encode_all(texts, self.cfg.query_prefix, batch_size, False)

    def iter_encode(self, texts: Sequence[str], batch_size: int | None = None, prefix: str | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embed texts batch by batch, longest first, yielding each batch as soon as it is done.

        For callers that act on partial results (committing a cache shard, showing progress).

        Args:
            texts: the texts.
            batch_size: texts per forward pass; default ``cfg.batch_size``.
            prefix: prepended to every text; default ``cfg.passage_prefix``.

        Yields:
            ``(positions, vectors)``: the input positions of the batch's texts (int64) and their
            float32 vectors, row for row.
        """
        batch_size = batch_size or self.cfg.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not texts:
            return
        ids = self.tokenize(texts, self.cfg.passage_prefix if prefix is None else prefix)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first: the first batch is the biggest, so an out-of-memory error shows at once.
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                positions = order[start:start + batch_size]
                yield positions, self._forward([ids[i] for i in positions])

    def report(self) -> dict[str, Any]:
        """What this encoder is, as plain data for summaries, manifests and MLflow params.

        Returns:
            Model name and directory, fingerprint, dim, device, precision, pooling,
            normalisation, maximum length, prefixes, batch size, torch threads and MKL's
            reproducibility mode (``AUTO,STRICT``: vectors do not depend on the threads).
        """
        return {
            "name": self.cfg.name,
            "model_dir": str(self.model_dir),
            "architecture": (self.model.config.architectures or [type(self.model).__name__])[0],
            "fingerprint": self.fingerprint,
            "model_fingerprint": model_fingerprint(self.cfg.name),
            "dim": self.dim,
            "device": str(self.device),
            "precision": "fp16-autocast" if self._fp16 else self.precision,
            "pooling": self.pooling,
            "normalize": self.cfg.normalize,
            "do_lower_case": self.layout.do_lower_case,
            "max_seq_length": self.max_seq_length,
            "query_prefix": self.cfg.query_prefix,
            "passage_prefix": self.cfg.passage_prefix,
            "batch_size": self.cfg.batch_size,
            "torch_threads": torch.get_num_threads(),
            "mkl_cbwr": gemm_mode()["mkl_cbwr"],
        }

    # -- internals -------------------------------------------------------------------------------

    def _encode_all(self, texts: Sequence[str], prefix: str, batch_size: int | None, progress: bool
                    ) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        batches = self.iter_encode(texts, batch_size, prefix)
        if progress:
            from corpusforge.progress import make_progress

            with make_progress() as bar:
                task = bar.add_task("encode", total=len(texts), unit="texts")
                for positions, vectors in batches:
                    out[positions] = vectors
                    bar.advance(task, len(positions))
        else:
            for positions, vectors in batches:
                out[positions] = vectors
        return out

    def tokenize(self, texts: Sequence[str], prefix: str) -> list[list[int]]:
        """Token ids of every text as the model sees it, in one parallel call.

        Args:
            texts: the texts.
            prefix: prepended to every text (``cfg.query_prefix`` or ``cfg.passage_prefix``).

        Returns:
            One id list per text: lower-cased if the model says so, special tokens added,
            truncated to ``max_seq_length``.
        """
        if prefix:
            texts = [prefix + t for t in texts]
        if self.layout.do_lower_case:
            texts = [t.lower() for t in texts]
        # The Rust tokenizer directly, set up as `tokenizer(..., truncation=True, max_length=...)`
        # sets it up: same ids, without transformers' per-call Python. encode_batch even for one
        # text: it releases the GIL (encode does not), which the serving threads need.
        return [e.ids for e in self._backend.encode_batch(list(texts))]

    def pad(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad token id lists to the longest.

        Args:
            batch: token id lists (`tokenize` output).

        Returns:
            ``(input_ids, attention_mask)``, int64 ``(len(batch), longest)``.
        """
        width = max(len(x) for x in batch)
        ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, x in enumerate(batch):
            ids[row, :len(x)] = x
            mask[row, :len(x)] = 1
        return ids, mask

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        """One padded forward pass plus pooling; returns float32 vectors.

        A batch of one text runs as two copies of it: torch's CPU kernels split a one-row batch's
        work by the thread count, so its vector changed in the last bits with the cores (a Ray
        actor with one CPU and the local engine with all of them encoded a corpus's last, one-text
        block differently). From two rows on, MKL's strict mode (`corpusforge.encoding.numerics`)
        makes the matrix products, and with them the vectors, independent of the threads.
        """
        single = len(batch) == 1
        ids, mask = self.pad(batch * 2 if single else batch)
        input_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
        attention = torch.from_numpy(mask).to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self._fp16 else contextlib.nullcontext()
        with autocast:
            hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        vectors = pool(hidden.float(), attention, self.pooling)
        if self.cfg.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return (vectors[:1] if single else vectors).cpu().numpy()


def _truncating_backend(tokenizer, max_length: int):
    """A private copy of a fast tokenizer's Rust backend that truncates to `max_length`, never pads.

    A copy, because the backend's truncation setting is shared state that transformers rewrites
    on every ``tokenizer(...)`` call.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
    return backend


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors from token states, as sentence-transformers' Pooling module computes them.

    Args:
        hidden: token states, ``(batch, tokens, dim)``.
        mask: the attention mask, ``(batch, tokens)``, 1 for real tokens.
        mode: one of `POOLING_MODES`.

    Returns:
        ``(batch, dim)`` vectors.
    """
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    if mode == "lasttoken":  # right padding: the last real token of each row
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len_tokens" else counts)


def _check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list; a clear error naming the first non-string."""
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text #{i} is {type(t).__name__}, expected str")
    return texts


def autocast_for(device: torch.device, precision: str):
    """The autocast context for training/encoding: bf16 where it is native (3x fp32 on such CPUs), else off.

    Args:
        device: the torch device.
        precision: 'auto', 'bf16' or 'fp32' ('fp16' is treated as bf16: no loss scaling here).

    Returns:
        A ``torch.autocast`` context manager.
    """
    if precision not in ("auto", "bf16", "fp32", "fp16"):
        raise ValueError(f"precision must be auto, bf16 or fp32; got {precision!r}")
    use = precision in ("bf16", "fp16") or (precision == "auto" and (device.type == "cuda" or cpu_has_native_bf16()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed every RNG a trainer may touch (Python, numpy, torch CPU and CUDA) and fix torch's thread count.

    Args:
        seed: the seed.
        threads: torch CPU threads (0: leave torch's default, one per core).
    """
    ensure_strict_gemm()
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too
