"""The query endpoint: a FastAPI app over a published snapshot, with hot swap, API keys, ACLs,
rate limits, micro-batched searches and an LRU result cache.

- :func:`~corpusforge.serve.app.create_app`, :func:`~corpusforge.serve.app.run_server`
- :class:`~corpusforge.serve.settings.ServeSettings`
- :func:`~corpusforge.serve.loader.open_snapshot`: a snapshot directory as a ready `Searcher`.
"""

from corpusforge.serve.app import create_app, run_server
from corpusforge.serve.loader import LoadedSnapshot, open_snapshot
from corpusforge.serve.settings import ServeSettings

__all__ = ["LoadedSnapshot", "ServeSettings", "create_app", "open_snapshot", "run_server"]
