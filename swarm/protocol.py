"""The messages a client and a peer exchange, independent of the transport that carries them.

A *step* runs a contiguous range of blocks ``[start, end)`` on one hidden state. It carries, for each
layer of the range, the extra positional and keyword arguments the model's own forward passed to
that block (recorded by the client's stubs). Layers usually receive identical arguments, so the
arguments are sent once in a table and each layer names its row. KV caches never travel: a cache
argument is a `CacheRef` to the session the peer holds. Cache operations that `generate()` performs
on the client (beam reorder, crop, batch select/repeat, reset) ride along with the next step, so
they cost no extra round trip.

A step may be *pushed* along the route (docs/wire.md, "Pushed steps"): its request names the hops after
it (`next`), the peer forwards its output to the next one itself, and the replies come back nested
(`StepResponse.then`), so the client sends once and receives once per step. With tail delivery
(protocol 3) the last peer keeps its reply, with every hop's output (`trail`), for the client to
collect directly (`CollectRequest`), and the chain answers back only `DELIVERED`. From protocol 4 the later
hops' packed requests carry no `step`: every hop of a pushed step runs the same one, and each forwarding peer
writes its own into the request it sends on, so a session's packed requests are the same bytes at every step
(a peer reuses what it decoded for the last one, `peer.steady`).

Everything is validated on decode with named errors, never asserts: the peer reads these from
untrusted clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math

import msgpack
import torch

from swarm.wire import CacheRef, RawTensor, WireError, encode_message

PROTOCOL_VERSION = 4

# Cache operations a client may forward, with the Python type of their single argument.
CACHE_OPS: dict[str, type] = {
    "reorder_cache": torch.Tensor,  # beam search: new order of the batch
    "crop": int,  # assisted decoding: keep this many tokens (negative: drop this many)
    "batch_repeat_interleave": int,  # expand the batch
    "batch_select_indices": torch.Tensor,  # keep these batch rows
    "reset": type(None),  # forget everything, keep the session
}


# Bounds a request must respect whatever the peer's own limits; they keep decoding cheap.
MAX_CACHE_OPS = 256  # cache operations riding with one step
MAX_INDEX_ROWS = 1 << 16  # elements of a reorder/select index tensor
MAX_NAME_CHARS = 128  # session id, cache class, attention implementation, peer ids, session keys
MAX_CHAIN = 64  # hops a pushed step may name after the one it is sent to
MAX_HOP_TIMEOUT_S = 3600.0  # what a pushed step may ask each hop to be waited for
MAX_COLLECT_BYTES = 512  # a packed `CollectRequest` (a session id of 128 characters takes ~150)

# Tail delivery: what the chain answers back once the last peer kept its reply for the client to collect. Always
# these bytes (the codec is deterministic), so a forwarding peer recognises it without decoding it.
DELIVERED = encode_message({"v": PROTOCOL_VERSION, "delivered": True})


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol. The message says which field and why.

    The request itself is at fault: sending it to another peer would fail the same way.
    """


class RequestRefused(ProtocolError):
    """A well-formed request this peer will not run now: a block range it does not serve, a limit of
    this peer (batch, sequence length, sessions, KV budget), an unknown or foreign session. Another
    peer, or the same one later, may accept it: clients re-route instead of giving up."""


@dataclass(frozen=True)
class ChainLink:
    """The next hop of a pushed step, as the client packed it for the peer before (`swarm.chain.link_hops`).

    `request` is that hop's request map, already in the wire's tree form and packed (msgpack): its hidden
    state is tensor 0 of the message the previous peer builds, and its other tensors are numbered from 1
    in the order of `tensors`. It holds the following hop's link in turn. A forwarding peer therefore
    neither decodes nor re-encodes the later hops' part: it puts its output and `tensors` (the protos it
    received, `wire.RawTensor`) around `request` and sends that. The request is checked by the peer that
    runs it, not by the peers that pass it on.
    """

    peer: str  # base58 libp2p peer id
    tensors: list  # the tensors `request` refers to (1, 2, ...): torch tensors on the client, RawTensors on a peer
    request: bytes  # that hop's packed request tree, "hidden" = tensor 0
    hops: int  # hops from that one to the end of the route (how long the forwarding peer may wait)

    def to_wire(self) -> dict:
        return {"peer": self.peer, "tensors": self.tensors, "request": self.request, "hops": self.hops}


@dataclass
class StepRequest:
    """Run blocks ``[start, end)`` of one hidden state, in a session (with KV cache) or stateless."""

    start: int  # first block to run (inclusive)
    end: int  # last block to run (exclusive)
    hidden: torch.Tensor  # (batch, seq, hidden) or whatever the model's blocks take first
    calls: list[tuple[tuple, dict]]  # distinct (extra args, kwargs) rows
    layer_calls: list[int]  # for each layer of [start, end): its row in `calls`
    session_id: str | None = None  # None: stateless forward, nothing is kept on the peer
    new_session: bool = False  # this step opens the session on this peer (an unknown id is an error otherwise)
    cache_class: str | None = None  # the client's cache class, e.g. "DynamicCache"; the peer builds the same
    cache_ops: list[tuple[str, Any]] = field(default_factory=list)  # applied before this step, in order
    attn_implementation: str | None = None  # the client's; masks are built for it, so the peer must match
    max_length: int | None = None  # tokens the session may reach; reserves the KV budget at session start
    step: int | None = None  # in a session: how many steps this peer has run for it before this one (see below)
    next: ChainLink | None = None  # a pushed step: the hop after this one (which names the one after it, ...)
    owner: str | None = None  # a forwarded step: the client it runs for (a claim; the session key vouches for it)
    session_key: str | None = None  # the session's secret: with it, a step forwarded by another peer may use the session
    hop_timeout: float | None = None  # a pushed step: seconds each hop may take; the next peer is waited for that x its hops
    trail: list | None = None  # tail delivery: the outputs of the hops before this one (RawTensors on a peer), in route order
    tail: bool = False  # tail delivery: the last hop; its reply is kept for the client's `CollectRequest`
    # the peer's own: the arguments as its blocks take them, kept with a request that is refilled step after step
    # (peer.steady); never on the wire
    prepared: Any = field(default=None, repr=False, compare=False)

    # `step` makes a retried request safe: a peer that already ran step n of a session answers a repeat
    # of it with the reply it kept, instead of running it twice (its reply may have been lost on the way);
    # a step that does not follow the session's last one is refused. Without it, steps are not checked.

    def to_wire(self) -> dict:
        return {
            "v": PROTOCOL_VERSION,
            "start": self.start,
            "end": self.end,
            "hidden": self.hidden,
            "calls": [[list(args), kwargs] for args, kwargs in self.calls],
            "layer_calls": self.layer_calls,
            "session_id": self.session_id,
            "new_session": self.new_session,
            "cache_class": self.cache_class,
            "cache_ops": [[name, arg] for name, arg in self.cache_ops],
            "attn_implementation": self.attn_implementation,
            "max_length": self.max_length,
            # the push fields travel only when set: a decode step stays as small as before
            **({"next": self.next.to_wire()} if self.next is not None else {}),
            **({"owner": self.owner} if self.owner is not None else {}),
            **({"session_key": self.session_key} if self.session_key is not None else {}),
            **({"hop_timeout": self.hop_timeout} if self.hop_timeout is not None else {}),
            **({"trail": self.trail} if self.trail is not None else {}),
            **({"tail": True} if self.tail else {}),
            "step": self.step,  # last: a session's steps differ only in their last bytes (peer.steady)
        }

    @classmethod
    def from_wire(cls, msg: Any) -> "StepRequest":
        if not isinstance(msg, dict):
            raise ProtocolError(f"a step request must be a map, got {type(msg).__name__}")
        version = msg.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version!r:.40} is not supported (this peer speaks {PROTOCOL_VERSION})")
        start, end = _int(msg, "start"), _int(msg, "end")
        if not 0 <= start < end < 1 << 31:
            raise ProtocolError(f"block range {start}:{end} is empty, negative or absurd")
        hidden = msg.get("hidden")
        if not isinstance(hidden, torch.Tensor):
            raise ProtocolError(f"'hidden' must be a tensor, got {type(hidden).__name__}")
        calls_raw = msg.get("calls")
        if not isinstance(calls_raw, list) or not 0 < len(calls_raw) <= end - start:
            got = len(calls_raw) if isinstance(calls_raw, list) else type(calls_raw).__name__
            raise ProtocolError(f"'calls' must list 1..{end - start} [args, kwargs] rows (one per distinct layer call), got {got}")
        calls = []
        for i, row in enumerate(calls_raw):
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], list) and isinstance(row[1], dict)):
                raise ProtocolError(f"calls[{i}] must be [list of args, map of kwargs]")
            calls.append((tuple(row[0]), row[1]))
        layer_calls = msg.get("layer_calls")
        if not isinstance(layer_calls, list) or len(layer_calls) != end - start:
            got = len(layer_calls) if isinstance(layer_calls, list) else type(layer_calls).__name__
            raise ProtocolError(f"'layer_calls' must list one row index per block of {start}:{end}, got {got}")
        for i, row in enumerate(layer_calls):
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < len(calls):
                raise ProtocolError(f"layer_calls[{i}] = {row!r} is not a row of the {len(calls)} calls")
        session_id = _opt(msg, "session_id", str)
        if session_id is not None and not 0 < len(session_id) <= MAX_NAME_CHARS:
            raise ProtocolError(f"session_id must be 1..{MAX_NAME_CHARS} characters, got {len(session_id)}")
        ops_raw = msg.get("cache_ops")
        if ops_raw is None:
            ops_raw = []
        if not isinstance(ops_raw, list) or len(ops_raw) > MAX_CACHE_OPS:
            got = len(ops_raw) if isinstance(ops_raw, list) else type(ops_raw).__name__
            raise ProtocolError(f"'cache_ops' must be a list of at most {MAX_CACHE_OPS} operations, got {got}")
        ops = [_cache_op(i, op) for i, op in enumerate(ops_raw)]
        if ops and session_id is None:
            raise ProtocolError("cache operations need a session")
        new_session = msg.get("new_session", False)
        if not isinstance(new_session, bool):
            raise ProtocolError(f"'new_session' must be a boolean, got {type(new_session).__name__}")
        if new_session and session_id is None:
            raise ProtocolError("'new_session' needs a session_id")
        max_length = _opt(msg, "max_length", int)
        if max_length is not None and not 0 < max_length < 1 << 31:
            raise ProtocolError(f"max_length must be in 1..{(1 << 31) - 1}, got {max_length}")
        step = _opt(msg, "step", int)
        if step is not None and (session_id is None or not 0 <= step < 1 << 31):
            raise ProtocolError(f"step must be in 0..{(1 << 31) - 1} and needs a session, got {step}")
        cache_class = _opt(msg, "cache_class", str)
        attn_implementation = _opt(msg, "attn_implementation", str)
        for key, value in (("cache_class", cache_class), ("attn_implementation", attn_implementation)):
            if value is not None and not 0 < len(value) <= MAX_NAME_CHARS:
                raise ProtocolError(f"{key!r} must be 1..{MAX_NAME_CHARS} characters, got {len(value)}")
        push = PushFields.from_wire(msg)
        if (push.owner is not None or push.session_key is not None) and session_id is None:
            raise ProtocolError("'owner' and 'session_key' need a session")
        if push.tail and (step is None or push.next is not None):
            raise ProtocolError("'tail' marks the last hop of a pushed step: it needs a session 'step', and no 'next'")
        return cls(
            start=start,
            end=end,
            hidden=hidden,
            calls=calls,
            layer_calls=layer_calls,
            session_id=session_id,
            new_session=new_session,
            cache_class=cache_class,
            cache_ops=ops,
            attn_implementation=attn_implementation,
            max_length=max_length,
            step=step,
            next=push.next,
            owner=push.owner,
            session_key=push.session_key,
            hop_timeout=push.hop_timeout,
            trail=push.trail,
            tail=push.tail,
        )


@dataclass
class PushFields:
    """A request's push fields, read on their own: a forwarding peer reads them from a request it decoded
    without its tensors (`swarm.chain`); `StepRequest.from_wire` reads them the same way."""

    next: ChainLink | None
    owner: str | None
    session_key: str | None
    hop_timeout: float | None
    trail: list | None = None
    tail: bool = False

    @classmethod
    def from_wire(cls, msg: dict) -> "PushFields":
        owner = _opt(msg, "owner", str)
        session_key = _opt(msg, "session_key", str)
        for key, value in (("owner", owner), ("session_key", session_key)):
            if value is not None and not 0 < len(value) <= MAX_NAME_CHARS:
                raise ProtocolError(f"{key!r} must be 1..{MAX_NAME_CHARS} characters, got {len(value)}")
        if owner is not None and session_key is None:
            raise ProtocolError("'owner' names the client a forwarded step runs for and needs the session's 'session_key'")
        if session_key is not None and not session_key.isascii():
            raise ProtocolError("'session_key' must be ASCII")
        hop_timeout = msg.get("hop_timeout")
        if hop_timeout is not None:
            if not isinstance(hop_timeout, (int, float)) or isinstance(hop_timeout, bool) or not (
                math.isfinite(hop_timeout) and 0 < hop_timeout <= MAX_HOP_TIMEOUT_S
            ):
                raise ProtocolError(f"'hop_timeout' must be a number of seconds in (0, {MAX_HOP_TIMEOUT_S:.0f}], got {hop_timeout!r:.40}")
            hop_timeout = float(hop_timeout)
        trail = msg.get("trail")
        if trail is not None and not (
            isinstance(trail, list) and len(trail) <= MAX_CHAIN and all(isinstance(t, (torch.Tensor, RawTensor)) for t in trail)
        ):
            raise ProtocolError(f"'trail' must list at most {MAX_CHAIN} tensors (the outputs of the hops before)")
        tail = msg.get("tail", False)
        if type(tail) is not bool:
            raise ProtocolError(f"'tail' must be a boolean, got {type(tail).__name__}")
        return cls(parse_chain(msg.get("next")), owner, session_key, hop_timeout, trail, tail)


def parse_chain(value: Any) -> ChainLink | None:
    """The `next` field of a pushed step: ``{"peer": str, "tensors": [tensor, ...], "request": bytes, "hops": int}``.

    Only the shape is checked here; the request is validated by the peer that runs it.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"'next' must be a map with 'peer', 'tensors', 'request' and 'hops', got {type(value).__name__}")
    peer, tensors, request, hops = value.get("peer"), value.get("tensors"), value.get("request"), value.get("hops")
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_NAME_CHARS:
        got = f"{len(peer)} characters" if isinstance(peer, str) else type(peer).__name__
        raise ProtocolError(f"next.peer must be a peer id of 1..{MAX_NAME_CHARS} characters, got {got}")
    if not isinstance(tensors, list) or not all(isinstance(t, (torch.Tensor, RawTensor)) for t in tensors):
        raise ProtocolError("next.tensors must be a list of tensors (those the next request refers to)")
    if not isinstance(request, bytes) or not request:
        raise ProtocolError(f"next.request must be that hop's packed request (bytes), got {type(request).__name__}")
    if type(hops) is not int or not 0 < hops <= MAX_CHAIN:
        raise ProtocolError(f"next.hops must be the number of hops still to come, 1..{MAX_CHAIN}, got {hops!r:.40}")
    return ChainLink(peer, tensors, request, hops)


@dataclass
class StepResponse:
    """The hidden state after the last block of the step; for a pushed step, also what came after it.

    A peer that forwarded a pushed step adds the next peer's reply, as the bytes it received (`then`:
    decoded by the client, level by level, never re-encoded on the way back), or why there is none
    (`then_error`: an `error_to_wire` map naming the next peer). A reply with neither ends the chain
    there: the client goes on hop by hop.
    """

    hidden: torch.Tensor  # same shape as the request's hidden state: this peer's output
    then: bytes | None = None  # the next peer's reply to the forwarded step, unparsed
    then_error: dict | None = None  # the forwarding failed: {"v": ..., "error": {type, message, retry}}
    trail: list | None = None  # tail delivery (the last hop's reply, collected): the outputs of the hops before it

    def to_wire(self) -> dict:
        msg = {"v": PROTOCOL_VERSION, "hidden": self.hidden}
        if self.then is not None:
            msg["then"] = self.then
        if self.then_error is not None:
            msg["then_error"] = self.then_error
        if self.trail is not None:
            msg["trail"] = self.trail
        return msg

    @classmethod
    def from_wire(cls, msg: Any) -> "StepResponse":
        if not isinstance(msg, dict) or not isinstance(msg.get("hidden"), torch.Tensor):
            raise ProtocolError("a step response must be a map with a 'hidden' tensor")
        then, then_error = msg.get("then"), msg.get("then_error")
        if then is not None and not isinstance(then, bytes):
            raise ProtocolError(f"'then' must be the next peer's reply as bytes, got {type(then).__name__}")
        if then_error is not None and not (isinstance(then_error, dict) and isinstance(then_error.get("error"), dict)):
            raise ProtocolError("'then_error' must be an error map ({'error': {...}})")
        trail = msg.get("trail")
        if trail is not None and not (isinstance(trail, list) and all(isinstance(t, torch.Tensor) for t in trail)):
            raise ProtocolError("'trail' must be a list of tensors")
        return cls(hidden=msg["hidden"], then=then, then_error=then_error, trail=trail)


@dataclass(frozen=True)
class CollectRequest:
    """Tail delivery: the client asks the last peer of a pushed step for the reply it kept (step `step` of session
    `session_id`, which that peer holds under this id), waiting at most `timeout` seconds for it to arrive.

    Sent as msgpack ``[version, session_id, step, timeout]`` (a direct connection's COLLECT frame, swarm.direct).
    The answer is the kept reply's bytes (a `StepResponse` with `trail`, or an error map), or an error map.
    """

    session_id: str
    step: int
    timeout: float

    def pack(self) -> bytes:
        return msgpack.packb([PROTOCOL_VERSION, self.session_id, self.step, self.timeout])

    @classmethod
    def unpack(cls, data: bytes) -> "CollectRequest":
        if len(data) > MAX_COLLECT_BYTES:
            raise ProtocolError(f"a collect request of {len(data)} bytes exceeds {MAX_COLLECT_BYTES}")
        try:
            msg = msgpack.unpackb(data, raw=False, max_ext_len=0, max_bin_len=0, max_map_len=0, max_array_len=4)
        except Exception as exc:  # noqa: BLE001 - any msgpack failure means the same here
            raise ProtocolError(f"a collect request must be msgpack [version, session_id, step, timeout]: {exc}") from None
        if not (isinstance(msg, list) and len(msg) == 4):
            raise ProtocolError("a collect request must be [version, session_id, step, timeout]")
        version, session_id, step, timeout = msg
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise ProtocolError(f"protocol version {version!r:.40} is not supported (this peer speaks {PROTOCOL_VERSION})")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_NAME_CHARS:
            raise ProtocolError(f"session_id must be a string of 1..{MAX_NAME_CHARS} characters")
        if type(step) is not int or not 0 <= step < 1 << 31:
            raise ProtocolError(f"step must be in 0..{(1 << 31) - 1}, got {step!r:.40}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not (
            math.isfinite(timeout) and 0 < timeout <= MAX_HOP_TIMEOUT_S * MAX_CHAIN
        ):
            raise ProtocolError(f"timeout must be in (0, {MAX_HOP_TIMEOUT_S * MAX_CHAIN:.0f}] seconds, got {timeout!r:.40}")
        return cls(session_id, step, float(timeout))


def _cache_op(i: int, op: Any) -> tuple[str, Any]:
    """One ``[name, argument]`` cache operation, checked for what it can be without the session's cache."""
    if not (isinstance(op, list) and len(op) == 2 and isinstance(op[0], str) and op[0] in CACHE_OPS):
        raise ProtocolError(f"cache_ops[{i}] must be [name, argument] with name in {sorted(CACHE_OPS)}")
    name, arg = op
    expected = CACHE_OPS[name]
    if not isinstance(arg, expected) or isinstance(arg, bool):
        raise ProtocolError(f"cache_ops[{i}] {name} takes a {expected.__name__}, got {type(arg).__name__}")
    if isinstance(arg, torch.Tensor):
        if arg.ndim != 1 or arg.dtype not in (torch.int64, torch.int32) or arg.numel() > MAX_INDEX_ROWS:
            raise ProtocolError(
                f"cache_ops[{i}] {name} takes a 1-D int64/int32 index of at most {MAX_INDEX_ROWS} rows, "
                f"got {arg.dtype} {tuple(arg.shape)}"
            )
    elif name == "batch_repeat_interleave" and not 0 < arg <= MAX_INDEX_ROWS:
        raise ProtocolError(f"cache_ops[{i}] batch_repeat_interleave({arg}): repeats must be in 1..{MAX_INDEX_ROWS}")
    elif name == "crop" and not -(1 << 31) < arg < 1 << 31:
        raise ProtocolError(f"cache_ops[{i}] crop({arg}) is out of range")
    return name, arg


def _int(msg: dict, key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be an integer, got {type(value).__name__}")
    return value


def _opt(msg: dict, key: str, kind: type):
    value = msg.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ProtocolError(f"{key!r} must be a {kind.__name__} or absent, got {type(value).__name__}")
    return value


__all__ = [
    "CACHE_OPS",
    "CacheRef",
    "ChainLink",
    "CollectRequest",
    "DELIVERED",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "RemoteError",
    "RequestRefused",
    "StepRequest",
    "StepResponse",
    "WireError",
]


class RemoteError(RuntimeError):
    """A peer refused or failed a request; the message is the peer's own, prefixed with who said it.

    `retry` is the peer's verdict: False when the request itself is malformed (any peer would refuse
    it), True when another peer (or this one later) may run it: a refusal (`RequestRefused`) or a
    failure of the peer.
    """

    def __init__(self, peer: str, kind: str, message: str, retry: bool = True):
        super().__init__(f"peer {peer}: {kind}: {message}")
        self.peer, self.kind, self.message, self.retry = peer, kind, message, retry


def is_retryable(exc: BaseException) -> bool:
    """Whether a request that failed with `exc` on a peer may succeed elsewhere (see `RemoteError.retry`)."""
    return isinstance(exc, RequestRefused) or not isinstance(exc, (ProtocolError, WireError))


def error_to_wire(exc: BaseException, retry: bool | None = None) -> dict:
    """An error as the caller will see it. Only the type name, the message and whether another peer
    may succeed travel, never a traceback."""
    retry = is_retryable(exc) if retry is None else retry
    return {"v": PROTOCOL_VERSION, "error": {"type": type(exc).__name__, "message": str(exc)[:4096], "retry": retry}}


def raise_if_error(msg: Any, peer: str) -> None:
    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
        err = msg["error"]
        retry = err.get("retry", True)  # a peer that does not say: assume its own failure
        raise RemoteError(
            peer, str(err.get("type", "Error"))[:64], str(err.get("message", ""))[:4096], retry is not False
        )
