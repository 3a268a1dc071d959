"""corpusforge: raw text corpora to evaluated, versioned retrieval indexes, and their serving.

Importing the package is cheap and never imports an orchestrator (dagster, airflow); heavy
modules (torch, faiss, mlflow) load only when their stage runs. `open_index` and `Index`
(`corpusforge.api`: search a published snapshot from Python) load on first access.
"""

import os
from typing import Any

# MKL's strict reproducible mode, before torch's first matrix product: the same batch then gives the
# same bits with any thread count (a one-CPU Ray actor and the local engine agree). MKL reads this
# at its first call; subprocesses and Ray workers inherit it. See corpusforge.encoding.numerics.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
__all__ = ["Index", "__version__", "open_index"]

_LAZY = {"open_index": "corpusforge.api", "Index": "corpusforge.api"}


def __getattr__(name: str) -> Any:
    """Import the public API on first access (PEP 562), keeping ``import corpusforge`` cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corpusforge' has no attribute {name!r}")
