"""Tail delivery on the last peer of a pushed step: replies kept for the client to collect.

Without it, the last peer's reply travels back along the whole chain (each peer nests it into its own),
so every extra hop costs a second transfer and a second wake-up of a peer. With it, the last peer keeps
its reply (with every hop's output, the `trail`) here, answers the peer before it `DELIVERED`, and the
client, which asked for it when it sent the step (`CollectRequest`, over its direct connection), gets it
straight from here (docs/wire.md, "Tail delivery").

Event-loop only: `put` is called by the peer's step handler once the reply is ready, `collect` by the
direct connection's COLLECT frames. Bounded: a session keeps only its latest reply, for `ttl_s`, at most
`max_entries` sessions, and at most `max_waiting` collects wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from swarm.aio import within
from swarm.chain import Delivery
from swarm.protocol import CollectRequest, RequestRefused, error_to_wire
from swarm.wire import encode_message


class CollectRefused(RequestRefused):
    """A collect this peer cannot answer: not the session's client, a step that is gone, too many waiting."""


@dataclass
class _Kept:
    delivery: Delivery
    at: float  # time.monotonic() when it was kept


class Tails:
    def __init__(self, ttl_s: float = 60.0, max_entries: int = 4096, max_waiting: int = 1024):
        self.ttl_s, self.max_entries, self.max_waiting = ttl_s, max_entries, max_waiting
        self._kept: OrderedDict[str, _Kept] = OrderedDict()  # session id -> its latest delivered reply
        self._waiting: dict[tuple[str, int], list[asyncio.Future]] = {}
        self._num_waiting = 0
        self.delivered = 0  # replies kept (rpc_info: "tails_delivered")
        self.collected = 0  # replies handed to their client

    def put(self, delivery: Delivery) -> None:
        """Keep `delivery` (replacing the session's older one) and hand it to a collect waiting for it."""
        now = time.monotonic()
        self._kept.pop(delivery.session_id, None)
        self._kept[delivery.session_id] = _Kept(delivery, now)
        while self._kept and (len(self._kept) > self.max_entries or now - next(iter(self._kept.values())).at > self.ttl_s):
            self._kept.popitem(last=False)
        self.delivered += 1
        for future in self._waiting.pop((delivery.session_id, delivery.step), ()):
            if not future.done():
                future.set_result(delivery)

    async def collect(self, request: CollectRequest, caller: str) -> bytes:
        """The reply kept for step `request.step` of the session, for its client alone; waits for it to arrive
        (at most `request.timeout`). An error map when it cannot be had."""
        try:
            delivery = await self._wait(request)
            if delivery.owner != caller:
                raise CollectRefused(f"session {request.session_id} does not belong to this caller")
        except (CollectRefused, asyncio.TimeoutError, TimeoutError) as exc:
            if not isinstance(exc, CollectRefused):
                exc = CollectRefused(f"step {request.step} of session {request.session_id} did not arrive within "
                                     f"{request.timeout:.1f} s")
            return encode_message(error_to_wire(exc))
        self.collected += 1
        return delivery.data

    async def _wait(self, request: CollectRequest) -> Delivery:
        kept = self._kept.get(request.session_id)
        if kept is not None and kept.delivery.step == request.step:
            return kept.delivery
        if kept is not None and kept.delivery.step > request.step:
            raise CollectRefused(f"step {request.step} of session {request.session_id} was followed by step "
                                 f"{kept.delivery.step}: its reply is gone")
        if self._num_waiting >= self.max_waiting:
            raise CollectRefused(f"{self._num_waiting} collects are waiting already; ask the chain instead")
        future = asyncio.get_running_loop().create_future()
        key = (request.session_id, request.step)
        self._waiting.setdefault(key, []).append(future)
        self._num_waiting += 1
        try:
            return await within(future, request.timeout)
        finally:
            self._num_waiting -= 1
            waiters = self._waiting.get(key)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiting[key]
