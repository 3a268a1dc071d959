"""corpusforge: raw text corpora to evaluated, versioned retrieval indexes, and their serving.

Importing the package is cheap and never imports an orchestrator (dagster, airflow); heavy
modules (torch, faiss, mlflow) load only when their stage runs. `open_index` and `Index`
(`corpusforge.api`: search a published snapshot from Python) load on first access.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Index", "__version__", "open_index"]

_LAZY = {"open_index": "corpusforge.api", "Index": "corpusforge.api"}


def __getattr__(name: str) -> Any:
    """Import the public API on first access (PEP 562), keeping ``import corpusforge`` cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'corpusforge' has no attribute {name!r}")
