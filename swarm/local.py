"""In-process peers: the whole swarm inside one Python process, for tests and the split demo.

Every call still crosses the full wire codec and the peer's request validation (bytes in, bytes
out), so what passes here exercises the same contract as the network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from swarm.router import SwarmRouter
from swarm.routing import Span


@dataclass
class LocalPeer:
    peer_id: str
    start: int
    end: int
    handler: object  # peer.handler.StepHandler (typed loosely: swarm must not import peer)


class LocalTransport:
    def __init__(self, peers: list[LocalPeer]):
        self.peers = {p.peer_id: p for p in peers}

    def step(self, peer_id: str, request: bytes) -> bytes:
        return self.peers[peer_id].handler.step(request)

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        self.peers[peer_id].handler.close_session(session_id)


def local_router(peers: list[LocalPeer], num_blocks: int, seed: int | None = None,
                 microbatches: int | None = None, transport=None, **router_kwargs) -> SwarmRouter:
    spans = [Span(p.peer_id, p.start, p.end) for p in peers]
    return SwarmRouter(num_blocks, lambda: spans, transport or LocalTransport(peers), rng=random.Random(seed),
                       microbatches=microbatches, **router_kwargs)
