"""Tail delivery on the last peer of a pushed step: replies kept for the client to collect.

Without it, the last peer's reply travels back along the whole chain (each peer nests it into its own).
With it, the last peer keeps its reply (with every hop's output, the `trail`) here, hands it to the
client's collect (`CollectRequest`, sent over the client's direct connection when it sent the step), and
only then answers the peer before it `DELIVERED` (docs/wire.md, "Tail delivery").

Event-loop only, and callback-based: a collect that waits is answered from `put` itself, before the step's
own reply leaves, so the client's answer is written first, without a task to wake in between (a task wake
cost ~0.1 ms in the chain here, docs/performance.md). Bounded: a session keeps only its latest reply, for
`ttl_s`, at most `max_entries` sessions and `max_bytes` in all, at most `max_waiting` collects wait at
once, each at most its `timeout`, and the connection that asked drops its own when it closes (`cancel`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from swarm.chain import Delivery
from swarm.protocol import CollectRequest, RequestRefused, error_to_wire
from swarm.wire import encode_message


class CollectRefused(RequestRefused):
    """A collect this peer cannot answer: not the session's client, a step that is gone, too many waiting."""


@dataclass
class _Kept:
    delivery: Delivery
    at: float  # time.monotonic() when it was kept


@dataclass(eq=False)
class Waiter:
    """A collect waiting for its reply; `cancel` it when its caller is gone."""

    request: CollectRequest
    caller: str
    reply: Callable[[bytes], None]
    timer: asyncio.TimerHandle | None = None


class Tails:
    def __init__(self, ttl_s: float = 60.0, max_entries: int = 4096, max_bytes: int = 256 * 2**20, max_waiting: int = 1024):
        self.ttl_s, self.max_entries, self.max_bytes, self.max_waiting = ttl_s, max_entries, max_bytes, max_waiting
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # session id -> its latest delivered reply, oldest first
        self._kept_bytes = 0
        self._waiting: dict[tuple[str, int], list[Waiter]] = {}
        self._num_waiting = 0
        self.delivered = 0  # replies kept (rpc_info: "tails_delivered")
        self.collected = 0  # replies handed to their client

    def put(self, delivery: Delivery) -> None:
        """Keep `delivery` (replacing the session's older one) and answer the collects waiting for it."""
        now = time.monotonic()
        old = self._kept.pop(delivery.session_id, None)
        self._kept_bytes += len(delivery.data) - (len(old.delivery.data) if old is not None else 0)
        self._kept[delivery.session_id] = _Kept(delivery, now)
        while len(self._kept) > 1 and (
            len(self._kept) > self.max_entries or self._kept_bytes > self.max_bytes
            or now - next(iter(self._kept.values())).at > self.ttl_s
        ):
            _, gone = self._kept.popitem(last=False)
            self._kept_bytes -= len(gone.delivery.data)
        self.delivered += 1
        for waiter in self._waiting.pop((delivery.session_id, delivery.step), ()):
            self._unwait(waiter)
            waiter.reply(self._answer(delivery, waiter))

    def collect(self, request: CollectRequest, caller: str, reply: Callable[[bytes], None]) -> Waiter | None:
        """Answer `reply(bytes)` with the reply kept for step `request.step` of the session (its client alone may
        have it) now, or once it arrives, or an error map after `request.timeout`. Returns the waiter to `cancel`
        if it has to wait, else None."""
        kept = self._kept.get(request.session_id)
        waiter = Waiter(request, caller, reply)
        if kept is not None and kept.delivery.step == request.step:
            reply(self._answer(kept.delivery, waiter))
            return None
        if kept is not None and kept.delivery.step > request.step:
            reply(_refused(f"step {request.step} of session {request.session_id} was followed by step "
                           f"{kept.delivery.step}: its reply is gone"))
            return None
        if self._num_waiting >= self.max_waiting:
            reply(_refused(f"{self._num_waiting} collects are waiting already; ask the chain instead"))
            return None
        waiter.timer = asyncio.get_running_loop().call_later(request.timeout, self._expire, waiter)
        self._waiting.setdefault((request.session_id, request.step), []).append(waiter)
        self._num_waiting += 1
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """Forget a waiting collect without answering it (its connection closed)."""
        waiters = self._waiting.get((waiter.request.session_id, waiter.request.step))
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[(waiter.request.session_id, waiter.request.step)]
            self._unwait(waiter)

    def _expire(self, waiter: Waiter) -> None:
        waiter.timer = None
        self.cancel(waiter)
        request = waiter.request
        waiter.reply(_refused(f"step {request.step} of session {request.session_id} did not arrive within "
                              f"{request.timeout:.1f} s"))

    def _unwait(self, waiter: Waiter) -> None:
        self._num_waiting -= 1
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None

    def _answer(self, delivery: Delivery, waiter: Waiter) -> bytes:
        if delivery.owner != waiter.caller:
            return _refused(f"session {waiter.request.session_id} does not belong to this caller")
        self.collected += 1
        return delivery.data


def _refused(message: str) -> bytes:
    return encode_message(error_to_wire(CollectRefused(message)))
