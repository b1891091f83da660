"""Forwarding pushed steps to the next peer of their route, from the peer's event loop.

A pushed step (`StepRequest.next`, docs/wire.md) is run by the peer's compute thread like any other,
which also builds the next peer's request (`swarm.chain.plan_forward`); then, on the event loop, this
module sends it on and nests that peer's reply (or why there is none) into this peer's own. Waiting for
the next peer never holds the compute thread: other requests run meanwhile. The wait is bounded: the
request's `hop_timeout` times the hops still to come, so along a chain each peer gives up before the one
that called it does, and the client learns which link broke (`then_error` names the peer).

What to send and how to reply is `swarm.chain`'s (shared with the in-process transport); the RPC call
is `swarm.rpc.call_step`, the one clients use.
"""

from __future__ import annotations

import asyncio
import logging

from swarm.aio import within
from swarm.chain import Forward, ForwardFailed
from swarm.direct import DirectClient
from swarm.protocol import ProtocolError
from swarm.rpc import Stubs, call_step

logger = logging.getLogger(__name__)


class Forwarder:
    """Sends pushed steps on over this peer's libp2p stack (`p2p`: the DHT's `replicate_p2p()`)."""

    def __init__(self, p2p, direct: DirectClient | None = None):
        self.p2p = p2p
        self.stubs = Stubs(p2p)
        self.direct = direct  # direct TCP connections to the next peers, where allowed (swarm.direct)
        self.forwarded = 0  # pushed steps whose next peer replied (rpc_info: "forwarded")
        self.failed = 0  # pushed steps whose next peer could not be reached or was too slow

    async def send(self, plan: Forward) -> bytes:
        """Send a pushed step's next request on (planned by the compute thread, `swarm.chain.plan_forward`);
        this peer's reply, with the rest of the chain's nested in."""
        if plan.error is not None:
            return plan.reply(failure=plan.error)
        try:
            stub = self.stubs.get(plan.peer)
        except ValueError as exc:
            return plan.reply(failure=ProtocolError(f"next.peer {plan.peer!r:.140} is not a base58 peer id: {exc}"))
        try:
            then = await within(call_step(stub, plan.request, self.direct, plan.peer), plan.timeout)
        except asyncio.CancelledError:
            raise  # our own caller gave up (the client's wait ended): nobody to reply to
        except Exception as exc:  # noqa: BLE001 - every failure of the call means the same to the client
            self.failed += 1
            reason = f"no reply within {plan.timeout:.1f} s" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else (
                f"{type(exc).__name__}: {exc}"
            )
            logger.info("forwarding a pushed step to peer %s failed: %s", plan.peer, reason)
            return plan.reply(failure=ForwardFailed(f"could not forward the step to peer {plan.peer}: {reason}"))
        self.forwarded += 1
        return plan.reply(then=then)
