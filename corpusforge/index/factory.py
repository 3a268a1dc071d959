"""The 'auto' choice of FAISS index type, from corpus size, dimension and a memory budget.

The rule (documented here and in ``choose_factory``):

1. ``n < FLAT_MAX`` (50,000 vectors): ``Flat``. Exact search over 50k x 384 floats takes
   a few milliseconds, so an approximate index would only cost recall.
2. Otherwise, when HNSW's estimated memory fits ``memory_budget_mb``: ``HNSW32,Flat``.
   The estimate is ``n * (4*dim + 8*M + 16) * 1.1`` bytes: the float32 vectors, the level-0
   neighbour lists (2*M int32 ids) plus the sparser upper levels and per-node offsets/levels,
   with 10% headroom.
3. Beyond: ``IVF{nlist},PQ{m}x8`` with ``nlist`` = the power of two nearest ``4*sqrt(n)``
   (bounded so every list gets ~39 training points on average) and ``m`` = the largest divisor
   of ``dim`` not above ``dim/8`` (PQ needs ``dim % m == 0``), i.e. one byte per 8 dimensions.
"""

from __future__ import annotations

import math

FLAT_MAX = 50_000
HNSW_M = 32


def hnsw_memory_bytes(n: int, dim: int, m: int = HNSW_M) -> int:
    """Estimated resident size of an ``HNSW{m},Flat`` index.

    Args:
        n: number of vectors.
        dim: vector dimension.
        m: HNSW neighbours per node on the upper levels (2*m on level 0).

    Returns:
        Estimated bytes, with 10% headroom.
    """
    return int(n * (4 * dim + 8 * m + 16) * 1.1)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest ``4*sqrt(n)``.

    Args:
        n: number of vectors.

    Returns:
        nlist, at least 1 and at most ``n // 39`` (FAISS k-means wants ~39 points per centroid).
    """
    target = 4.0 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    return int(max(1, min(nlist, max(1, n // 39))))


def pq_m(dim: int) -> int:
    """PQ sub-quantizer count: the largest divisor of ``dim`` that is at most ``dim/8``.

    Args:
        dim: vector dimension.

    Returns:
        m with ``dim % m == 0`` (1 for tiny dimensions).
    """
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1  # pragma: no cover - 1 always divides


def choose_factory(n: int, dim: int, memory_budget_mb: int) -> str:
    """Pick a FAISS factory string for the 'auto' setting (see the module docstring for the rule).

    Args:
        n: number of vectors to index (per the whole index, not per shard).
        dim: vector dimension.
        memory_budget_mb: memory the index may use, in MiB.

    Returns:
        A FAISS ``index_factory`` string.

    Raises:
        ValueError: ``n`` or ``dim`` is not positive.
    """
    if n <= 0 or dim <= 0:
        raise ValueError(f"choose_factory needs n > 0 and dim > 0, got n={n}, dim={dim}")
    if n < FLAT_MAX:
        return "Flat"
    if hnsw_memory_bytes(n, dim) <= memory_budget_mb * 2**20:
        return f"HNSW{HNSW_M},Flat"
    return f"IVF{ivf_nlist(n)},PQ{pq_m(dim)}x8"
