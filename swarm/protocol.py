"""The messages a client and a peer exchange, independent of the transport that carries them.

A *step* runs a contiguous range of blocks ``[start, end)`` on one hidden state. It carries, for each
layer of the range, the extra positional and keyword arguments the model's own forward passed to
that block (recorded by the client's stubs). Layers usually receive identical arguments, so the
arguments are sent once in a table and each layer names its row. KV caches never travel: a cache
argument is a `CacheRef` to the session the peer holds. Cache operations that `generate()` performs
on the client (beam reorder, crop, batch select/repeat, reset) ride along with the next step, so
they cost no extra round trip.

Everything is validated on decode with named errors, never asserts: the peer reads these from
untrusted clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.wire import CacheRef, WireError

PROTOCOL_VERSION = 1

# Cache operations a client may forward, with the Python type of their single argument.
CACHE_OPS: dict[str, type] = {
    "reorder_cache": torch.Tensor,  # beam search: new order of the batch
    "crop": int,  # assisted decoding: keep this many tokens (negative: drop this many)
    "batch_repeat_interleave": int,  # expand the batch
    "batch_select_indices": torch.Tensor,  # keep these batch rows
    "reset": type(None),  # forget everything, keep the session
}


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol. The message says which field and why."""


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
        }

    @classmethod
    def from_wire(cls, msg: Any) -> "StepRequest":
        if not isinstance(msg, dict):
            raise ProtocolError(f"a step request must be a map, got {type(msg).__name__}")
        if msg.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {msg.get('v')!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
        start, end = _int(msg, "start"), _int(msg, "end")
        if not 0 <= start < end:
            raise ProtocolError(f"block range {start}:{end} is empty or negative")
        hidden = msg.get("hidden")
        if not isinstance(hidden, torch.Tensor):
            raise ProtocolError(f"'hidden' must be a tensor, got {type(hidden).__name__}")
        calls_raw = msg.get("calls")
        if not isinstance(calls_raw, list) or not calls_raw:
            raise ProtocolError("'calls' must be a non-empty list of [args, kwargs] rows")
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
        if session_id is not None and not 0 < len(session_id) <= 128:
            raise ProtocolError(f"session_id must be 1..128 characters, got {len(session_id)}")
        ops = []
        for i, op in enumerate(msg.get("cache_ops") or []):
            if not (isinstance(op, list) and len(op) == 2 and op[0] in CACHE_OPS):
                raise ProtocolError(f"cache_ops[{i}] must be [name, argument] with name in {sorted(CACHE_OPS)}")
            name, arg = op
            expected = CACHE_OPS[name]
            if not isinstance(arg, expected) or isinstance(arg, bool):
                raise ProtocolError(f"cache_ops[{i}] {name} takes a {expected.__name__}, got {type(arg).__name__}")
            ops.append((name, arg))
        if ops and session_id is None:
            raise ProtocolError("cache operations need a session")
        new_session = msg.get("new_session", False)
        if not isinstance(new_session, bool):
            raise ProtocolError(f"'new_session' must be a boolean, got {type(new_session).__name__}")
        max_length = _opt(msg, "max_length", int)
        if max_length is not None and max_length <= 0:
            raise ProtocolError(f"max_length must be positive, got {max_length}")
        return cls(
            start=start,
            end=end,
            hidden=hidden,
            calls=calls,
            layer_calls=layer_calls,
            session_id=session_id,
            new_session=new_session,
            cache_class=_opt(msg, "cache_class", str),
            cache_ops=ops,
            attn_implementation=_opt(msg, "attn_implementation", str),
            max_length=max_length,
        )


@dataclass
class StepResponse:
    """The hidden state after the last block of the step."""

    hidden: torch.Tensor  # same shape as the request's hidden state

    def to_wire(self) -> dict:
        return {"v": PROTOCOL_VERSION, "hidden": self.hidden}

    @classmethod
    def from_wire(cls, msg: Any) -> "StepResponse":
        if not isinstance(msg, dict) or not isinstance(msg.get("hidden"), torch.Tensor):
            raise ProtocolError("a step response must be a map with a 'hidden' tensor")
        return cls(hidden=msg["hidden"])


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
    "PROTOCOL_VERSION",
    "ProtocolError",
    "StepRequest",
    "StepResponse",
    "WireError",
]


class RemoteError(RuntimeError):
    """A peer refused or failed a request; the message is the peer's own, prefixed with who said it."""

    def __init__(self, peer: str, kind: str, message: str):
        super().__init__(f"peer {peer}: {kind}: {message}")
        self.peer, self.kind, self.message = peer, kind, message


def error_to_wire(exc: BaseException) -> dict:
    """An error as the caller will see it. Only the type name and message travel, never a traceback."""
    return {"v": PROTOCOL_VERSION, "error": {"type": type(exc).__name__, "message": str(exc)[:4096]}}


def raise_if_error(msg: Any, peer: str) -> None:
    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
        err = msg["error"]
        raise RemoteError(peer, str(err.get("type", "Error"))[:64], str(err.get("message", ""))[:4096])
