"""Sends one forward pass along a route of peers. Transport-agnostic: bytes go out, bytes come back.

`SwarmRouter` turns the stubs' recorded layer calls into one `StepRequest` per hop, each with only
its own layers' arguments (deduplicated: layers that received the same objects share a row), and
chains the hops. In-process peers (tests, `make demo`) and hivemind RPC peers differ only in the
`Transport` they plug in, so the exact same codec and validation run in both.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol

import torch

from swarm.protocol import StepRequest, StepResponse, raise_if_error
from swarm.remote import ClientSession
from swarm.routing import Hop, Span, choose_route
from swarm.wire import decode_message, encode_message


class Transport(Protocol):
    def step(self, peer_id: str, request: bytes) -> bytes: ...

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None: ...


def build_step(
    hop: Hop,
    hidden: torch.Tensor,
    layer_calls: list[tuple[tuple, dict]],
    session: ClientSession | None,
    cache_ops: list,
    attn_implementation: str | None,
) -> StepRequest:
    """One hop's request: the arguments of layers ``[hop.start, hop.end)``, each distinct set sent once."""
    rows: dict[tuple, int] = {}
    calls: list[tuple[tuple, dict]] = []
    index: list[int] = []
    for args, kwargs in layer_calls[hop.start : hop.end]:
        key = (tuple(map(id, args)), tuple((k, id(v)) for k, v in kwargs.items()))
        row = rows.get(key)
        if row is None:
            row = rows[key] = len(calls)
            calls.append((args, kwargs))
        index.append(row)
    return StepRequest(
        start=hop.start,
        end=hop.end,
        hidden=hidden,
        calls=calls,
        layer_calls=index,
        session_id=session.session_id if session else None,
        new_session=session is not None and hop.peer_id not in session.opened_on,
        cache_class=session.cache_class if session else None,
        cache_ops=list(cache_ops),
        attn_implementation=attn_implementation,
        max_length=session.max_length if session else None,
    )


class SwarmRouter:
    """Chooses routes from the spans peers offer and runs steps over a transport."""

    def __init__(
        self,
        num_blocks: int,
        spans: Callable[[], list[Span]],
        transport: Transport,
        rng: random.Random | None = None,
    ):
        self.num_blocks = num_blocks
        self.spans = spans
        self.transport = transport
        self.rng = rng or random.Random()

    def route(self) -> list[Hop]:
        return choose_route(self.spans(), self.num_blocks, rng=self.rng)

    def run(
        self,
        session: ClientSession | None,
        hidden: torch.Tensor,
        layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None,
    ) -> torch.Tensor:
        if session is not None and session.closed:
            raise RuntimeError(f"session {session.session_id} is closed")
        hops = session.hops if session is not None and session.hops is not None else self.route()
        ops: list = []
        if session is not None:
            session.hops = hops
            ops, session.pending_ops = session.pending_ops, []
        h = hidden
        for hop in hops:
            request = build_step(hop, h, layer_calls, session, ops, attn_implementation)
            reply = decode_message(self.transport.step(hop.peer_id, encode_message(request.to_wire())))
            raise_if_error(reply, hop.peer_id)
            h = StepResponse.from_wire(reply).hidden
            if session is not None:
                session.opened_on.add(hop.peer_id)
        return h

    def close_session(self, session: ClientSession, wait: bool = True) -> None:
        if session.closed:
            return
        session.closed = True
        for peer_id in session.opened_on:
            self.transport.close_session(peer_id, session.session_id, wait=wait)
