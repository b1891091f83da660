"""The peer's compute thread: requests that queue up while it is busy are taken together.

Compute runs on one thread (torch already uses every core it is given, and a session's steps must run
in order). Whatever arrived while the previous batch ran is handed to the handler in one call, which
merges the decode steps of different sessions into one forward (`peer.merge`). There is no waiting
for more requests: a lone request starts at once, so a single session's latency is not traded away;
batches form by themselves as soon as requests arrive faster than the peer computes them.

While several sessions are active (`expect`), a request may wait a little for the others' steps:
at most `max_wait_s` after it arrived, and never longer than one batch takes to compute (a moving
average), so waiting can at worst double a step's time, and a lone session never waits.

A lone session's step does not even change threads: when nothing is queued or running, at most one
session is active, and the step should take little time (`inline_max_s`; estimated from its size and
the seconds per request byte that batches took lately), the event loop runs the step itself. Handing a
request to the compute thread and its reply back costs two thread wake-ups per step (~0.1-0.2 ms on a
busy 2-core machine, docs/performance.md), a real share of a small model's decode step, and a lone step
has nothing to wait for or merge with. The loop is blocked meanwhile, which costs nothing here: the
compute thread would be busy with the same step, and what arrives in the meantime waits in the sockets'
buffers for a few milliseconds at most. Long batches (prefills, large models) always go to the compute
thread, so the loop keeps answering while they run.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

_STOP = object()


class ComputeQueue:
    """`await submit(data, owner)` from the event loop; one thread runs `run_many` on what has queued up."""

    def __init__(
        self,
        run_many: Callable[..., list[bytes]],  # (items, done(k, reply)) -> replies
        max_items: int = 64,
        expect: Callable[[], int] | None = None,
        max_wait_s: float = 0.0,
        inline_max_s: float = 0.05,
    ):
        self.run_many = run_many
        self.max_items = max_items
        self.expect = expect  # how many requests are likely to come (sessions active lately)
        self.max_wait_s = max_wait_s  # wait at most this long (and at most one batch's time) for them
        self.inline_max_s = inline_max_s  # a lone step expected to take less runs on the event loop (0: never)
        self._batch_s = 0.0  # moving average of a batch's compute time
        self._rate = 0.0  # moving average of a batch's compute seconds per request byte
        self._busy = threading.Lock()  # held while a batch runs, on the compute thread or inline
        self.inline = 0  # requests run on the event loop's thread
        self.batches = 0  # calls of run_many
        self.requests = 0  # requests they carried
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="swarm-compute", daemon=True)
        self._thread.start()

    async def submit(self, data: bytes, owner: str) -> bytes:
        if self._inline_ok(len(data)) and self._busy.acquire(blocking=False):
            try:
                return self._run_inline(data, owner)
            finally:
                self._busy.release()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((data, owner, future, loop, time.monotonic()))
        return await future

    def _inline_ok(self, size: int) -> bool:
        """Whether a step may run on the caller's thread: nothing else to run or merge with, and quick."""
        if not 0 < self._rate * size <= self.inline_max_s or not self._queue.empty():
            return False
        return self.expect is None or self.expect() <= 1

    def _run_inline(self, data: bytes, owner: str) -> bytes:
        t0 = time.monotonic()
        try:
            reply = self.run_many([(data, owner)], None)[0]  # the handler answers errors itself
        except BaseException:  # a bug guard, as on the compute thread: the caller gets the error
            logger.exception("compute step failed")
            raise
        self._timed(time.monotonic() - t0, len(data))
        self.batches += 1
        self.requests += 1
        self.inline += 1
        return reply

    def _timed(self, took: float, size: int) -> None:
        self._batch_s = 0.8 * self._batch_s + 0.2 * took if self._batch_s else took
        rate = took / max(size, 1)  # up at once, down slowly: a run of quick errors does not make a long step look short
        self._rate = max(rate, 0.8 * self._rate + 0.2 * rate)

    def stop(self) -> None:
        """Let the thread end after the batch it runs (queued requests are answered with an error)."""
        self._queue.put(_STOP)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            items = [item]
            stop = False
            want = min(self.max_items, self.expect()) if self.expect is not None and self.max_wait_s > 0 else 1
            deadline = item[4] + min(self.max_wait_s, self._batch_s)
            while len(items) < self.max_items:
                try:
                    if len(items) < want and (left := deadline - time.monotonic()) > 0:
                        more = self._queue.get(timeout=left)
                    else:
                        more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                items.append(more)
            with self._busy:
                t0 = time.monotonic()
                self._run(items)
                self._timed(time.monotonic() - t0, sum(len(it[0]) for it in items))
            if stop:
                break
        self._fail_queued()

    def _run(self, items: list) -> None:
        live = [it for it in items if not it[2].cancelled()]
        if not live:
            return
        self.batches += 1
        self.requests += len(live)
        def done(k: int, reply: bytes) -> None:  # each reply goes out as soon as it is ready
            _, _, future, loop, _ = live[k]
            _call_soon(loop, _set_result, future, reply)

        try:
            replies = self.run_many([(data, owner) for data, owner, _, _, _ in live], done)
        except BaseException as exc:  # noqa: BLE001 - the handler answers errors itself; this is a bug guard
            logger.exception("compute batch failed")
            for _, _, future, loop, _ in live:
                _call_soon(loop, _set_exception, future, exc)
            return
        for (_, _, future, loop, _), reply in zip(live, replies):
            _call_soon(loop, _set_result, future, reply)  # no-op for those `done` answered

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                _, _, future, loop, _ = item
                _call_soon(loop, _set_exception, future, RuntimeError("the peer is shutting down"))


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: nobody waits for this reply any more
        pass
