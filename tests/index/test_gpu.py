"""GPU IVF training (``gpu`` marker: needs faiss with GPU support and a CUDA device; ``make test-gpu``).

Not in the default suite. Without a GPU these fail, loudly, rather than skip.
"""

from __future__ import annotations

import pytest

from corpusforge.index.dense import DenseIndex, _gpu_available
from corpusforge.spec import DenseIndexConfig
from tests.index.test_dense import clustered

pytestmark = pytest.mark.gpu


def test_ivf_trains_on_the_gpu_and_matches_cpu_quality(monkeypatch):
    assert _gpu_available(), ("the gpu tests need faiss with GPU support (faiss-gpu-cu12, `make install-gpu`) "
                              "and a CUDA device")
    data = clustered(40_000, 64)
    cfg = DenseIndexConfig(factory="IVF256,PQ16x8", shards=2, train_sample=20_000)
    on_gpu = DenseIndex.build(data, cfg, progress=False)
    assert on_gpu.info["gpu_training"] is True
    monkeypatch.setattr("corpusforge.index.dense._gpu_available", lambda: False)
    on_cpu = DenseIndex.build(data, cfg, progress=False)
    assert on_cpu.info["gpu_training"] is False
    print(f"IVF256,PQ16x8 on 40k: recall@10 gpu-trained {on_gpu.info['recall_at_10']:.4f} "
          f"({on_gpu.info['train_seconds']:.2f} s), cpu-trained {on_cpu.info['recall_at_10']:.4f} "
          f"({on_cpu.info['train_seconds']:.2f} s)")
    # k-means on the GPU is not bitwise the CPU's; the trained quantizer is as good
    assert on_gpu.info["recall_at_10"] >= on_cpu.info["recall_at_10"] - 0.03
