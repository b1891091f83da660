"""Steady decode steps: a session's next request decoded by refilling the last one's tensors.

At decode time a session sends a peer the same message step after step but for its `step` number and the
values of its tensors (the hidden state, rotary cos/sin, position ids): the same tree, the same tensor
shapes. Decoding it in full walks the tree, checks every node and field, and builds every tensor anew:
~50 µs back to back, ~200 µs in a peer that waited for its turn (docs/performance.md), on every hop of
every token. Here a peer remembers, per caller and session, the last request it decoded in full, and
decodes the next one by comparing bytes: when the metadata is the remembered one's byte for byte, but for
a `step` one higher, and every tensor proto declares the same dtype, shape and byte count, the remembered
request is the decoded one; its tensors get the new bytes copied in and its `step` (and, for a pushed step,
the tensors passed on) are set. Nothing that was not checked in full before is ever run: the bytes are the
same, and a difference of any kind is a miss, decoded in full as before (which reports what is wrong).

Protocol 4 makes the steps of a session the same bytes: the client writes `step` as its request's last key
(`StepRequest.to_wire`), and the later hops' packed requests carry none (the peer before writes it in,
last: `swarm.chain.plan_forward`). A message whose `step` is not its last key is decoded in full every time.

Only what can be refilled in place is remembered: uncompressed tensors that are not bit-packed and not bool
(those are rebuilt, not copied), of requests of at most `max_request_bytes`, in a session, not opening it.
The remembered tensors are this peer's own; if anything kept one after a step (a cache holding an argument,
a block returning its input), refilling it would change what was kept, so after every step the tensors'
reference counts are compared with those right after their decode, and a template whose tensors are held
elsewhere is dropped instead. Templates are few and small: at most `max_entries`, the least recently used
dropped first.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack
import torch

from swarm.chain import FORWARDED_KEYS
from swarm.protocol import ChainLink, StepRequest
from swarm.wire import DEFAULT_LIMITS, Limits, RawTensor, decode, parse_message

_STEP_KEY = msgpack.packb("step")  # b"\xa4step": the key `step` is written last, its int right after it
# msgpack's shortest encodings of a non-negative int, by their first byte: (bytes after the key, payload bytes)
_INT_TAILS = ((1, 0), (2, 1), (3, 2), (5, 4))
_INT_MARKERS = {1: 0xCC, 2: 0xCD, 4: 0xCE}


def _tail_step(metadata: bytes) -> tuple[bytes, int] | None:
    """(the metadata up to and including the last key `step`, the step) when `step` is written last."""
    for size, payload in _INT_TAILS:
        head = len(metadata) - size
        if head < len(_STEP_KEY) or metadata[head - len(_STEP_KEY):head] != _STEP_KEY:
            continue
        first = metadata[head]
        if payload == 0:
            if first < 0x80:
                return metadata[:head], first
        elif first == _INT_MARKERS[payload]:
            return metadata[:head], int.from_bytes(metadata[head + 1:], "big")
    return None


@dataclass(eq=False)
class _Template:
    request: StepRequest  # the request as decoded in full, refilled in place at each hit
    signature: list[tuple]  # per tensor proto: (dtype name, shape, compression, requires_grad, bytes)
    built: list[tuple[int, torch.Tensor]]  # the request's own tensors, by their index in the message
    specs: list  # the message's tensor specs (all None: no bit-packed tensor)
    link_tensors: list[int] | None  # indices of `next.tensors`, passed on as they come
    trail: list[int] | None  # indices of `trail`
    refs: list[int] = field(default_factory=list)  # the built tensors' reference counts right after decode
    busy: bool = False  # a step of it is being run (set by a hit, cleared by `settle`)

    def counts(self) -> list[int]:
        return [sys.getrefcount(tensor) for _, tensor in self.built]


class SteadySteps:
    """`decode(data, owner)`: a step request, refilled from the caller's last one of the session when the bytes
    allow it, else decoded in full (and remembered); `settle(request)` once it has run."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_entries: int = 64, max_request_bytes: int = 64 * 1024):
        self.limits = limits
        self.max_entries = max_entries
        self.max_request_bytes = max_request_bytes
        self._templates: OrderedDict[tuple[str, bytes], _Template] = OrderedDict()
        self._by_request: dict[int, tuple[tuple[str, bytes], _Template]] = {}  # id(request) -> its template
        self._lock = threading.Lock()
        self.hits = 0  # requests refilled from a template (rpc_info: "steady_steps")
        self.dropped = 0  # templates dropped because something kept one of their tensors

    def decode(self, data: bytes, owner: str) -> StepRequest:
        message = parse_message(data, limits=self.limits)  # WireError for what is not a message at all
        tail = _tail_step(message.metadata) if len(data) <= self.max_request_bytes else None
        if tail is not None:
            request = self._refill(message, (owner, tail[0]), tail[1])
            if request is not None:
                return request
        built: dict[int, torch.Tensor] = {}
        request = StepRequest.from_wire(
            decode(message.tensors, message.metadata, limits=self.limits, raw_keys=FORWARDED_KEYS, built=built)
        )
        if tail is not None and tail[1] == request.step:
            self._remember((owner, tail[0]), message, request, built)
        return request

    def settle(self, request: StepRequest) -> None:
        """After `request` ran (or failed): its template may serve the next step unless a tensor of it is held
        elsewhere now."""
        with self._lock:
            found = self._by_request.get(id(request))
            if found is None or found[1].request is not request:
                return
            key, template = found
            template.busy = False
            if template.counts() != template.refs:
                self.dropped += 1
                self._forget(key)

    # ---- internals ------------------------------------------------------------------------------------

    def _refill(self, message, key: tuple[str, bytes], step: int) -> StepRequest | None:
        with self._lock:
            template = self._templates.get(key)
            if template is None or template.busy or step != template.request.step + 1 or step >= 1 << 31:
                return None
            protos = message.tensors
            if len(protos) != len(template.signature):
                return None
            buffers = []
            for proto, signature in zip(protos, template.signature):
                buffer = proto.buffer  # a copy out of the proto: read once
                if (proto.dtype, tuple(proto.size), proto.compression, proto.requires_grad, len(buffer)) != signature:
                    return None
                buffers.append(buffer)
            for i, tensor in template.built:
                ctypes.memmove(tensor.data_ptr(), buffers[i], len(buffers[i]))
            request = template.request
            request.step = step
            if template.link_tensors is not None:
                link = request.next
                request.next = ChainLink(link.peer, [RawTensor(protos[i], None) for i in template.link_tensors],
                                         link.request, link.hops)
            if template.trail is not None:
                request.trail = [RawTensor(protos[i], None) for i in template.trail]
            template.busy = True
            self._templates.move_to_end(key)
            self.hits += 1
            return request

    def _remember(self, key: tuple[str, bytes], message, request: StepRequest, built: dict[int, torch.Tensor]) -> None:
        if request.session_id is None or request.new_session:
            return
        protos = message.tensors
        signature, buffers = [], []
        for proto in protos:
            buffer = proto.buffer
            signature.append((proto.dtype, tuple(proto.size), proto.compression, proto.requires_grad, len(buffer)))
            buffers.append(buffer)
        top = msgpack.unpackb(message.metadata, raw=False)  # decoded in full just now: well formed
        specs, tree = top[1], top[2]
        if next(reversed(tree), None) != "step":
            return  # the bytes at the end are not the request's own step (a nested map's, a repeated key's)
        if any(spec is not None for spec in specs) or any(s[2] != 0 or s[3] for s in signature):
            return  # bit-packed or compressed: rebuilt, not copied
        if not _copyable(built, buffers):
            return
        link = tree.get("next")
        link_tensors = _indices(link.get("tensors")) if isinstance(link, dict) else None
        trail = _indices(tree.get("trail")) if "trail" in tree else None
        template = _Template(request, signature, sorted(built.items()), specs, link_tensors, trail)
        built.clear()  # the template's counts are taken with only the request and the template holding its tensors
        with self._lock:
            template.refs = template.counts()
            old = self._templates.pop(key, None)
            if old is not None:
                self._by_request.pop(id(old.request), None)
            self._templates[key] = template
            self._by_request[id(request)] = (key, template)
            template.busy = True  # it runs now; `settle` frees it
            while len(self._templates) > self.max_entries:
                self._forget(next(iter(self._templates)))

    def _forget(self, key: tuple[str, bytes]) -> None:
        template = self._templates.pop(key, None)
        if template is not None:
            self._by_request.pop(id(template.request), None)

    def __len__(self) -> int:
        return len(self._templates)


def _copyable(built: dict[int, torch.Tensor], buffers: list[bytes]) -> bool:
    """Whether every built tensor is plain memory holding exactly its proto's bytes (a bool tensor is normalised,
    a legacy bf16 one converted: rebuilt, not copied)."""
    return all(
        tensor.dtype is not torch.bool and tensor.device.type == "cpu" and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == len(buffers[i])
        for i, tensor in built.items()
    )


def _indices(node) -> list[int]:
    """The message indices of a tensor-list node in wire form (``[0, [2, i], [2, j], ...]``), checked by the decode."""
    return [item[1] for item in node[1:]]
