"""The peer's compute queue: requests that queue up together run together; a lone one never waits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from peer.batcher import ComputeQueue


class Recorder:
    def __init__(self, first_sleep: float = 0.0):
        self.calls: list[list[bytes]] = []
        self.first_sleep = first_sleep

    def __call__(self, items, done=None):
        self.calls.append([data for data, _ in items])
        if len(self.calls) == 1 and self.first_sleep:
            time.sleep(self.first_sleep)
        return [data.upper() for data, _ in items]


def test_requests_queued_while_busy_run_as_one_batch():
    rec = Recorder(first_sleep=0.5)
    q = ComputeQueue(rec)

    async def main():
        first = asyncio.ensure_future(q.submit(b"a", "x"))
        await asyncio.sleep(0.1)  # the first one is running now; these queue behind it
        rest = [asyncio.ensure_future(q.submit(d, "x")) for d in (b"b", b"c", b"d")]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    q.stop()
    assert first == b"A" and rest == [b"B", b"C", b"D"]
    assert rec.calls == [[b"a"], [b"b", b"c", b"d"]]


def test_waits_for_active_sessions_within_the_bound_but_a_lone_request_does_not():
    rec = Recorder(first_sleep=1.0)  # one batch takes ~1 s: the wait may last up to that
    expected = {"n": 1}
    q = ComputeQueue(rec, expect=lambda: expected["n"], max_wait_s=5.0)

    async def main():
        await q.submit(b"warm", "x")  # measures the batch time
        expected["n"] = 3
        a = asyncio.ensure_future(q.submit(b"a", "x"))
        await asyncio.sleep(0.2)
        b = asyncio.ensure_future(q.submit(b"b", "x"))
        await asyncio.sleep(0.2)
        c = asyncio.ensure_future(q.submit(b"c", "x"))
        await asyncio.gather(a, b, c)
        expected["n"] = 1
        t0 = time.monotonic()
        await q.submit(b"alone", "x")
        return time.monotonic() - t0

    alone_s = asyncio.run(main())
    q.stop()
    assert rec.calls == [[b"warm"], [b"a", b"b", b"c"], [b"alone"]]
    assert alone_s < 0.5  # no waiting for sessions that are not there


def test_a_failing_batch_fails_its_requests_and_the_queue_goes_on():
    def run_many(items, done=None):
        if any(data == b"boom" for data, _ in items):
            raise RuntimeError("bug")
        return [data for data, _ in items]

    q = ComputeQueue(run_many)

    async def main():
        with pytest.raises(RuntimeError, match="bug"):
            await q.submit(b"boom", "x")
        return await q.submit(b"fine", "x")

    assert asyncio.run(main()) == b"fine"
    q.stop()


def test_each_reply_goes_out_as_soon_as_it_is_ready():
    """Requests taken together but run one by one (e.g. pipelined micro-batches) are answered one by one:
    the first reply does not wait for the requests after it (the next peer of the route can start on it)."""
    def run_many(items, done):
        done(0, b"first")
        time.sleep(1.0)
        done(1, b"second")
        return [b"first", b"second"]

    gate = Recorder(first_sleep=0.3)
    q = ComputeQueue(lambda items, done=None: gate(items) if items[0][0] == b"hold" else run_many(items, done))

    async def main():
        hold = asyncio.ensure_future(q.submit(b"hold", "x"))  # keeps the thread busy while the two queue up
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        a = asyncio.ensure_future(q.submit(b"a", "x"))
        b = asyncio.ensure_future(q.submit(b"b", "x"))
        first = await a
        first_s = time.monotonic() - t0
        await asyncio.gather(hold, b)
        return first, first_s, b.result()

    first, first_s, second = asyncio.run(main())
    q.stop()
    assert (first, second) == (b"first", b"second")
    assert first_s < 0.9  # ~0.3 s (the held batch), not ~1.3 s (after the second request ran)


class ThreadRecorder:
    """Which thread ran each call; `seconds` of work per call."""

    def __init__(self, seconds: float = 0.001):
        self.threads: list[str] = []
        self.seconds = seconds

    def __call__(self, items, done=None):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return [data.upper() for data, _ in items]


def test_a_lone_quick_step_runs_on_the_event_loop_thread():
    rec = ThreadRecorder()
    q = ComputeQueue(rec, expect=lambda: 1, max_wait_s=0.05, inline_max_s=0.5)

    async def main():
        return [await q.submit(d, "x") for d in (b"first", b"second", b"third")]

    assert asyncio.run(main()) == [b"FIRST", b"SECOND", b"THIRD"]
    q.stop()
    # the first step has no timing to go by: the compute thread; then the caller's own thread
    assert rec.threads == ["swarm-compute", "MainThread", "MainThread"]
    assert q.inline == 2 and q.batches == 3 and q.requests == 3


@pytest.mark.parametrize("case", ["several sessions", "disabled", "too long", "queue busy"])
def test_steps_that_may_wait_merge_or_take_long_go_to_the_compute_thread(case):
    rec = ThreadRecorder(seconds=0.01)
    sessions = {"n": 1}
    q = ComputeQueue(rec, expect=lambda: sessions["n"], inline_max_s=0.0 if case == "disabled" else 0.5)

    async def main():
        await q.submit(b"warm", "x")  # ~10 ms for 4 bytes
        if case == "several sessions":
            sessions["n"] = 2
            await q.submit(b"next", "x")
        elif case in ("disabled", "queue busy"):
            if case == "queue busy":  # a request is waiting for the compute thread: the next one queues behind it
                rec.seconds = 0.3
                first = asyncio.ensure_future(q.submit(b"a" * 1000, "x"))  # estimated 2.5 s: the compute thread
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(q.submit(b"b" * 1000, "x"))
                await asyncio.sleep(0.05)
                rec.seconds = 0.01
                assert await q.submit(b"next", "x") == b"NEXT"  # queued behind `second`, which queued behind `first`
                await asyncio.gather(first, second)
            else:
                await q.submit(b"next", "x")
        else:
            await q.submit(b"x" * 400, "x")  # estimated ~1 s from the rate of the first: more than 0.5 s

    asyncio.run(main())
    q.stop()
    assert q.inline == 0
    assert set(rec.threads) == {"swarm-compute"}
