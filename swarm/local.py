"""In-process peers: the whole swarm inside one Python process, for tests and the split demo.

Every call still crosses the full wire codec and the peer's request validation (bytes in, bytes
out), so what passes here exercises the same contract as the network. Pushed steps are forwarded
from peer to peer here too, with the same `swarm.chain` logic libp2p peers use (`peer.forward`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from swarm.chain import Delivery, Forward, ForwardFailed
from swarm.protocol import DELIVERED, CollectRequest, RequestRefused, error_to_wire
from swarm.router import SwarmRouter
from swarm.routing import Span
from swarm.wire import encode_message


@dataclass
class LocalPeer:
    peer_id: str
    start: int
    end: int
    handler: object  # peer.handler.StepHandler (typed loosely: swarm must not import peer)


CLIENT = "local"  # the caller id in-process peers see for the client (peers see each other by their peer ids)


class LocalTransport:
    """Calls in-process peers' handlers directly. A peer forwards a pushed step as itself (the next peer sees
    its peer id as the caller, as over libp2p), through `forward_via(peer, request, sender)` if given (a test's
    transport that fails on cue), else directly."""

    def __init__(self, peers: list[LocalPeer], forward_via: Callable[[str, bytes, str], bytes] | None = None,
                 tail_delivery: bool = True):
        self.peers = {p.peer_id: p for p in peers}
        self.forward_via = forward_via
        self.tail_delivery = tail_delivery
        self.kept: dict[tuple[str, str], Delivery] = {}  # (peer id, session id) -> the last hop's reply, to collect

    def step(self, peer_id: str, request: bytes, timeout: float | None = None) -> bytes:
        return self.call(peer_id, request, CLIENT)

    def call(self, peer_id: str, request: bytes, caller: str) -> bytes:
        """`request` to `peer_id` as sent by `caller`, and on along the route if it is a pushed step."""
        plan = self.peers[peer_id].handler.step(request, caller)
        if isinstance(plan, Delivery):  # as `peer.tails` keeps it on a libp2p peer
            self.kept[(peer_id, plan.session_id)] = plan
            return DELIVERED
        if not isinstance(plan, Forward):
            return plan
        if plan.error is not None:
            return plan.reply(failure=plan.error)
        try:
            if self.forward_via is not None:
                then = self.forward_via(plan.peer, plan.request, peer_id)
            else:
                then = self.call(plan.peer, plan.request, peer_id)
        except Exception as exc:  # noqa: BLE001 - as a libp2p peer does: the failure goes back to the client
            return plan.reply(failure=ForwardFailed(f"could not forward the step to peer {plan.peer}: {type(exc).__name__}: {exc}"))
        return plan.reply(then=then)

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        self.peers[peer_id].handler.close_session(session_id, CLIENT)

    def collects(self, first: str, last: str) -> bool:
        return self.tail_delivery

    def push(self, first: str, request: bytes, last: str, collect: CollectRequest, timeout: float) -> "_Pushed":
        """Tail delivery in-process: the chain runs to its end, then the last peer's kept reply is collected."""
        chain = self.call(first, request, CLIENT)
        kept = self.kept.get((last, collect.session_id))
        if kept is not None and kept.step == collect.step and kept.owner == CLIENT:
            return _Pushed(chain, kept.data)
        missing = RequestRefused(f"step {collect.step} of session {collect.session_id} was not delivered here")
        return _Pushed(chain, None if chain != DELIVERED else encode_message(error_to_wire(missing)))


class _Pushed:
    """`swarm.direct.PushedStep`'s interface over replies already there."""

    def __init__(self, chain: bytes, tail: bytes | None):  # tail: None when the collect got no answer
        self._chain, self._tail = chain, tail

    def first(self, skip_chain: bytes | None = None) -> tuple[str, bytes]:
        if self._tail is not None:
            return "tail", self._tail
        if self._chain == skip_chain:  # the chain says delivered, but the collect got nothing: it would time out
            raise TimeoutError("the last peer's reply was not collected in time")
        return "chain", self._chain

    def chain(self) -> bytes:
        return self._chain


def local_router(peers: list[LocalPeer], num_blocks: int, seed: int | None = None,
                 microbatches: int | None = None, push: bool = True, transport=None, **router_kwargs) -> SwarmRouter:
    spans = [Span(p.peer_id, p.start, p.end) for p in peers]
    return SwarmRouter(num_blocks, lambda: spans, transport or LocalTransport(peers), rng=random.Random(seed),
                       microbatches=microbatches, push=push, **router_kwargs)
