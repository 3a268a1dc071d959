"""MicroBatcher: concurrent queries with equal keys share one call on search threads that pull their share."""

import asyncio
import threading
import time
import weakref

import pytest

from corpusforge.serve.batcher import BatcherClosed, MicroBatcher


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
    """Run `coro_fn(batcher)` on a fresh event loop with a batcher of `threads` search threads."""
    async def main():
        batcher = MicroBatcher(threads, **kwargs)
        try:
            return await coro_fn(batcher)
        finally:
            batcher.close()
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


def _search_threads(name: str) -> int:
    return sum(t.name.startswith(name + "-") for t in threading.enumerate())


def test_resize_grows_and_shrinks_the_search_threads():
    fn = Recorder()

    async def held_round(batcher, n):
        fn.gate.clear()
        fn.max_running = 0
        futures = [asyncio.ensure_future(batcher.submit(i, fn, f"q{i}")) for i in range(n)]  # all keys differ
        await asyncio.sleep(0.1)
        fn.gate.set()
        return await asyncio.gather(*futures)

    async def scenario(batcher):
        await held_round(batcher, 4)
        one = fn.max_running
        batcher.resize(3)
        await held_round(batcher, 4)
        three = fn.max_running
        batcher.resize(1)
        await held_round(batcher, 4)
        return one, three, fn.max_running

    assert run(scenario, threads=1, name="cf-resize") == (1, 3, 1)
    deadline = time.monotonic() + 5
    while _search_threads("cf-resize") and time.monotonic() < deadline:  # closed: every thread exits
        time.sleep(0.01)
    assert _search_threads("cf-resize") == 0
    with pytest.raises(ValueError):
        MicroBatcher(0)


def test_close_fails_queued_queries_and_refuses_new_ones():
    fn = Recorder()

    async def scenario(batcher):
        fn.gate.clear()
        running = asyncio.ensure_future(batcher.submit("k", fn, "running"))
        while not fn.calls:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit("k", fn, "queued"))
        await asyncio.sleep(0.01)
        batcher.close()
        fn.gate.set()
        out = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(BatcherClosed):
            await batcher.submit("k", fn, "late")
        return out

    running, queued = run(scenario, threads=1)
    assert running == "RUNNING"  # a batch already running finishes
    assert isinstance(queued, BatcherClosed)
    assert fn.calls == [["running"]]


def test_thread_init_runs_on_every_search_thread_before_its_first_batch():
    local, inits = threading.local(), []

    def init():
        local.ready = True
        inits.append(threading.current_thread().name)

    def fn(queries):
        return [getattr(local, "ready", False) for _ in queries]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(i, fn, "q") for i in range(6)))

    assert run(scenario, threads=2, thread_init=init, name="cf-init") == [True] * 6
    assert sorted(inits) == ["cf-init-1", "cf-init-2"]


def test_a_function_returning_the_wrong_number_of_results_fails_its_batch():
    async def scenario(batcher):
        return await asyncio.gather(batcher.submit("k", lambda qs: [], "q"), return_exceptions=True)

    [error] = run(scenario)
    assert isinstance(error, RuntimeError) and "got 0 results" in str(error)


def test_an_idle_search_thread_keeps_no_reference_to_its_last_batch():
    class Search:
        def __call__(self, queries):
            return queries

    async def scenario(batcher):
        fn = Search()
        ref = weakref.ref(fn)
        assert await batcher.submit("k", fn, "q") == "q"
        del fn
        for _ in range(200):  # the thread drops its batch once it is back waiting for work
            if ref() is None:
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(scenario)


def test_a_thread_waiting_for_more_of_its_key_passes_on_a_wake_up_for_another_key():
    fn = Recorder()

    async def scenario(batcher):
        # max_wait 0.5 s. Thread 1 gathers "a" during [0, 0.5] and is idle after; thread 2
        # gathers "c" during [0.4, 0.9]. At 0.6 "b" arrives and its wake-up goes to the first
        # waiter, thread 2, which has no use for it: it must wake the idle thread 1.
        a = asyncio.ensure_future(batcher.submit("a", fn, "a"))
        await asyncio.sleep(0.4)
        c = asyncio.ensure_future(batcher.submit("c", fn, "c"))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        b = await batcher.submit("b", fn, "b")
        took = time.monotonic() - t0
        return await a, b, await c, took

    a, b, c, took = run(scenario, threads=2, max_wait_ms=500.0)
    assert (a, b, c) == ("A", "B", "C")
    assert took < 0.7, took  # its own 0.5 s window; ~0.8 s if it waited for thread 2's window to end
