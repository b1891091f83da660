"""Pushed steps, the part every forwarding peer does the same way whatever carries the bytes.

A pushed step's request names the next hop (`StepRequest.next`, a `ChainLink`): its peer, and its request
as the client packed it (`link_hops`), which names the hop after it in turn. The peer decodes that part
without building its tensors (`FORWARDED_KEYS`, `wire.decode_message(raw_keys=...)`); once it has run its
own part, `plan_forward` says what to send on: the packed request, unpacked and packed again by msgpack
alone with the client it runs for as its `owner`, around this peer's output and the tensors it refers to
(protocol 2: the later hops are never decoded into Python objects on the way), with this step's number as the
next hop's `step` (protocol 4: the packed requests carry none, so they are the same bytes at every step of a
session). It runs on the
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

from swarm.protocol import DELIVERED, PROTOCOL_VERSION, ChainLink, ProtocolError, StepRequest, error_to_wire
from swarm.rpc import UNARY_MAX_BYTES
from swarm.wire import (
    RawTensor, decode_message, encode_message, encode_tree, message_from_tree, raw_tensor, tensor_list, unpack_tree,
)

# Only steps that fit one unary message are pushed (clients chain decode steps and short prefills); a
# peer does not forward a larger request, whatever it names.
PUSH_MAX_BYTES = UNARY_MAX_BYTES
FORWARDED_KEYS = ("next", "trail")  # a request's parts a peer passes on without decoding their tensors
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
        (the map `StepResponse.to_wire` makes, with the output passed on undecoded). When the rest of the chain
        answered `DELIVERED` (the last peer kept the reply for the client, with every output), so does this one."""
        if then == DELIVERED:
            return DELIVERED
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
    what it receives: the link was only checked for its shape here.
    """
    link = request.next
    if link is None:
        return None
    timeout = forward_timeout(request)
    out = raw_tensor(hidden)
    try:
        tree = unpack_tree(link.request)
        if type(tree) is not dict:
            raise ValueError(f"it is a {type(tree).__name__}, not a map")
        if tree.get("session_key") is not None:  # a claim proves nothing by itself: it rides with the session's key
            tree["owner"] = request.owner or caller
        else:
            tree.pop("owner", None)
        trail = request.trail
        if trail is not None:  # tail delivery: the outputs so far, then this peer's (the next hop's tensor 0)
            after = 1 + len(link.tensors)
            tree["trail"] = tensor_list([*range(after, after + len(trail)), 0])
        if request.step is not None:  # every hop of a pushed step runs the same step (protocol 4); written last
            tree["step"] = request.step
        data_next = _link_message(link, tree, out, trail or ())
    except (TypeError, ValueError) as exc:
        return Forward(link.peer, out, None, ProtocolError(f"next.request cannot be forwarded: {exc}"), timeout)
    return Forward(link.peer, out, data_next, None, timeout)


def forward_timeout(request: StepRequest) -> float:
    """Seconds to wait for the next peer of a pushed step: its `hop_timeout` x the hops from there on."""
    return (request.hop_timeout or DEFAULT_HOP_TIMEOUT_S) * request.next.hops


def _link_message(link: ChainLink, tree, hidden: RawTensor, trail=()) -> bytes:
    """The message for the hop `link` names: its tree (unpacked) around `hidden` (tensor 0), `link.tensors`, then
    the `trail` tensors the tree refers to after them."""
    tensors = [hidden] + [t if isinstance(t, RawTensor) else raw_tensor(t) for t in (*link.tensors, *trail)]
    return message_from_tree(tree, tensors)


@dataclass
class Delivery:
    """Tail delivery: the last hop's reply, to keep for the client's collect (`peer.tails`), while the peer that
    forwarded the step is answered `DELIVERED`. Any outcome of a `tail` request is delivered, errors included, so
    the client never waits for a reply that was sent elsewhere."""

    session_id: str
    step: int
    owner: str  # the client the step runs for: only it may collect
    data: bytes  # the reply: `StepResponse` with `trail` (every hop's output), or an error map


def deliver(request: StepRequest, reply: bytes | torch.Tensor, caller: str) -> Delivery:
    """The `Delivery` of a `tail` request's outcome: its output (with the trail of outputs it received) or its
    error reply's bytes."""
    if isinstance(reply, torch.Tensor):
        reply = encode_message({"v": PROTOCOL_VERSION, "hidden": reply, "trail": request.trail or []})
    return Delivery(request.session_id, request.step, request.owner or caller, reply)


_HIDDEN = torch.empty(0)  # stands for the hidden state of a later hop: tensor 0 of the message built for it


def link_hops(hops: list[tuple[str, dict]]) -> ChainLink | None:
    """The `next` of a pushed step's first request: `hops` are the later hops in route order, each (peer id,
    its request map without "hidden", as `StepRequest.to_wire` makes it).

    Packed from the last hop back: each hop's tree numbers its hidden state 0 and the rest of its tensors
    (its own, and those the hops after it need) from 1, and holds the next hop's link. Tensors the hops
    share are one object here, so they travel once, in the first request (`encode` deduplicates them).
    A hop's `step` is left out: the peer before it writes in its own (`plan_forward`), so the packed
    requests of a session's steps are the same bytes and the next peer's `peer.steady` recognises them.
    """
    link = None
    for k in range(len(hops) - 1, -1, -1):
        peer, msg = hops[k]
        tree = {key: value for key, value in msg.items() if key != "step"}
        tree["hidden"] = _HIDDEN
        if link is not None:
            tree["next"] = link.to_wire()
        packed, tensors = encode_tree(tree, [_HIDDEN])
        link = ChainLink(peer, tensors[1:], packed, len(hops) - k)
    return link


def unlinked(request: StepRequest) -> list[tuple[str, StepRequest]]:
    """The later hops a pushed request names, decoded, each with an empty hidden state (what a peer would
    put there is its own output): for tests and tools that check what a client sent."""
    hops, link, step = [], request.next, request.step
    while link is not None:
        tree = unpack_tree(link.request)
        if step is not None:
            tree["step"] = step  # as `plan_forward` writes it in
        data = _link_message(link, tree, raw_tensor(torch.zeros_like(request.hidden)))
        nested = StepRequest.from_wire(decode_message(data))
        hops.append((link.peer, nested))
        link = nested.next
    return hops


__all__ = ["DEFAULT_HOP_TIMEOUT_S", "FORWARDED_KEYS", "Delivery", "Forward", "ForwardFailed", "PUSH_MAX_BYTES", "deliver",
           "forward_timeout", "link_hops", "plan_forward", "unlinked"]
