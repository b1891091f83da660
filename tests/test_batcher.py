"""The peer's compute queue: requests that queue up together run together; a lone one never waits."""

from __future__ import annotations

import asyncio
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
