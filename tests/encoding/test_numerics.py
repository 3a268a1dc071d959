"""MKL's strict reproducible mode: matrix products, and so vectors, that do not depend on the threads.

Each case runs in a fresh interpreter: the mode is fixed at a process's first MKL call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str | None) -> dict:
    """Run `code` in a fresh interpreter (env: None removes a variable); its last stdout line as JSON."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        environ.pop(key, None) if value is None else environ.__setitem__(key, value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environ,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


# Linear layers of the shapes an encoder batch makes (rows: texts x tokens), with 1 and 2 threads. Without
# the strict mode, on an Intel Xeon with AVX-512, 10 rows through 384 -> 384 and 63 through 1536 -> 384
# differed in the last bits (an AMD EPYC with AVX2 gave equal bits for these).
_PRODUCTS = """
import json, torch
{first}
from corpusforge.encoding.numerics import ensure_strict_gemm, gemm_mode
g = torch.Generator().manual_seed(0)
same = []
for rows in (1, 2, 10, 42, 63, 256):
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        out = {{}}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = torch.nn.functional.linear(x, w, b).numpy().tobytes()
        same.append(out[1] == out[2])
print(json.dumps({{"same": same, "ensure": ensure_strict_gemm(), **gemm_mode()}}))
"""


def test_importing_corpusforge_makes_products_independent_of_the_thread_count():
    got = python(_PRODUCTS.format(first="import corpusforge"), MKL_CBWR=None)
    assert got["blas"] == "mkl" and got["mkl_cbwr"] == "AUTO,STRICT" and got["thread_invariant"] is True
    assert all(got["same"]) and got["ensure"] is True


_ENCODER = """
import json, logging
logging.basicConfig()
{first}
from corpusforge.encoding.encoder import Encoder
from corpusforge.spec import ModelConfig
enc = Encoder(ModelConfig(device="cpu", precision="fp32"))
print(json.dumps({{"report": enc.report()["mkl_cbwr"], "fingerprint": enc.fingerprint}}))
"""


def test_a_mode_chosen_by_the_user_is_kept_and_reported_with_a_warning():
    """MKL_CBWR set to a non-strict branch before the process starts: corpusforge leaves it, the
    encoder's report and fingerprint say which mode made its vectors, and a warning says why
    they may change with the threads."""
    chosen = python(_ENCODER.format(first="import corpusforge"), MKL_CBWR="COMPATIBLE")
    assert chosen["report"] == "COMPATIBLE"
    assert "MKL's strict reproducible mode is off (MKL_CBWR=COMPATIBLE, COMPATIBLE)" in chosen["stderr"]
    strict = python(_ENCODER.format(first="import corpusforge"), MKL_CBWR=None)
    assert strict["report"] == "AUTO,STRICT" and "strict reproducible mode is off" not in strict["stderr"]
    assert strict["fingerprint"] != chosen["fingerprint"], "the embedding cache must not mix the two"


def test_a_product_computed_before_corpusforge_is_imported_is_too_late_and_says_so():
    late = python(_ENCODER.format(first="import torch; torch.ones(4, 4) @ torch.ones(4, 4)"), MKL_CBWR=None)
    assert late["report"] == "OFF"
    assert "MKL's strict reproducible mode is off (MKL_CBWR=AUTO,STRICT, OFF)" in late["stderr"]


def test_the_strict_mode_is_switched_on_when_mkl_is_still_unused():
    """Here MKL_CBWR is removed after `import corpusforge` (say, by a test harness); the encoder
    switches the mode on itself, since no product has been computed yet."""
    code = _PRODUCTS.format(first="import os, corpusforge; del os.environ['MKL_CBWR']\n"
                                  "from corpusforge.encoding.numerics import ensure_strict_gemm as e; e()")
    got = python(code, MKL_CBWR=None)
    assert got["mkl_cbwr"] == "AUTO,STRICT" and all(got["same"])


def test_bf16_vectors_are_cached_per_thread_count_and_fp32_ones_are_not():
    """oneDNN's bf16 products split their sums by the thread count (MKL's mode does not reach
    them): 1 and 2 threads gave bf16 vectors 5.6e-4 apart on an Intel Xeon with AMX. The encoder's
    fingerprint, which keys the embedding cache, says so; the fp32 one does not change."""
    import torch

    from corpusforge.encoding.encoder import Encoder
    from corpusforge.spec import ModelConfig

    threads = torch.get_num_threads()
    prints = {}
    try:
        for precision in ("fp32", "bf16"):
            for n in (1, 2):
                torch.set_num_threads(n)
                prints[precision, n] = Encoder(ModelConfig(device="cpu", precision=precision)).fingerprint
    finally:
        torch.set_num_threads(threads)
    assert prints["fp32", 1] == prints["fp32", 2]
    assert prints["bf16", 1] != prints["bf16", 2] and prints["bf16", 1] != prints["fp32", 1]
