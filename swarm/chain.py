"""Pushed steps, the part every forwarding peer does the same way whatever carries the bytes.

A pushed step's request names the hops after it (`StepRequest.next`). The peer decodes that part without
building its tensors (`FORWARDED_KEYS`, `wire.decode_message(raw_keys=...)`); once it has run its own
part, `plan_forward` says what to send on: the next hop's request with this peer's output as its hidden
state, the remaining hops as its `next`, and the client it runs for as its `owner`. It runs on the
compute thread right after the blocks, so the next request is on its way before this peer's own reply
is even encoded. `Forward.reply` then nests what came back (`then`: the next peer's reply bytes,
untouched) or why nothing did (`then_error`) into this peer's reply. No tensor is decoded or
re-serialized on the way: the client's arguments travel on as the protos that came, and this peer's
output is serialized once for both messages (`swarm.wire.RawTensor`). The network part (the RPC call,
its timeout) is the caller's: `peer.forward` over libp2p, `swarm.local` in-process.

Pure functions: no sockets, no threads. swarm/router.py reads the nested reply on the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.protocol import PROTOCOL_VERSION, ChainLink, ProtocolError, StepRequest, error_to_wire
from swarm.rpc import UNARY_MAX_BYTES
from swarm.wire import RawTensor, encode_message, raw_tensor

# Only steps that fit one unary message are pushed (clients chain decode steps and short prefills); a
# peer does not forward a larger request, whatever it names.
PUSH_MAX_BYTES = UNARY_MAX_BYTES
FORWARDED_KEYS = ("next",)  # a request's part a peer passes on without decoding its tensors
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


def plan_forward(request: StepRequest, hidden: torch.Tensor, caller: str) -> Forward | None:
    """The forward a pushed step asks for, once this peer ran its part of `request` and got `hidden`;
    None when the request names no next hop.

    `caller` is who sent the request (the libp2p peer id the RPC layer authenticated): the client itself at
    the first hop. It becomes the next request's `owner` unless the request already carries a claim (it was
    itself forwarded), so every hop of the chain knows the client a session belongs to. The next peer checks
    what it receives: the entries of `next` were only checked for their shape here.
    """
    if not request.next:
        return None
    link, rest = request.next[0], request.next[1:]
    timeout = (request.hop_timeout or DEFAULT_HOP_TIMEOUT_S) * len(request.next)
    out = raw_tensor(hidden)
    try:
        data_next = encode_message(_next_request(link, rest, out, request.owner or caller))
    except (TypeError, ValueError) as exc:  # decoded values always re-encode; only the limits can bite
        return Forward(link.peer, out, None, ProtocolError(f"next[0] cannot be forwarded: {exc}"), timeout)
    return Forward(link.peer, out, data_next, None, timeout)


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


__all__ = ["DEFAULT_HOP_TIMEOUT_S", "FORWARDED_KEYS", "Forward", "ForwardFailed", "PUSH_MAX_BYTES", "plan_forward"]
