"""Matrix products whose bits do not depend on the thread count: MKL's strict reproducibility mode.

torch's CPU build does its float32 matrix products with Intel MKL. By default MKL picks its kernel
and splits the work by the number of threads, so the same batch gives vectors that differ in the
last bits with 1 thread (a Ray actor with one CPU) and with 2 (the local engine on two cores): on
an Intel Xeon with AVX-512, a 10x384 by 384x384 product differed, and with it whole embeddings.
MKL's Conditional Numerical Reproducibility in its *strict* mode (``MKL_CBWR=AUTO,STRICT``: the
best code path for the CPU, results that do not depend on the threads) removes that; it must be
chosen before the process's first MKL call.

`corpusforge/__init__.py` sets ``MKL_CBWR=AUTO,STRICT`` in the environment unless it is set
already (MKL reads it at its first call, and subprocesses and Ray workers inherit it);
`ensure_strict_gemm` checks that it took effect, switches it on when MKL is still unused, and says
so when it is too late. Measured cost (2026-12-03, Intel Xeon, 2 threads, fp32 MiniLM, 512 texts
of 20 to 200 words, 3 processes x 3 runs each, interleaved): median 5.42 s strict against 5.25 s
with ``MKL_CBWR=AUTO``, about 3% slower.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

log = logging.getLogger("corpusforge.encoding.numerics")

# mkl_service.h
_CBWR_ALL = -1
_CBWR_AUTO = 2
_CBWR_STRICT = 0x10000
_CBWR_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                  9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


@cache
def _mkl():
    """torch's MKL service functions, or None where torch has no MKL (aarch64, some builds)."""
    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        # what libtorch_cpu exports of MKL's mkl_cbwr_get / mkl_cbwr_set (MKL is linked in statically)
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    get.argtypes = set_.argtypes = [ctypes.c_int]
    get.restype = set_.restype = ctypes.c_int
    return get, set_


def gemm_mode() -> dict:
    """How this process's matrix products are computed, for encoder reports and manifests.

    Returns:
        ``{"blas": "mkl", "mkl_cbwr": "AUTO,STRICT", "thread_invariant": True}``; ``blas`` is
        ``"other"`` (and ``thread_invariant`` None: not known) where torch does not use MKL.
    """
    mkl = _mkl()
    if mkl is None:
        return {"blas": "other", "mkl_cbwr": None, "thread_invariant": None}
    value = mkl[0](_CBWR_ALL)
    strict = bool(value & _CBWR_STRICT)
    branch = _CBWR_BRANCHES.get(value & ~_CBWR_STRICT, str(value & ~_CBWR_STRICT))
    return {"blas": "mkl", "mkl_cbwr": branch + (",STRICT" if strict else ""), "thread_invariant": strict}


def ensure_strict_gemm() -> bool:
    """Make this process's MKL matrix products independent of the thread count, if still possible.

    Returns:
        True when they are (or torch has no MKL, whose kernels this does not cover); False, with
        a warning, when MKL runs in another mode: ``MKL_CBWR`` set to a non-strict mode by the user
        (kept), or a torch product computed before `corpusforge` was imported.
    """
    mkl = _mkl()
    if mkl is None:
        return True
    get, set_ = mkl
    if get(_CBWR_ALL) & _CBWR_STRICT:
        return True
    requested = os.environ.get("MKL_CBWR")
    # A mode the user chose stays; unset (or asked strict), it is switched on while MKL is unused.
    if (requested is None or "STRICT" in requested.upper()) and set_(_CBWR_AUTO | _CBWR_STRICT) == 0:
        return True
    log.warning("MKL's strict reproducible mode is off (MKL_CBWR=%s, %s): vectors may differ in the last bits "
                "with the thread count; start the process with MKL_CBWR=AUTO,STRICT",
                requested or "unset", gemm_mode()["mkl_cbwr"])
    return False
