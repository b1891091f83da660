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

    def __call__(self, items):
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
    def run_many(items):
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
