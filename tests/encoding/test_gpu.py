"""GPU encoding (``gpu`` marker: needs a CUDA device and the ``gpu`` extra; ``make test-gpu``).

These are not in the default suite. On a machine without CUDA they fail, loudly, rather than skip:
``make test-gpu`` is only run where a GPU is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corpusforge.encoding.encoder import Encoder
from corpusforge.spec import ModelConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


def _demo_texts() -> list[str]:
    """The demo corpus's titles and texts: real prose of varied lengths (41 documents, 82 texts)."""
    texts = []
    for line in (ROOT / "examples/demo/corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        texts += [doc.get("title") or "", doc["text"]]
    return texts


def _require_cuda() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device and CUDA torch (`make install-gpu`)"


def test_cuda_fp16_vectors_match_cpu_fp32():
    _require_cuda()
    texts = _demo_texts()
    gpu = Encoder(ModelConfig(device="cuda", precision="fp16"))
    cpu = Encoder(ModelConfig(device="cpu", precision="fp32"))
    assert gpu.report()["precision"] == "fp16-autocast" and gpu.device.type == "cuda"
    assert gpu.fingerprint != cpu.fingerprint  # the cache never mixes the two
    a = gpu.encode_passages(texts, batch_size=16)
    b = cpu.encode_passages(texts, batch_size=16)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"cuda fp16 vs cpu fp32 over {len(texts)} texts: min cosine {cosine.min():.6f}, "
          f"median {np.median(cosine):.6f}")
    assert cosine.min() >= 0.999
    q = gpu.encode_queries(["does vitamin d prevent fractures?"])
    assert np.isfinite(q).all()


def test_auto_picks_cuda_and_fp16():
    _require_cuda()
    enc = Encoder(ModelConfig())
    assert enc.device.type == "cuda" and enc.precision == "fp16"
