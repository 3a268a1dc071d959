"""Micro-batching of query encoding across concurrent requests.

Each request awaits `MicroBatcher.encode(fn, text)`. One worker task takes the first queued
query, gathers whatever else is queued (waiting up to ``max_wait_ms`` for more, up to
``max_batch``), and encodes the batch with one call per encoder in a worker thread. While a batch
is encoding, new queries queue up and form the next batch, so under load batches grow by
themselves and at low load a query waits at most ``max_wait_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import numpy as np

log = logging.getLogger("corpusforge.serve")

EncodeFn = Callable[[list[str]], np.ndarray]


class MicroBatcher:
    """Groups concurrent encode requests into batched encoder calls.

    Args:
        max_batch: the most texts per encoder call.
        max_wait_ms: how long to wait for more texts after the first one.
        on_batch: called with each batch size (for metrics).
    """

    def __init__(self, max_batch: int = 32, max_wait_ms: float = 1.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def encode(self, fn: EncodeFn, text: str) -> np.ndarray:
        """Encode one text, batched with concurrent callers.

        Args:
            fn: the encoder (texts -> (n, d) float32); texts for different encoders are batched
                separately.
            text: the text.

        Returns:
            The (d,) vector.
        """
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((fn, text, fut))
        return await fut

    async def close(self) -> None:
        """Stop the worker task."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _gather(self) -> list[tuple[EncodeFn, str, asyncio.Future]]:
        q = self._queue
        batch = [await q.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not q.empty():
                batch.append(q.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            groups: dict[EncodeFn, list[tuple[str, asyncio.Future]]] = {}
            for fn, text, fut in batch:
                groups.setdefault(fn, []).append((text, fut))
            for fn, items in groups.items():
                live = [(t, f) for t, f in items if not f.done()]  # skip callers that went away
                if not live:
                    continue
                if self.on_batch:
                    self.on_batch(len(live))
                try:
                    vectors = await asyncio.to_thread(fn, [t for t, _ in live])
                except Exception as exc:  # every waiter gets the error; the worker lives on
                    for _, f in live:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for (_, f), v in zip(live, vectors):
                    if not f.done():
                        f.set_result(v)
