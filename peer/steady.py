"""Steady decode steps: a session's next request decoded by refilling the last one's tensors.

At decode time a session sends a peer the same message step after step but for its `step` number and the
values of its tensors (the hidden state, rotary cos/sin, position ids): the same tree, the same tensor
shapes. Decoding it in full walks the tree, checks every node and field, and builds every tensor anew:
~50 µs back to back, ~200 µs in a peer that waited for its turn (docs/performance.md), on every hop of
every token, and so does building the next hop's request and the last hop's reply. Here a peer remembers,
per caller and session, the last request it decoded in full, and recognises the next one by its bytes: the
same protobuf framing, every tensor with the same fields but for its buffer's content, and the metadata the
remembered one's byte for byte but for a `step` one higher. Then the remembered request is the decoded one:
its tensors get the new bytes copied in and its `step` (and, for a pushed step, the tensors passed on) are
set. Nothing is run that was not checked in full before: the bytes that differ are tensor contents and the
step, and a difference of any other kind is a miss, decoded in full as before (which reports what is wrong).

The same holds for what the step sends on. A pushed step's next request, and a last hop's reply kept for the
client (tail delivery), are the same bytes at every step but for the tensors and the step: the first time they
are built as ever (`swarm.chain`), and their framing is learnt from those bytes; after that they are put
together from the output's bytes, the tensors passed on (cut out of the request as they came) and that framing.
The result is byte for byte what `swarm.chain` would build (the tests compare them).

Protocol 4 makes the steps of a session the same bytes: the client writes `step` as its request's last key
(`StepRequest.to_wire`), and the later hops' packed requests carry none (the peer before writes it in, last:
`swarm.chain.plan_forward`). A message whose `step` is not its last key is decoded in full every time.

Only what can be refilled in place is remembered: uncompressed tensors that are not bit-packed and not bool
(those are rebuilt, not copied), of requests of at most `max_request_bytes`, in a session, not opening it,
in protobuf's canonical form. The remembered tensors are this peer's own; if anything kept one after a step
(a cache holding an argument, a block returning its input), refilling it would change what was kept, so after
every step the tensors' reference counts are compared with those right after their decode, and a template
whose tensors are held elsewhere is dropped instead. Templates are few and small: at most `max_entries`, the
least recently used dropped first.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack
import torch

from swarm.chain import FORWARDED_KEYS, Delivery, Forward, forward_timeout
from swarm.protocol import ChainLink, StepRequest
from swarm.wire import (
    BUFFER_TAG, DEFAULT_LIMITS, METADATA_TAG, TENSORS_TAG, Limits, RawTensor, decode, message_fields, parse_message, varint,
)

_STEP_KEY = msgpack.packb("step")  # b"\xa4step": the key `step` is written last, its int right after it
# msgpack's encodings of a non-negative int: (bytes after the key, payload bytes); the first byte tells which
_INT_TAILS = ((1, 0), (2, 1), (3, 2), (5, 4))
_INT_MARKERS = {1: 0xCC, 2: 0xCD, 4: 0xCE}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _packed_step(step: int) -> bytes:
    """`msgpack.packb(step)` for a step (0 <= step < 2**31), without msgpack's code: one less library on the path
    of a process that has been waiting (docs/performance.md)."""
    if step < 0x80:
        return bytes((step,))
    if step < 0x100:
        return b"\xcc" + bytes((step,))
    if step < 0x10000:
        return b"\xcd" + step.to_bytes(2, "big")
    return b"\xce" + step.to_bytes(4, "big")


def _tail_step(metadata: bytes) -> tuple[bytes, int] | None:
    """(the metadata up to and including its last key `step`, the step) when `step` is written last."""
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
    tensors: list[tuple[bytes, int, bytes]]  # per tensor proto: (its buffer field's tag and length, length, the rest)
    built: list[tuple[int, torch.Tensor]]  # the request's own tensors, by their index in the message
    link_tensors: list[int] | None  # indices of `next.tensors`, passed on as they come
    trail: list[int] | None  # indices of `trail`
    refs: list[int] = field(default_factory=list)  # the built tensors' reference counts right after decode
    busy: bool = False  # a step of it is being run (set by a hit, cleared by `settle`)
    hit: bool = False  # the step now running was refilled (its `fields` are this step's)
    fields: list = field(default_factory=list)  # this step's request: its tensors' fields (tag start, end)
    data: bytes = b""  # ... in these bytes
    sends: tuple[bytes, int] | None = None  # what it sends on, learnt: (the metadata before its step, tensor count)
    sends_tried: bool = False  # learning was tried (once: a request that cannot be learnt is built by swarm.chain)
    out_rest: dict = field(default_factory=dict)  # (dtype, shape) -> the output proto's fields after its buffer

    def counts(self) -> list[int]:
        """The built tensors' reference counts, less those the runner's prepared arguments hold (`StepRequest.prepared`,
        kept with the request on purpose)."""
        held = _tensor_ids(self.request.prepared[1]) if self.request.prepared is not None else {}
        return [sys.getrefcount(tensor) - held.get(id(tensor), 0) for _, tensor in self.built]


class SteadySteps:
    """`decode(data, owner)`: a step request, refilled from the caller's last one of the session when the bytes
    allow it, else decoded in full (and remembered); `forward`/`deliver` what a refilled step sends on;
    `settle(request)` once it has run."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_entries: int = 64, max_request_bytes: int = 64 * 1024):
        self.limits = limits
        self.max_entries = max_entries
        self.max_request_bytes = max_request_bytes
        self._templates: OrderedDict[tuple[str, bytes], _Template] = OrderedDict()
        self._by_request: dict[int, tuple[tuple[str, bytes], _Template]] = {}  # id(request) -> its template
        self._lock = threading.Lock()
        self.hits = 0  # requests refilled from a template (rpc_info: "steady_steps")
        self.dropped = 0  # templates dropped because something kept one of their tensors
        self.assembled = 0  # next requests and kept replies put together from learnt framing

    # ---- decode ---------------------------------------------------------------------------------------

    def decode(self, data: bytes, owner: str) -> StepRequest:
        fields = message_fields(data) if len(data) <= self.max_request_bytes and type(data) is bytes else None
        tail = None
        if fields and fields[-1][0] == METADATA_TAG:
            tail = _tail_step(data[fields[-1][2]:fields[-1][3]])
            if tail is not None:
                request = self._refill(data, fields, (owner, tail[0]), tail[1])
                if request is not None:
                    return request
        message = parse_message(data, limits=self.limits)  # WireError for what is not a message at all
        built: dict[int, torch.Tensor] = {}
        request = StepRequest.from_wire(
            decode(message.tensors, message.metadata, limits=self.limits, raw_keys=FORWARDED_KEYS, built=built)
        )
        if tail is not None and tail[1] == request.step:
            self._remember((owner, tail[0]), data, fields, message, request, built)
        return request

    def settle(self, request: StepRequest) -> None:
        """After `request` ran (or failed): its template may serve the next step unless a tensor of it is held
        elsewhere now."""
        with self._lock:
            found = self._by_request.get(id(request))
            if found is None or found[1].request is not request:
                return
            key, template = found
            template.busy = template.hit = False
            template.fields, template.data = [], b""
            if template.counts() != template.refs:
                self.dropped += 1
                self._forget(key)

    def _refill(self, data: bytes, fields: list, key: tuple[str, bytes], step: int) -> StepRequest | None:
        with self._lock:
            template = self._templates.get(key)
            if template is None or template.busy or step != template.request.step + 1 or step >= 1 << 31:
                return None
            tensor_fields = fields[:-1]
            if len(tensor_fields) != len(template.tensors):
                return None
            for (tag, _, start, end), (head, size, rest) in zip(tensor_fields, template.tensors):
                if (tag != TENSORS_TAG or end - start != len(head) + size + len(rest) or not data.startswith(head, start)
                        or data[start + len(head) + size:end] != rest):
                    return None
            for i, tensor in template.built:
                head, size, _ = template.tensors[i]
                at = tensor_fields[i][2] + len(head)
                ctypes.memmove(tensor.data_ptr(), data[at:at + size], size)
            request = template.request
            request.step = step
            if template.link_tensors is not None:
                link = request.next
                request.next = ChainLink(link.peer, [_cut(data, tensor_fields[i]) for i in template.link_tensors],
                                         link.request, link.hops)
            if template.trail is not None:
                request.trail = [_cut(data, tensor_fields[i]) for i in template.trail]
            template.busy = template.hit = True
            template.fields, template.data = tensor_fields, data
            self._templates.move_to_end(key)
            self.hits += 1
            return request

    def _remember(self, key: tuple[str, bytes], data: bytes, fields: list, message, request: StepRequest,
                  built: dict[int, torch.Tensor]) -> None:
        if request.session_id is None or request.new_session:
            return
        if data != message.SerializeToString():
            return  # not protobuf's canonical form: what the bytes mean is left to the full decode every time
        protos = message.tensors
        tensors = []
        for (tag, _, start, end), proto in zip(fields[:-1], protos):
            buffer = proto.buffer
            head = BUFFER_TAG.to_bytes(1, "big") + varint(len(buffer)) if buffer else b""
            if tag != TENSORS_TAG or proto.compression != 0 or proto.requires_grad or not data.startswith(head, start):
                return  # not a tensor field, compressed, or its buffer not first: decoded in full every time
            tensors.append((head, len(buffer), data[start + len(head) + len(buffer):end]))
        top = msgpack.unpackb(message.metadata, raw=False)  # decoded in full just now: well formed
        specs, tree = top[1], top[2]
        if next(reversed(tree), None) != "step":
            return  # the bytes at the end are not the request's own step (a nested map's, a repeated key's)
        if any(spec is not None for spec in specs) or not _copyable(built, tensors):
            return  # bit-packed, bool or converted tensors: rebuilt, not copied
        link = tree.get("next")
        link_tensors = _indices(link.get("tensors")) if isinstance(link, dict) else None
        trail = _indices(tree.get("trail")) if "trail" in tree else None
        template = _Template(request, tensors, sorted(built.items()), link_tensors, trail)
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

    # ---- what a refilled step sends on ----------------------------------------------------------------

    def forward(self, request: StepRequest, hidden: torch.Tensor) -> Forward | None:
        """A refilled pushed step's next request, put together from learnt framing; None: `swarm.chain` builds it
        (and, the first time, this learns from what it built: `learn`)."""
        template = self._running(request)
        if template is None or template.sends is None or request.next is None:
            return None
        passed = (*template.link_tensors, *(template.trail or ()))
        built = self._assemble(template, hidden, passed, template.sends[0] + _packed_step(request.step))
        if built is None:
            return None
        out, data = built
        return Forward(request.next.peer, RawTensor(serialized=out), data, None, forward_timeout(request))

    def deliver(self, request: StepRequest, hidden: torch.Tensor, owner: str) -> Delivery | None:
        """A refilled last hop's reply for the client (tail delivery), as `forward`."""
        template = self._running(request)
        if template is None or template.sends is None or request.trail is None:
            return None
        built = self._assemble(template, hidden, template.trail, template.sends[0])
        if built is None:
            return None
        return Delivery(request.session_id, request.step, request.owner or owner, built[1])

    def reply(self, request: StepRequest, hidden: torch.Tensor) -> bytes | None:
        """A refilled step's own reply (a step neither pushed on nor delivered: a one-peer route, or no push), as
        `deliver`: the reply to a decode step is the same bytes at every step but for its output."""
        template = self._running(request)
        if template is None or template.sends is None or request.next is not None or request.tail:
            return None
        built = self._assemble(template, hidden, (), template.sends[0])
        return None if built is None else built[1]

    def _assemble(self, template: _Template, hidden: torch.Tensor, passed: tuple | list, metadata: bytes):
        """(the output's proto bytes, the message: the output, then the request's tensors `passed` as they came, then
        `metadata`), or None when the learnt framing does not fit."""
        out = self._output(template, hidden)
        if out is None or 1 + len(passed) != template.sends[1]:
            return None
        data = template.data
        parts = [TENSORS_TAG.to_bytes(1, "big") + varint(len(out)) + out]
        parts += [data[template.fields[i][1]:template.fields[i][3]] for i in passed]
        parts.append(METADATA_TAG.to_bytes(1, "big") + varint(len(metadata)) + metadata)
        self.assembled += 1
        return out, b"".join(parts)

    def learn(self, request: StepRequest, sent: bytes, reply: bool = False) -> None:
        """What was built for a remembered request (by `swarm.chain`: its next request, or its reply kept for the
        client; or, `reply`, its own reply): the framing later steps reuse, when it is one this module reproduces
        exactly."""
        template = self._running(request, hit=False)
        if template is None or template.sends_tried or (reply and (request.next is not None or request.tail)):
            return  # (a pushed or delivered step's framing is what it sends on, never its own reply's)
        template.sends_tried = True
        fields = message_fields(sent)
        if not fields or fields[-1][0] != METADATA_TAG or any(f[0] != TENSORS_TAG for f in fields[:-1]):
            return
        metadata = sent[fields[-1][2]:fields[-1][3]]
        top = msgpack.unpackb(metadata, raw=False)
        if any(spec is not None for spec in top[1]):
            return  # the output went bit-packed (all zeros?): later outputs go raw, the framing would differ
        if request.tail or reply:
            if "step" not in top[2] and (not reply or len(fields) == 2):  # a reply of the output alone
                template.sends = (metadata, len(fields) - 1)  # a reply: the same bytes at every step
            return
        tail = _tail_step(metadata)
        if tail is not None and tail[1] == request.step and next(reversed(top[2]), None) == "step":
            template.sends = (tail[0], len(fields) - 1)

    def _running(self, request: StepRequest, hit: bool = True) -> _Template | None:
        found = self._by_request.get(id(request))
        if found is None or found[1].request is not request or not found[1].busy or found[1].hit is not hit:
            return None
        return found[1]

    @staticmethod
    def _output(template: _Template, hidden: torch.Tensor) -> bytes | None:
        """The output's proto, serialized: its raw bytes (as `swarm.wire` writes a contiguous CPU tensor), or None
        for one that `swarm.wire` would write otherwise."""
        name = _DTYPE_NAMES.get(hidden.dtype)
        if name is None or hidden.device.type != "cpu" or not hidden.is_contiguous() or hidden.is_neg() or not hidden.numel():
            return None
        shape = tuple(hidden.shape)
        rest = template.out_rest.get((name, shape))
        if rest is None:
            from hivemind.proto import runtime_pb2

            rest = template.out_rest[(name, shape)] = runtime_pb2.Tensor(size=shape, dtype=name).SerializeToString()
        size = hidden.numel() * hidden.element_size()
        return BUFFER_TAG.to_bytes(1, "big") + varint(size) + ctypes.string_at(hidden.data_ptr(), size) + rest


def _tensor_ids(value, out: dict | None = None) -> dict[int, int]:
    """How many times each tensor (by id) appears in a structure of tuples, lists and dicts."""
    out = {} if out is None else out
    if isinstance(value, torch.Tensor):
        out[id(value)] = out.get(id(value), 0) + 1
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensor_ids(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensor_ids(item, out)
    return out


def _cut(data: bytes, field_: tuple[int, int, int, int]) -> RawTensor:
    """A tensor passed on as it came: its proto's bytes, parsed only if something asks for the proto."""
    return RawTensor(serialized=data[field_[2]:field_[3]])


def _copyable(built: dict[int, torch.Tensor], tensors: list[tuple[bytes, int, bytes]]) -> bool:
    """Whether every built tensor is plain memory holding exactly its proto's bytes (a bool tensor is normalised,
    a legacy bf16 one converted: rebuilt, not copied)."""
    return all(
        tensor.dtype is not torch.bool and tensor.device.type == "cpu" and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == tensors[i][1]
        for i, tensor in built.items()
    )


def _indices(node) -> list[int]:
    """The message indices of a tensor-list node in wire form (``[0, [2, i], [2, j], ...]``), checked by the decode."""
    return [item[1] for item in node[1:]]
