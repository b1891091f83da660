"""The peer's compute thread: requests that queue up while it is busy are taken together.

Compute runs on one thread (torch already uses every core it is given, and a session's steps must run
in order). Whatever arrived while the previous batch ran is handed to the handler in one call, which
merges the decode steps of different sessions into one forward (`peer.merge`). There is no waiting
for more requests: a lone request starts at once, so a single session's latency is not traded away;
batches form by themselves as soon as requests arrive faster than the peer computes them.

While several sessions are active (`expect`), a request may wait a little for the others' steps:
at most `max_wait_s` after it arrived, and never longer than one batch takes to compute (a moving
average), so waiting can at worst double a step's time, and a lone session never waits.
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
    ):
        self.run_many = run_many
        self.max_items = max_items
        self.expect = expect  # how many requests are likely to come (sessions active lately)
        self.max_wait_s = max_wait_s  # wait at most this long (and at most one batch's time) for them
        self._batch_s = 0.0  # moving average of a batch's compute time
        self.batches = 0  # calls of run_many
        self.requests = 0  # requests they carried
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="swarm-compute", daemon=True)
        self._thread.start()

    async def submit(self, data: bytes, owner: str) -> bytes:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((data, owner, future, loop, time.monotonic()))
        return await future

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
            t0 = time.monotonic()
            self._run(items)
            took = time.monotonic() - t0
            self._batch_s = 0.8 * self._batch_s + 0.2 * took if self._batch_s else took
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
