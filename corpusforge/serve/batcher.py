"""Micro-batching of concurrent searches on a set of search threads.

Each request awaits `MicroBatcher.submit(key, fn, query)`, which only appends the query to a
shared queue. The search threads pull from that queue themselves: a thread that finishes a batch
takes its share of what queued meanwhile (the queue divided by the thread count, at most
``max_batch``), keeping only queries with the key of the oldest one (one snapshot, mode, k,
filters, ACL... per call), and runs them as one ``fn(queries)`` call: one tokenizer call, one
index call per candidate depth and one hit materialisation for the whole group, instead of one of
each per request. While all threads are busy, queries queue up and form the next batch, so under
load batches grow by themselves, and at low load a query starts at once (or after
``max_wait_ms``, when set). Results go back to each caller's event loop in one callback per batch.

Why the threads pull rather than an event-loop task handing batches out: a hand-off through the
loop waits for the loop to get round to it, and under load the loop is busy parsing HTTP. A
dispatcher task measured ~25% of the two cores idle at concurrency 16, the search threads
waiting for their next batch.

Why whole searches rather than just the encoder call: on a CPU the int8 query encoder runs one
text per call anyway (see `onnx_query`), and what a batch saves there is the Python around each
search -- futures, argument checks, index wrappers -- which holds the GIL that the other search
threads and the event loop need.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

BatchFn = Callable[[list[str]], Sequence[Any]]


class _Item(NamedTuple):
    key: Hashable
    fn: BatchFn
    query: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class BatcherClosed(RuntimeError):
    """The batcher was closed before the query ran."""


class MicroBatcher:
    """Groups concurrent queries with equal keys into batched calls on its own search threads.

    Args:
        threads: how many search threads run batches (see `resize`).
        max_batch: the most queries per call.
        max_wait_ms: how long a free thread waits for more queries of its batch's key before it
            starts (0: take only what is already queued).
        on_batch: called with each batch size, on the search thread (for metrics).
        thread_init: called once on each new search thread before its first batch.
        name: the threads' name prefix.
    """

    def __init__(self, threads: int = 1, max_batch: int = 32, max_wait_ms: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, thread_init: Callable[[], None] | None = None,
                 name: str = "cf-search") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch, self.thread_init, self.name = on_batch, thread_init, name
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._target = 0
        self._alive = 0
        self._started = 0
        self._closed = False
        self.resize(threads)

    @property
    def threads(self) -> int:
        """The number of search threads asked for."""
        return self._target

    def resize(self, threads: int) -> None:
        """Run batches on `threads` threads from now on. Surplus threads exit after their current
        batch; queued queries are taken by the threads that remain.

        Args:
            threads: the new thread count (>= 1).
        """
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._target = threads
            while self._alive < threads:
                self._alive += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True).start()
            self._cond.notify_all()

    async def submit(self, key: Hashable, fn: BatchFn, query: str) -> Any:
        """Run one query, batched with concurrent queries of the same key.

        Args:
            key: what makes queries batchable together; queries with equal keys must be
                answerable by one ``fn`` call (the oldest query's ``fn`` runs the group).
            fn: ``queries -> results`` in order, run on a search thread; an exception fails
                every query of its batch.
            query: the query.

        Returns:
            This query's result.

        Raises:
            BatcherClosed: the batcher is closed.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._queue.append(_Item(key, fn, query, future, loop))
            self._cond.notify()
        return await future

    def close(self) -> None:
        """Stop the search threads after their current batch; queued queries fail with
        `BatcherClosed`."""
        with self._cond:
            self._closed, self._target = True, 0
            queued, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for item in queued:
            _call_soon(item.loop, _fail, item.future, BatcherClosed("the server is shutting down"))

    # ------------------------------------------------------------------ search threads
    def _work(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        while True:
            with self._cond:
                while not self._queue and self._alive <= self._target:
                    self._cond.wait()
                if self._alive > self._target:  # surplus after a resize (or closed)
                    self._alive -= 1
                    return
                batch = self._take()
                if self.max_wait > 0 and len(batch) < self.max_batch:
                    self._wait_for_more(batch)
            if batch:
                self._run(batch)
            # An idle thread must not keep its last batch alive: the batch function holds a
            # snapshot's searcher, which a swap expects to be freed.
            del batch

    def _take(self) -> list[_Item]:
        """This thread's share of the queue, of the oldest query's key (caller holds the lock).

        A share and not the whole queue: a thread that took everything would run one long batch
        while the others idle, and its last queries would wait the longest (measured: p99
        61.7-74.0 ms taking all against 47.2-54.7 ms with a share, concurrency 16, 2 threads).
        """
        share = min(self.max_batch, -(-len(self._queue) // max(1, self._target)))
        while self._queue and self._queue[0].future.done():  # the caller went away: nothing to search
            self._queue.popleft()
        return self._pop_key(self._queue[0].key, share) if self._queue else []

    def _pop_key(self, key: Hashable, limit: int) -> list[_Item]:
        """Up to `limit` queued queries of `key`, oldest first; the rest keep their order and
        callers that went away are dropped (caller holds the lock)."""
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        while self._queue and len(taken) < limit:
            item = self._queue.popleft()
            if not item.future.done():
                (taken if item.key == key else kept).append(item)
        kept.extend(self._queue)
        self._queue = kept
        return taken

    def _wait_for_more(self, batch: list[_Item]) -> None:
        """Hold a free thread up to ``max_wait`` for more queries of the batch's key (lock held)."""
        if not batch:
            return
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
            batch.extend(self._pop_key(batch[0].key, self.max_batch - len(batch)))
            if self._queue:  # the wake-up was for a query of another key: pass it on to a free thread
                self._cond.notify()

    def _run(self, batch: list[_Item]) -> None:
        results: Sequence[Any] | None = None
        error: BaseException | None = None
        try:
            if self.on_batch is not None:
                self.on_batch(len(batch))
            results = batch[0].fn([item.query for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} queries got {len(results)} results")
        except Exception as exc:  # every waiter gets the error; the thread lives on
            results, error = None, exc
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for n, item in enumerate(batch):
            by_loop.setdefault(item.loop, []).append((item.future, error if results is None else results[n]))
        for loop, outcomes in by_loop.items():
            _call_soon(loop, _deliver, outcomes, error is not None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is waiting any more
        log.debug("dropping results for a closed event loop")


def _deliver(outcomes: list[tuple[asyncio.Future, Any]], failed: bool) -> None:
    for future, value in outcomes:
        if future.done():
            continue
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
