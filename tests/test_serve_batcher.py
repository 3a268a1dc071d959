"""MicroBatcher: concurrent queries with equal keys share one call, fairly spread over the threads."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from corpusforge.serve.batcher import MicroBatcher


class Recorder:
    """A batch function that records its calls, can be held at a gate, and tracks concurrency."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on
        self._lock = threading.Lock()
        self.running = self.max_running = 0

    def __call__(self, queries: list[str]) -> list[str]:
        with self._lock:
            self.calls.append(list(queries))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.gate.wait(10)
            time.sleep(0.01)
            if self.fail_on in queries:
                raise ValueError(f"bad query {self.fail_on}")
            return [q.upper() for q in queries]
        finally:
            with self._lock:
                self.running -= 1


def run(coro_fn, threads: int = 1, **kwargs):
    """Run `coro_fn(batcher, pool)` on a fresh event loop with a pool of `threads`."""
    async def main():
        with ThreadPoolExecutor(threads) as pool:
            batcher = MicroBatcher(lambda: pool, lambda: threads, **kwargs)
            try:
                return await coro_fn(batcher)
            finally:
                await batcher.close()
    return asyncio.run(main())


async def _held_then_released(batcher, fn, key_of, queries):
    """Submit one query while the function is held, queue the rest, then release the gate."""
    fn.gate.clear()
    first = asyncio.ensure_future(batcher.submit(key_of(queries[0]), fn, queries[0]))
    while not fn.calls:  # the first query is running (held): the rest must queue
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(batcher.submit(key_of(q), fn, q)) for q in queries[1:]]
    await asyncio.sleep(0.02)
    fn.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_queued_queries_share_calls_and_get_their_own_results():
    fn = Recorder()
    queries = [f"q{i}" for i in range(7)]
    out = run(lambda b: _held_then_released(b, fn, lambda q: "k", queries), threads=1)
    assert out == [q.upper() for q in queries]
    assert fn.calls == [["q0"], queries[1:]]  # one thread: it takes the whole queue


def test_different_keys_never_share_a_call():
    fn = Recorder()
    queries = [f"q{i}" for i in range(6)]
    out = run(lambda b: _held_then_released(b, fn, lambda q: int(q[1:]) % 2, queries), threads=1)
    assert out == [q.upper() for q in queries]
    for call in fn.calls:
        assert len({int(q[1:]) % 2 for q in call}) == 1
    assert sorted(q for call in fn.calls for q in call) == queries


def test_max_batch_caps_a_call():
    fn = Recorder()
    queries = [f"q{i}" for i in range(8)]
    run(lambda b: _held_then_released(b, fn, lambda q: "k", queries), threads=1, max_batch=3)
    assert [len(c) for c in fn.calls] == [1, 3, 3, 1]


def test_a_thread_takes_its_share_of_the_queue_and_calls_never_exceed_the_threads():
    fn = Recorder()
    queries = [f"q{i}" for i in range(9)]

    async def scenario(batcher):
        fn.gate.clear()
        first = [asyncio.ensure_future(batcher.submit("k", fn, q)) for q in queries[:2]]
        while len(fn.calls) < 2:  # both threads busy (held)
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(batcher.submit("k", fn, q)) for q in queries[2:]]
        await asyncio.sleep(0.02)
        fn.gate.set()
        return await asyncio.gather(*first, *rest)

    out = run(scenario, threads=2)
    assert out == [q.upper() for q in queries]
    assert fn.max_running == 2
    # 7 queued over 2 threads: the first thread to free up takes ceil(7/2) = 4, not all 7
    assert [len(c) for c in fn.calls[:3]] == [1, 1, 4]
    assert sorted(q for c in fn.calls for q in c) == sorted(queries)


def test_an_error_fails_its_batch_only_and_the_batcher_keeps_serving():
    fn = Recorder(fail_on="bad")

    async def scenario(batcher):
        out = await _held_then_released(batcher, fn, lambda q: q == "other", ["q0", "bad", "q2", "other"])
        after = await batcher.submit("k", fn, "later")
        return out, after

    out, after = run(scenario, threads=1)
    assert out[0] == "Q0" and out[3] == "OTHER"
    assert isinstance(out[1], ValueError) and isinstance(out[2], ValueError)  # same batch as "bad"
    assert after == "LATER"


def test_a_caller_that_went_away_is_not_searched():
    fn = Recorder()

    async def scenario(batcher):
        fn.gate.clear()
        first = asyncio.ensure_future(batcher.submit("k", fn, "q0"))
        while not fn.calls:
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(batcher.submit("k", fn, "gone"))
        kept = asyncio.ensure_future(batcher.submit("k", fn, "kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        fn.gate.set()
        return await asyncio.gather(first, kept)

    assert run(scenario, threads=1) == ["Q0", "KEPT"]
    assert fn.calls == [["q0"], ["kept"]]


@pytest.mark.parametrize("wait_ms, expected", [(0.0, [["a"], ["b"]]), (200.0, [["a", "b"]])])
def test_max_wait_gathers_queries_that_arrive_soon_after(wait_ms, expected):
    fn = Recorder()

    async def scenario(batcher):
        a = asyncio.ensure_future(batcher.submit("k", fn, "a"))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(batcher.submit("k", fn, "b"))
        return await asyncio.gather(a, b)

    assert run(scenario, threads=1, max_wait_ms=wait_ms) == ["A", "B"]
    assert fn.calls == expected
