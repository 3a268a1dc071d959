"""Micro-batching of concurrent searches.

Each request awaits `MicroBatcher.submit(key, fn, query)`. One dispatcher task waits for a free
search thread, takes that thread's share of the queued queries (the queue divided by the thread
count, at most ``max_batch``), groups them by key (one snapshot, mode, k, filters, ACL... per
group) and runs each group as one ``fn(queries)`` call on the search pool: one tokenizer call,
one index call per candidate depth and one hit materialisation for the whole group, instead of
one of each per request. While all threads are busy, queries queue up and form the next batch,
so under load batches grow by themselves, and at low load a query is dispatched at once (or
after ``max_wait_ms``, when set).

Why whole searches rather than just the encoder call: on a CPU the int8 query encoder runs one
text per call anyway (see `onnx_query`), and what a batch saves there is the Python around each
search -- thread hand-offs, futures, argument checks, index wrappers -- which holds the GIL that
the other search threads and the event loop need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from typing import Any

BatchFn = Callable[[list[str]], Sequence[Any]]


class MicroBatcher:
    """Groups concurrent queries with equal keys into batched calls on a thread pool.

    Args:
        executor: returns the pool to run batches on (it may be replaced while serving).
        slots: returns how many batches may run at once (the pool's thread count).
        max_batch: the most queries per call.
        max_wait_ms: how long to wait for more queries once a thread is free (0: take only
            what is already queued).
        on_batch: called with each batch size (for metrics).
    """

    def __init__(self, executor: Callable[[], Executor], slots: Callable[[], int], max_batch: int = 32,
                 max_wait_ms: float = 0.0, on_batch: Callable[[int], None] | None = None) -> None:
        self.executor, self.slots = executor, slots
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._running = 0
        self._freed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, key: Hashable, fn: BatchFn, query: str) -> Any:
        """Run one query, batched with concurrent queries of the same key.

        Args:
            key: what makes queries batchable together; queries with equal keys must be
                answerable by one ``fn`` call (the first query's ``fn`` runs the group).
            fn: ``queries -> results`` in order, run on the pool; an exception fails every
                query of its batch.
            query: the query.

        Returns:
            This query's result.
        """
        if self._worker is None or self._worker.done():
            self._queue, self._freed = asyncio.Queue(), asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._dispatch())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((key, fn, query, fut))
        return await fut

    async def close(self) -> None:
        """Stop dispatching (batches already running finish)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _free_slot(self) -> None:
        while self._running >= max(1, self.slots()):
            self._freed.clear()
            await self._freed.wait()
        self._running += 1

    async def _gather(self) -> list[tuple[Hashable, BatchFn, str, asyncio.Future]]:
        q = self._queue
        batch = [await q.get()]
        # This thread's share of the queue, not all of it: a thread that took everything would
        # run one long batch while the others idle, and its last queries would wait the longest.
        share = min(self.max_batch, -(-(q.qsize() + 1) // max(1, self.slots())))
        while len(batch) < share and not q.empty():
            batch.append(q.get_nowait())
        if self.max_wait > 0 and len(batch) < self.max_batch:
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), remaining))
                except asyncio.TimeoutError:
                    break
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free_slot()
            try:
                batch = await self._gather()
            except BaseException:
                self._running -= 1
                raise
            groups: dict[Hashable, tuple[BatchFn, list[tuple[str, asyncio.Future]]]] = {}
            for key, fn, query, fut in batch:
                if not fut.done():  # a caller that went away needs no search
                    groups.setdefault(key, (fn, []))[1].append((query, fut))
            if not groups:
                self._release()
                continue
            for n, (fn, items) in enumerate(groups.values()):
                if n:
                    await self._free_slot()
                task = loop.create_task(self._run(fn, items))
                self._tasks.add(task)  # a reference, so the task is not collected mid-flight
                task.add_done_callback(self._tasks.discard)

    def _release(self) -> None:
        self._running -= 1
        self._freed.set()

    async def _run(self, fn: BatchFn, items: list[tuple[str, asyncio.Future]]) -> None:
        try:
            if self.on_batch:
                self.on_batch(len(items))
            results = await asyncio.get_running_loop().run_in_executor(self.executor(), fn, [q for q, _ in items])
        except Exception as exc:  # every waiter gets the error; the dispatcher lives on
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(items, results):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._release()
