"""Pushed steps, the part every forwarding peer does the same way whatever carries the bytes.

A pushed step's request names the hops after it (`StepRequest.next`). Once a peer has run its own part,
`plan_forward` reads the request and the peer's reply and says what to send on: the next hop's request
with this peer's output as its hidden state, the remaining hops as its `next`, and the client it runs
for as its `owner`. `Forward.reply` then nests what came back (`then`: the next peer's reply bytes,
untouched) or why nothing did (`then_error`) into this peer's reply. The network part (the RPC call,
its timeout) is the caller's: `peer.forward` over libp2p, `swarm.local` in-process.

Pure functions: no sockets, no threads. swarm/router.py reads the nested reply on the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from swarm.protocol import ChainLink, ProtocolError, StepRequest, StepResponse, error_to_wire
from swarm.rpc import UNARY_MAX_BYTES
from swarm.wire import WireError, decode_message, encode_message

logger = logging.getLogger(__name__)

# Only steps that fit one unary message are pushed (clients chain decode steps and short prefills); a
# peer does not look for `next` in a larger request, so it never decodes a long prefill twice.
PUSH_MAX_BYTES = UNARY_MAX_BYTES
DEFAULT_HOP_TIMEOUT_S = 120.0  # a pushed step that names no `hop_timeout`: what each later hop is waited for


class ForwardFailed(RuntimeError):
    """The next peer of a pushed step did not answer (unreachable, too slow, or the call failed). It may be
    fine: the client tries it directly before it counts as a failure of that peer."""


@dataclass
class Forward:
    """What a peer sends on after running its part of a pushed step, and how it then replies."""

    peer: str  # the next peer (base58 id as the client wrote it)
    hidden: torch.Tensor  # this peer's output: the next hop's input, and the `hidden` of this peer's reply
    request: bytes | None  # the next hop's encoded request; None when it could not be built (see `error`)
    error: ProtocolError | None  # the chain entry was unusable: the client's fault, replied with retry: false
    timeout: float  # seconds to wait for the next peer's reply: hop_timeout x the hops from there on

    def reply(self, then: bytes | None = None, failure: BaseException | None = None) -> bytes:
        """This peer's reply: its output, plus the next peer's reply bytes or the failure that stands for it."""
        if then is None:
            failure = failure or self.error or ForwardFailed(f"peer {self.peer} sent nothing back")
            return encode_message(StepResponse(self.hidden, then_error=error_to_wire(failure)).to_wire())
        try:
            return encode_message(StepResponse(self.hidden, then=then).to_wire())
        except ValueError as exc:  # the nested replies outgrew the wire's metadata limit: the client goes on by itself
            too_big = ForwardFailed(f"the reply of peer {self.peer} and after ({len(then)} bytes) is too large to nest: {exc}")
            return encode_message(StepResponse(self.hidden, then_error=error_to_wire(too_big)).to_wire())


def plan_forward(data: bytes, reply: bytes, caller: str) -> Forward | None:
    """The forward a pushed step asks for, once this peer answered `data` with `reply`; None when there is
    nothing to forward: not a pushed step, too large to be one, or this peer's own part failed (its error
    reply goes back as it is).

    `caller` is who sent `data` (the libp2p peer id the RPC layer authenticated): the client itself at the
    first hop. It becomes the next request's `owner` unless `data` already carries a claim (it was itself
    forwarded), so every hop of the chain knows the client a session belongs to.
    """
    if len(data) > PUSH_MAX_BYTES:
        return None
    try:
        request_map = decode_message(data)
        request = StepRequest.from_wire(request_map)
    except (WireError, ProtocolError):
        return None  # the handler has answered it with the error already
    if not request.next:
        return None
    try:
        response = StepResponse.from_wire(decode_message(reply))
    except (WireError, ProtocolError):
        return None  # an error reply: this peer's part failed, nothing to send on
    link, rest = request.next[0], request.next[1:]
    hop_timeout = request.hop_timeout or DEFAULT_HOP_TIMEOUT_S
    timeout = hop_timeout * len(request.next)
    try:
        data_next = encode_message(_next_request(link, rest, response.hidden, request.owner or caller))
    except (TypeError, ValueError) as exc:  # decoded values always re-encode; only the limits can bite
        return Forward(link.peer, response.hidden, None, ProtocolError(f"next[0] cannot be forwarded: {exc}"), timeout)
    return Forward(link.peer, response.hidden, data_next, None, timeout)


def _next_request(link: ChainLink, rest: list[ChainLink], hidden: torch.Tensor, owner: str) -> dict:
    """The next hop's request map: the client's map for it, this peer's output as hidden, the rest of the chain."""
    msg = dict(link.request)
    msg["hidden"] = hidden
    msg.pop("next", None)
    if rest:
        msg["next"] = [entry.to_wire() for entry in rest]
    if msg.get("session_key") is not None:  # a claim proves nothing by itself: it rides with the session's key
        msg["owner"] = owner
    else:
        msg.pop("owner", None)
    return msg


__all__ = ["DEFAULT_HOP_TIMEOUT_S", "Forward", "ForwardFailed", "PUSH_MAX_BYTES", "plan_forward"]
