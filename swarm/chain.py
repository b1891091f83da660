"""Pushed steps, the part every forwarding peer does the same way whatever carries the bytes.

A pushed step's request names the hops after it (`StepRequest.next`). Once a peer has run its own part,
`plan_forward` reads the request and the peer's reply and says what to send on: the next hop's request
with this peer's output as its hidden state, the remaining hops as its `next`, and the client it runs
for as its `owner`. `Forward.reply` then nests what came back (`then`: the next peer's reply bytes,
untouched) or why nothing did (`then_error`) into this peer's reply. No tensor is decoded or
re-serialized on the way: the protos travel on as they came (`swarm.wire.RawTensor`). The network
part (the RPC call, its timeout) is the caller's: `peer.forward` over libp2p, `swarm.local` in-process.

Pure functions: no sockets, no threads. swarm/router.py reads the nested reply on the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.protocol import PROTOCOL_VERSION, ChainLink, ProtocolError, PushFields, error_to_wire
from swarm.rpc import UNARY_MAX_BYTES
from swarm.wire import RawTensor, WireError, decode_message, encode_message

# Only steps that fit one unary message are pushed (clients chain decode steps and short prefills); a
# peer does not look for `next` in a larger request, so it never parses a long prefill twice.
PUSH_MAX_BYTES = UNARY_MAX_BYTES
DEFAULT_HOP_TIMEOUT_S = 120.0  # a pushed step that names no `hop_timeout`: what each later hop is waited for


class ForwardFailed(RuntimeError):
    """The next peer of a pushed step did not answer (unreachable, too slow, or the call failed). It may be
    fine: the client tries it directly before it counts as a failure of that peer."""


@dataclass
class Forward:
    """What a peer sends on after running its part of a pushed step, and how it then replies."""

    peer: str  # the next peer (base58 id as the client wrote it)
    hidden: RawTensor  # this peer's output, as its reply carries it: the next hop's input and this reply's `hidden`
    request: bytes | None  # the next hop's encoded request; None when it could not be built (see `error`)
    error: ProtocolError | None  # the chain entry was unusable: the client's fault, replied with retry: false
    timeout: float  # seconds to wait for the next peer's reply: hop_timeout x the hops from there on

    def reply(self, then: bytes | None = None, failure: BaseException | None = None) -> bytes:
        """This peer's reply: its output, plus the next peer's reply bytes or the failure that stands for it
        (the map `StepResponse.to_wire` makes, with the output passed on undecoded)."""
        if then is None:
            failure = failure or self.error or ForwardFailed(f"peer {self.peer} sent nothing back")
            return encode_message({"v": PROTOCOL_VERSION, "hidden": self.hidden, "then_error": error_to_wire(failure)})
        try:
            return encode_message({"v": PROTOCOL_VERSION, "hidden": self.hidden, "then": then})
        except ValueError as exc:  # the nested replies outgrew the wire's metadata limit: the client goes on by itself
            too_big = ForwardFailed(f"the reply of peer {self.peer} and after ({len(then)} bytes) is too large to nest: {exc}")
            return encode_message({"v": PROTOCOL_VERSION, "hidden": self.hidden, "then_error": error_to_wire(too_big)})


def plan_forward(data: bytes, reply: bytes, caller: str) -> Forward | None:
    """The forward a pushed step asks for, once this peer answered `data` with `reply`; None when there is
    nothing to forward: not a pushed step, too large to be one, or this peer's own part failed (its error
    reply goes back as it is).

    `caller` is who sent `data` (the libp2p peer id the RPC layer authenticated): the client itself at the
    first hop. It becomes the next request's `owner` unless `data` already carries a claim (it was itself
    forwarded), so every hop of the chain knows the client a session belongs to.

    Tensors are not decoded here: the handler has checked the request already (a successful reply means it
    passed `StepRequest.from_wire`), and the next peer checks what it receives. The client's arguments for
    the next hops and this peer's output go on as the protos that came in (`wire.RawTensor`).
    """
    if len(data) > PUSH_MAX_BYTES:
        return None
    try:
        request = decode_message(data, raw_tensors=True)
        response = decode_message(reply, raw_tensors=True)
        if not isinstance(request, dict) or not isinstance(response, dict):
            return None
        push = PushFields.from_wire(request)
    except (WireError, ProtocolError):
        return None  # the handler has answered it with the error already
    hidden = response.get("hidden")
    if not push.next or "error" in response or not isinstance(hidden, RawTensor):
        return None  # not pushed, or this peer's part failed: nothing to send on
    link, rest = push.next[0], push.next[1:]
    timeout = (push.hop_timeout or DEFAULT_HOP_TIMEOUT_S) * len(push.next)
    try:
        data_next = encode_message(_next_request(link, rest, hidden, push.owner or caller))
    except (TypeError, ValueError) as exc:  # decoded values always re-encode; only the limits can bite
        return Forward(link.peer, hidden, None, ProtocolError(f"next[0] cannot be forwarded: {exc}"), timeout)
    return Forward(link.peer, hidden, data_next, None, timeout)


def _next_request(link: ChainLink, rest: list[ChainLink], hidden: RawTensor, owner: str) -> dict:
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
