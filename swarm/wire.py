"""The wire codec every client <-> peer message uses.

A message is a nested Python structure: the per-layer args/kwargs a transformers model passes to its
decoder blocks, the hidden states, and small metadata. `encode` turns it into
``(tensors, metadata)``: a list of hivemind ``runtime_pb2.Tensor`` protos (hivemind's tensor codec,
so hivemind's streaming helpers can split them) and one msgpack blob that holds the structure, in
which every tensor is a reference to its proto by index. `decode` reverses it. The format is
described in ``docs/wire.md``.

Why not pickle or hivemind's MSGPackSerializer: the peer decodes bytes from untrusted clients, so
the decoder accepts a closed set of types, checks every declared shape against the bytes that back
it and against `Limits` *before* allocating, and reports every problem as one exception type:

- `WireError` (a ``ValueError``): malformed or oversized input on decode. The message carries the
  numbers (index, shape, sizes, the limit). Lower-level errors (msgpack, protobuf, numpy) are
  converted at this boundary with ``raise WireError(...) from exc``.
- ``TypeError`` (encode only): the structure holds an object the wire cannot carry; the message
  names the path, e.g. ``kwargs['foo'][2]: cannot send object of type Bar``.
- ``ValueError`` (encode only): the structure is sendable in kind but not in size (nesting too deep,
  a tensor over the limits, an int outside 64 bits); the receiver would refuse it anyway.

Bandwidth decisions: tensors are deduplicated by identity (the rotary cos/sin every layer shares
travel once); bool tensors and additive attention masks (only ``0`` and one fill value) travel as
bits; other float32/float64 tensors can be sent as 16-bit floats on request
(``activation_compression``).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from typing import Any, Callable, NoReturn

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

__all__ = [
    "CacheRef",
    "Limits",
    "RawTensor",
    "RepeatDecoder",
    "RepeatEncoder",
    "WireError",
    "decode",
    "decode_message",
    "encode",
    "encode_message",
    "encode_tree",
    "message_fields",
    "message_from_tree",
    "parse_message",
    "unpack_tree",
    "raw_tensor",
    "skeleton",
    "tensor_list",
    "varint",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1  # first element of the metadata; bump on any incompatible change

_NONE = runtime_pb2.CompressionType.NONE
_FLOAT16 = runtime_pb2.CompressionType.FLOAT16
_MEANSTD_16BIT = runtime_pb2.CompressionType.MEANSTD_16BIT

# Compressions a caller may ask for. hivemind 1.1.12 also offers QUANTILE_8BIT and UNIFORM_8BIT, but
# their decoder calls int() on a 1-element array, which numpy >= 2 rejects, and BLOCKWISE_8BIT needs
# bitsandbytes: none of them would decode on our peers, so they are refused on both sides.
_ACCEPTED_COMPRESSIONS = frozenset({_NONE, _FLOAT16, _MEANSTD_16BIT})
# Only these dtypes are compressed to 16 bits. fp16/bf16 already are; and hivemind's 16-bit
# decoders would scale a float16 result in place inside the read-only proto buffer.
_COMPRESSIBLE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}

# Tensor dtypes that travel, by the name hivemind writes into ``Tensor.dtype``.
_TENSOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# the same dtypes in numpy (native byte order, as torch's memory), where numpy has them (not bfloat16)
_NUMPY_DTYPES: dict[torch.dtype, type] = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8,
}
_TENSOR_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _TENSOR_DTYPES.items()}
_ITEMSIZE: dict[str, int] = {
    name: torch.empty((), dtype=dtype).element_size() for name, dtype in _TENSOR_DTYPES.items()
}

# Any torch.dtype may travel as a *value* (e.g. a ``dtype=`` kwarg), by its name.
_DTYPE_VALUES: dict[str, torch.dtype] = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
}
_DTYPE_VALUE_NAMES: dict[torch.dtype, str] = {}
for _name, _dtype in sorted(_DTYPE_VALUES.items()):  # aliases (torch.float/float32): keep the canonical name
    if str(_dtype) == f"torch.{_name}" or _dtype not in _DTYPE_VALUE_NAMES:
        _DTYPE_VALUE_NAMES[_dtype] = _name

# Node tags of the metadata tree: each non-native node is a msgpack array whose first element is one.
_TAG_LIST, _TAG_TUPLE, _TAG_TENSOR, _TAG_DTYPE, _TAG_CACHE = 0, 1, 2, 3, 4

# Bit-packed tensors: the value a set bit stands for (a clear bit is 0 / False).
_FILL_BOOL, _FILL_FINFO_MIN, _FILL_NEG_INF = 0, 1, 2


@dataclass(frozen=True)
class _MaskFormat:
    """How a float dtype's additive masks are recognised (on integer views, so -0.0 and NaN never pass)."""

    int_dtype: torch.dtype  # same-width integer dtype to compare bit patterns
    fills: dict[int, int]  # fill code -> bit pattern of the fill value (as a signed int)
    values: dict[int, float]  # fill code -> the fill value itself


def _bit_pattern(value: float, dtype: torch.dtype, int_dtype: torch.dtype) -> int:
    return int(torch.tensor(value, dtype=dtype).view(int_dtype).item())


_MASK_FORMATS: dict[torch.dtype, _MaskFormat] = {}
for _dtype, _int_dtype in (
    (torch.float16, torch.int16),
    (torch.bfloat16, torch.int16),
    (torch.float32, torch.int32),
    (torch.float64, torch.int64),
):
    _values = {_FILL_FINFO_MIN: torch.finfo(_dtype).min, _FILL_NEG_INF: -math.inf}
    _MASK_FORMATS[_dtype] = _MaskFormat(
        _int_dtype, {code: _bit_pattern(v, _dtype, _int_dtype) for code, v in _values.items()}, _values
    )

_GIB = 1 << 30
_MIB = 1 << 20


class WireError(ValueError):
    """Malformed or oversized input met on decode; the message says which part, with the numbers.

    Raised for everything a remote peer can get wrong, so a handler can catch this one type, answer
    the caller with ``str(exc)``, and keep serving. The original low-level exception, if any, is
    chained as ``__cause__``.
    """


@dataclass(frozen=True)
class CacheRef:
    """A KV-cache object inside a message: the cache stays on the peer, the wire carries its session."""

    session_id: str  # the inference session whose cache this stands for


class RawTensor:
    """A tensor passed on without being decoded: its proto and bit-packing spec exactly as received.

    `decode(..., raw_tensors=True)` yields these instead of tensors, and `encode` writes them back as they
    came. A peer forwarding a pushed step uses this to hand the client's arguments and its own output on
    to the next peer without building or re-serializing tensors; the next peer decodes and checks them.
    One may also hold the proto's serialized bytes instead (`serialized=`, as `peer.steady` cuts them out of
    a message): the proto is then parsed only if something asks for it.
    """

    __slots__ = ("_proto", "spec", "_serialized")

    def __init__(self, proto: runtime_pb2.Tensor | None = None, spec: Any = None, *, serialized: bytes | None = None):
        if proto is None and serialized is None:
            raise ValueError("a RawTensor needs its proto or the proto's serialized bytes")
        self._proto = proto
        self.spec = spec  # None, or [shape, dtype, fill] for a bit-packed tensor (unchecked: the receiver checks it)
        self._serialized = serialized

    @property
    def proto(self) -> runtime_pb2.Tensor:
        if self._proto is None:
            self._proto = runtime_pb2.Tensor.FromString(self._serialized)
        return self._proto

    @property
    def serialized(self) -> bytes:
        """The proto's bytes, as they appear in a message (`ExpertRequest.tensors`)."""
        if self._serialized is None:
            self._serialized = self._proto.SerializeToString()
        return self._serialized


@dataclass(frozen=True)
class Limits:
    """What `decode` accepts. Sizes count *decoded* bytes, so a bit-packed mask pays its full size."""

    max_tensors: int = 4096  # tensor protos per message (count)
    max_tensor_bytes: int = _GIB  # decoded size of any one tensor (bytes)
    max_total_bytes: int = 2 * _GIB  # decoded size of all tensors of a message together (bytes)
    max_metadata_bytes: int = 8 * _MIB  # size of the msgpack metadata blob (bytes)
    max_depth: int = 32  # nesting of containers (list/tuple/dict) in the structure (levels)
    max_ndim: int = 8  # dimensions of any one tensor (count)

    def __post_init__(self) -> None:
        for field in fields(self):
            name, value = field.name, getattr(self, field.name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = Limits()


# ----------------------------------------------------------------------------------------------- encode


class _PathError(Exception):
    """Internal: an encode/decode problem found deep in the structure; container frames add the path."""

    def __init__(self, kind: type[Exception], message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.segments: list[str | int] = []  # innermost first; reversed when formatted

    def path(self) -> str:
        parts = []
        for i, segment in enumerate(reversed(self.segments)):
            if i == 0 and isinstance(segment, str) and segment.isidentifier():
                parts.append(segment)  # a top-level key reads as a name: kwargs['foo'][2]
            else:
                parts.append(f"[{segment!r}]")
        return "".join(parts) or "<message>"


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack carries
_NATIVE_LEAVES = frozenset({type(None), bool, float, str, bytes})  # sent as they are (ints: after a range check)
_DECODED_LEAVES = frozenset({type(None), bool, float, str, bytes, int})  # msgpack values that decode as themselves


class _Encoder:
    """State of one `encode` call: the protos so far and the identity -> index map that dedups them."""

    __slots__ = ("protos", "specs", "index_by_id", "compression", "limits", "total_bytes", "serialize")

    def __init__(self, compression: int | None, limits: Limits, serialize: bool = True) -> None:
        self.serialize = serialize  # False: tensors are only numbered (`protos` holds them as given)
        self.protos: list[runtime_pb2.Tensor] = []
        self.specs: list[list | None] = []
        self.index_by_id: dict[int, int] = {}  # id(tensor) -> proto index; the structure keeps ids alive
        self.compression = compression
        self.limits = limits
        self.total_bytes = 0

    def node(self, obj: Any, depth: int) -> Any:
        """Return the msgpack-native form of ``obj``; ``depth`` counts the containers around it."""
        tp = type(obj)
        if tp in _NATIVE_LEAVES:
            return obj
        if tp is int:
            if not _INT_MIN <= obj <= _INT_MAX:
                raise _PathError(ValueError, f"cannot send int {obj}: outside the 64-bit range msgpack carries")
            return obj
        if tp is dict or tp is list or tp is tuple:
            if depth >= self.limits.max_depth:
                raise _PathError(
                    ValueError, f"nesting deeper than {self.limits.max_depth} containers (Limits.max_depth); a cycle?"
                )
            if tp is dict:
                out_map = {}
                for key, value in obj.items():
                    if type(key) is not str:
                        raise _PathError(
                            TypeError, f"cannot send dict key {key!r} of type {type(key).__qualname__}: keys must be str"
                        )
                    if type(value) in _NATIVE_LEAVES:  # leaves are most nodes: no call for them
                        out_map[key] = value
                        continue
                    try:
                        out_map[key] = self.node(value, depth + 1)
                    except _PathError as exc:
                        exc.segments.append(key)
                        raise
                return out_map
            out = [_TAG_LIST if tp is list else _TAG_TUPLE]
            for i, item in enumerate(obj):
                if type(item) in _NATIVE_LEAVES:
                    out.append(item)
                    continue
                try:
                    out.append(self.node(item, depth + 1))
                except _PathError as exc:
                    exc.segments.append(i)
                    raise
            return out
        if isinstance(obj, torch.Tensor):  # nn.Parameter and other subclasses travel as plain tensors
            index = self.index_by_id.get(id(obj))
            if index is None:
                if self.serialize:
                    index = self.add_tensor(obj)
                else:
                    self.protos.append(obj)
                    self.specs.append(None)
                    index = len(self.protos) - 1
                self.index_by_id[id(obj)] = index
            return [_TAG_TENSOR, index]
        if tp is RawTensor:
            index = self.index_by_id.get(id(obj))
            if index is None:
                if len(self.protos) >= self.limits.max_tensors:
                    raise _PathError(ValueError, f"more than {self.limits.max_tensors} distinct tensors (Limits.max_tensors)")
                self.protos.append(obj.proto)
                self.specs.append(obj.spec)
                index = self.index_by_id[id(obj)] = len(self.protos) - 1
            return [_TAG_TENSOR, index]
        if tp is torch.dtype:
            return [_TAG_DTYPE, _DTYPE_VALUE_NAMES[obj]]
        if tp is CacheRef:
            if type(obj.session_id) is not str:
                raise _PathError(TypeError, f"CacheRef.session_id must be str, got {type(obj.session_id).__qualname__}")
            return [_TAG_CACHE, obj.session_id]
        type_name = tp.__qualname__ if tp.__module__ == "builtins" else f"{tp.__module__}.{tp.__qualname__}"
        raise _PathError(TypeError, f"cannot send object of type {type_name}")

    def add_tensor(self, tensor: torch.Tensor) -> int:
        """Serialize one tensor, append its proto, return its index."""
        limits = self.limits
        name = _TENSOR_DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            supported = ", ".join(_TENSOR_DTYPES)
            raise _PathError(TypeError, f"cannot send a tensor of dtype {tensor.dtype}; supported: {supported}")
        if tensor.layout is not torch.strided:
            raise _PathError(TypeError, f"cannot send a tensor with layout {tensor.layout}; call .to_dense() first")
        if tensor.device.type != "cpu":
            if tensor.device.type == "meta":
                raise _PathError(TypeError, "cannot send a meta tensor: it has no data")
            tensor = tensor.detach().cpu()
        elif tensor.requires_grad:
            tensor = tensor.detach()  # the wire carries no autograd state
        if len(self.protos) >= limits.max_tensors:
            raise _PathError(ValueError, f"more than {limits.max_tensors} distinct tensors (Limits.max_tensors)")
        if tensor.ndim > limits.max_ndim:
            raise _PathError(
                ValueError, f"tensor has {tensor.ndim} dimensions, limit is {limits.max_ndim} (Limits.max_ndim)"
            )
        numel = tensor.numel()
        nbytes = numel * _ITEMSIZE[name]
        if nbytes > limits.max_tensor_bytes:
            raise _PathError(
                ValueError,
                f"tensor of shape {tuple(tensor.shape)} and dtype {name} is {nbytes} bytes, "
                f"limit is {limits.max_tensor_bytes} (Limits.max_tensor_bytes); split it",
            )
        self.total_bytes += nbytes
        if self.total_bytes > limits.max_total_bytes:
            raise _PathError(
                ValueError,
                f"tensors add up to {self.total_bytes} bytes, limit is {limits.max_total_bytes} (Limits.max_total_bytes)",
            )

        proto, spec = _serialize(tensor, name, self.compression)
        self.protos.append(proto)
        self.specs.append(spec)
        return len(self.protos) - 1


def _serialize(tensor: torch.Tensor, name: str, compression: int | None) -> tuple[runtime_pb2.Tensor, list | None]:
    """One CPU tensor without grad -> (proto, bit-packing spec or None)."""
    if tensor.is_neg():  # a lazily negated view (`torch._neg_view`): its memory holds the values before negation
        tensor = tensor.resolve_neg()
    if tensor.dtype is torch.bool:
        return _packed_proto(tensor), [list(tensor.shape), "bool", _FILL_BOOL]
    mask_format = _MASK_FORMATS.get(tensor.dtype)
    if mask_format is not None and tensor.numel():
        found = _find_mask_bits(tensor, mask_format, _first_bits(tensor))
        if found is not None:
            bits, fill = found
            return _packed_proto(bits), [list(tensor.shape), name, fill]
        # MEANSTD_16BIT keeps a mean/std per row of the last dimension, so it needs one
        compressible = tensor.dtype in _COMPRESSIBLE_DTYPES and (tensor.ndim or compression == _FLOAT16)
        if compression is not None and compressible:
            return serialize_torch_tensor(tensor.contiguous(), compression), None
    return _raw_proto(tensor, name), None


def _raw_proto(tensor: torch.Tensor, name: str) -> runtime_pb2.Tensor:
    """hivemind's CompressionType.NONE format, built directly (`tensor`: on the CPU, no grad, no negated view).

    Same bytes as ``serialize_torch_tensor(tensor)`` with ``USE_LEGACY_BFLOAT16=0`` (hivemind's
    ``deserialize_torch_tensor`` reads it), but bf16 keeps 2 bytes per element instead of the legacy
    default's float32 upcast, and it skips the per-call descriptor objects (~6 us per tensor).
    A contiguous tensor's bytes are copied straight from its memory, in one copy and without a torch op
    (`.numpy()` runs four, and every op costs 10-30 us when the process has been waiting: the decode step's
    path, docs/performance.md); ``.numpy().tobytes()`` copies any other in C order, without ``.contiguous()``.
    """
    if tensor.is_contiguous():
        buffer = ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size()) if tensor.numel() else b""
    else:
        buffer = (tensor.view(torch.int16) if tensor.dtype is torch.bfloat16 else tensor).numpy().tobytes()
    return runtime_pb2.Tensor(compression=_NONE, buffer=buffer, size=tensor.shape, dtype=name)


def _first_bits(tensor: torch.Tensor) -> int:
    """The bit pattern of element (0, ..., 0) of a non-empty CPU tensor as a signed int (its integer view's value),
    read from memory without a torch op: `data_ptr` points at that element whatever the strides."""
    return int.from_bytes(ctypes.string_at(tensor.data_ptr(), tensor.element_size()), sys.byteorder, signed=True)


def _packed_proto(bits: torch.Tensor) -> runtime_pb2.Tensor:
    """A bool tensor as a 1-D uint8 proto of ``ceil(numel / 8)`` bytes (numpy packbits, C order, big-endian bits)."""
    packed = np.packbits(bits.numpy())  # flattens in C order whatever the strides
    return runtime_pb2.Tensor(compression=_NONE, buffer=packed.tobytes(), size=packed.shape, dtype="uint8")


def _find_mask_bits(tensor: torch.Tensor, fmt: _MaskFormat, first: int) -> tuple[torch.Tensor, int] | None:
    """If every element is +0 or one fill value, return (bits where fill, fill code); else None.

    Works on the integer view, so the rebuilt tensor is bitwise identical (-0.0 and NaN do not pass).
    The first element's bits (`first`, `_first_bits`) reject ordinary activations in O(1), without a torch
    op; a real mask then costs one compare pass (whose result is the bits to pack) plus two counts.
    """
    # additive masks built by transformers use finfo(dtype).min and are 4-D; anything else may use -inf
    candidates = (_FILL_FINFO_MIN, _FILL_NEG_INF) if tensor.ndim == 4 else (_FILL_NEG_INF,)
    as_int = nonzero = None
    for fill in candidates:
        pattern = fmt.fills[fill]
        if first != 0 and first != pattern:
            continue
        if as_int is None:  # a candidate: only now any torch op
            as_int = tensor.view(fmt.int_dtype)
            nonzero = int(torch.count_nonzero(as_int))
        bits = as_int == pattern
        # fill elements are nonzero, so equal counts mean every nonzero element is the fill
        if int(torch.count_nonzero(bits)) == nonzero:
            return bits, fill
    return None


def encode(
    obj: Any,
    *,
    activation_compression: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    indices: dict[int, int] | None = None,
) -> tuple[list[runtime_pb2.Tensor], bytes]:
    """Encode a nested structure into (tensor protos, msgpack metadata).

    ``activation_compression``: a ``runtime_pb2.CompressionType`` (FLOAT16 or MEANSTD_16BIT) applied to
    float32/float64 tensors that are not masks; bf16/fp16 are already 16-bit and go raw. None or NONE
    sends every tensor exactly. ``limits``: refuse here what a receiver with these limits would refuse.

    ``indices``, when given, receives each tensor's proto index by its ``id`` (`RepeatEncoder` refills them).

    Raises TypeError (with the path) for objects the wire cannot carry, ValueError for sizes over the limits.
    """
    if activation_compression is not None and activation_compression not in _ACCEPTED_COMPRESSIONS:
        raise ValueError(
            f"activation_compression={_compression_name(activation_compression)} is not supported: use FLOAT16 "
            "or MEANSTD_16BIT (hivemind 1.1.12's 8-bit decoders fail under numpy 2; BLOCKWISE_8BIT needs bitsandbytes)"
        )
    if activation_compression == _NONE:
        activation_compression = None
    encoder = _Encoder(activation_compression, limits)
    try:
        tree = encoder.node(obj, 0)
    except _PathError as exc:
        raise exc.kind(f"{exc.path()}: {exc.message}") from None
    metadata = msgpack.packb([FORMAT_VERSION, encoder.specs, tree], use_bin_type=True)
    if len(metadata) > limits.max_metadata_bytes:
        raise ValueError(
            f"metadata is {len(metadata)} bytes, limit is {limits.max_metadata_bytes} (Limits.max_metadata_bytes); "
            "send big values as tensors"
        )
    if indices is not None:
        indices.update(encoder.index_by_id)
    return encoder.protos, metadata


def encode_message(
    obj: Any,
    *,
    uid: str = "",
    activation_compression: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    indices: dict[int, int] | None = None,
) -> bytes:
    """`encode` packed into one serialized ``runtime_pb2.ExpertRequest`` (``uid`` is carried, not interpreted)."""
    tensors, metadata = encode(obj, activation_compression=activation_compression, limits=limits, indices=indices)
    return runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=metadata).SerializeToString()


def encode_tree(obj: Any, first: Sequence[torch.Tensor] = (), *, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, list]:
    """`obj`'s metadata tree alone, packed, with its tensors numbered but not serialized: `first` take
    indices 0, 1, ...; the others follow in order of first appearance. Returns (packed tree, the tensors
    in index order). A client packs a pushed step's later hops this way; the peer before each hop puts the
    tensors around the tree (`message_from_tree`) without decoding or re-encoding it (`swarm.chain`)."""
    encoder = _Encoder(None, limits, serialize=False)
    for tensor in first:
        encoder.index_by_id[id(tensor)] = len(encoder.protos)
        encoder.protos.append(tensor)
        encoder.specs.append(None)
    try:
        tree = encoder.node(obj, 0)
    except _PathError as exc:
        raise exc.kind(f"{exc.path()}: {exc.message}") from None
    return msgpack.packb(tree, use_bin_type=True), encoder.protos


def unpack_tree(tree: bytes) -> Any:
    """A packed tree (`encode_tree`) as msgpack values, its nodes still in wire form (tags, tensor indices):
    what a forwarding peer may amend before `message_from_tree`. ValueError for bytes that are not one
    msgpack value (they came from a client: the receiver of the result checks the rest)."""
    try:
        return msgpack.unpackb(tree, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - msgpack raises ValueError, TypeError, ...: all mean the same here
        raise ValueError(f"not a packed tree: {exc}") from None


def message_from_tree(tree: Any, tensors: Sequence[RawTensor], *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A message (as `encode_message` makes) from a tree in wire form (`unpack_tree`) and the tensors it
    refers to, already serialized: msgpack packs it, nothing is walked in Python. Raises ValueError for a
    result over the limits."""
    if len(tensors) > limits.max_tensors:
        raise ValueError(f"{len(tensors)} tensors, limit is {limits.max_tensors} (Limits.max_tensors)")
    metadata = msgpack.packb([FORMAT_VERSION, [t.spec for t in tensors], tree], use_bin_type=True)
    if len(metadata) > limits.max_metadata_bytes:
        raise ValueError(f"metadata is {len(metadata)} bytes, limit is {limits.max_metadata_bytes} (Limits.max_metadata_bytes)")
    return runtime_pb2.ExpertRequest(tensors=[t.proto for t in tensors], metadata=metadata).SerializeToString()


def tensor_list(indices: Sequence[int]) -> list:
    """The tree node (wire form) of a list of tensors `indices` of the message: for trees amended in place
    (`unpack_tree`, then `message_from_tree`)."""
    return [_TAG_LIST, *([_TAG_TENSOR, i] for i in indices)]


def raw_tensor(tensor: torch.Tensor, *, limits: Limits = DEFAULT_LIMITS) -> RawTensor:
    """`tensor` serialized once, to be embedded in several messages (`encode` writes a `RawTensor` as it is):
    a forwarding peer's output goes both to the next peer and into its own reply."""
    encoder = _Encoder(None, limits)
    try:
        encoder.add_tensor(tensor)
    except _PathError as exc:
        raise exc.kind(exc.message) from None
    return RawTensor(encoder.protos[0], encoder.specs[0])


# ----------------------------------------------------------------------------------------------- decode


def _compression_name(value: Any) -> str:
    try:
        return runtime_pb2.CompressionType.Name(value)
    except (ValueError, TypeError):
        return repr(value)


@dataclass(frozen=True)
class _Plan:
    """A validated tensor proto: what to build from it. Nothing is allocated until every proto passed."""

    kind: int  # _NONE, _FLOAT16, _MEANSTD_16BIT for protos; -1 for bit-packed
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    fill: int = _FILL_BOOL  # bit-packed only


_PACKED = -1


def _fail(message: str) -> NoReturn:
    raise WireError(message)


def _check_shape(where: str, shape: Any, limits: Limits) -> tuple[int, ...]:
    if type(shape) is not list or len(shape) > limits.max_ndim:
        if type(shape) is list:
            _fail(f"{where} declares {len(shape)} dimensions, limit is {limits.max_ndim} (Limits.max_ndim)")
        _fail(f"{where} declares a shape of type {type(shape).__name__}, expected a list of ints")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            _fail(f"{where} declares shape {shape!r}: dimensions must be non-negative ints")
    _check_strides(where, shape)
    return tuple(shape)


def _check_strides(where: str, shape: Sequence[int]) -> None:
    """An empty tensor passes every size limit whatever its other dimensions, but torch computes its strides
    from them, and a product past 64 bits makes it raise a bare RuntimeError (found by the fuzz test)."""
    if math.prod(max(dim, 1) for dim in shape) >= 1 << 62:
        _fail(f"{where} declares shape {list(shape)!r}: its dimensions multiply past 2**62 (an empty tensor too)")


def _plan_tensor(i: int, proto: runtime_pb2.Tensor, spec: Any, buffer_len: int, limits: Limits) -> tuple[_Plan, int]:
    """Validate proto ``i`` (and its spec) against the bytes it carries and the limits; return (plan, decoded bytes)."""
    compression = proto.compression
    if compression not in _ACCEPTED_COMPRESSIONS:
        _fail(f"tensor {i} uses compression {_compression_name(compression)}; accepted: NONE, FLOAT16, MEANSTD_16BIT")
    if proto.requires_grad:
        _fail(f"tensor {i} sets requires_grad; the wire carries no autograd state")
    name = proto.dtype
    wire_shape = tuple(proto.size)  # uint32 in the proto: never negative
    if len(wire_shape) > limits.max_ndim:
        _fail(f"tensor {i} declares {len(wire_shape)} dimensions, limit is {limits.max_ndim} (Limits.max_ndim)")
    _check_strides(f"tensor {i}", wire_shape)

    if spec is not None:  # bit-packed: the proto is a 1-D uint8 byte string, the spec says what it means
        if type(spec) is not list or len(spec) != 3:
            _fail(f"tensor {i}: bit-packing spec must be [shape, dtype, fill], got {spec!r:.200}")
        shape = _check_shape(f"tensor {i}", spec[0], limits)
        dtype_name, fill = spec[1], spec[2]
        if type(fill) is not int or fill not in (_FILL_BOOL, _FILL_FINFO_MIN, _FILL_NEG_INF):
            _fail(f"tensor {i}: bit-packing fill code {fill!r:.50} is not 0 (bool), 1 (finfo.min) or 2 (-inf)")
        if fill == _FILL_BOOL:
            if dtype_name != "bool":
                _fail(f"tensor {i}: bit-packing fill code 0 is for bool tensors, dtype is {dtype_name!r:.50}")
        elif type(dtype_name) is not str or _TENSOR_DTYPES.get(dtype_name) not in _MASK_FORMATS:
            _fail(
                f"tensor {i}: bit-packed mask dtype {dtype_name!r:.50} is not one of float16, bfloat16, float32, float64"
            )
        numel = math.prod(shape)
        nbytes = _check_size(i, shape, dtype_name, numel, limits)
        packed_len = (numel + 7) // 8
        if compression != _NONE or name != "uint8" or wire_shape != (packed_len,) or buffer_len != packed_len:
            _fail(
                f"tensor {i} is bit-packed with shape {shape} = {numel} elements, so it must be a raw uint8 proto of "
                f"shape ({packed_len},) and {packed_len} bytes; got {_compression_name(compression)} {name!r:.50} "
                f"of shape {wire_shape} and {buffer_len} bytes"
            )
        return _Plan(_PACKED, _TENSOR_DTYPES[dtype_name], shape, numel, fill), nbytes

    dtype = _TENSOR_DTYPES.get(name)
    if dtype is None:
        _fail(f"tensor {i} has dtype {name!r:.50}; accepted: {', '.join(_TENSOR_DTYPES)}")
    numel = math.prod(wire_shape)
    nbytes = _check_size(i, wire_shape, name, numel, limits)
    if compression == _NONE:
        itemsize = _ITEMSIZE[name]
        ok = buffer_len == numel * itemsize or (name == "bfloat16" and buffer_len == numel * 4)  # legacy bf16 as fp32
        expected = f"{numel * itemsize}"
    else:
        if name not in ("float32", "float64"):
            _fail(f"tensor {i}: {_compression_name(compression)} is accepted for float32/float64 only, dtype is {name}")
        if compression == _FLOAT16:
            ok = buffer_len == 2 * numel
            expected = f"{2 * numel} (2 per element)"
        else:  # MEANSTD_16BIT: fp16 values, then a float32 mean and std per row of the last dimension
            if not wire_shape:
                _fail(f"tensor {i}: MEANSTD_16BIT needs at least one dimension, shape is ()")
            rows = math.prod(wire_shape[:-1])
            ok = buffer_len == 2 * numel + 8 * rows
            expected = f"{2 * numel + 8 * rows} (2 per element + 8 per row)"
    if not ok:
        _fail(
            f"tensor {i} declares shape {wire_shape} of {name} ({_compression_name(compression)}) = {numel} elements, "
            f"which needs {expected} bytes, but carries {buffer_len}"
        )
    return _Plan(compression, dtype, wire_shape, numel), nbytes


def _check_size(i: int, shape: tuple[int, ...], name: str, numel: int, limits: Limits) -> int:
    itemsize = _ITEMSIZE[name]
    nbytes = numel * itemsize
    if nbytes > limits.max_tensor_bytes:
        _fail(
            f"tensor {i} declares shape {shape} of {name} = {numel} elements ({nbytes} bytes), "
            f"limit is {limits.max_tensor_bytes // itemsize} elements "
            f"({limits.max_tensor_bytes} bytes, Limits.max_tensor_bytes)"
        )
    return nbytes


def _build(i: int, plan: _Plan, proto: runtime_pb2.Tensor, buffer: bytes) -> torch.Tensor:
    """Materialise a validated proto. Every result owns writable memory (never the proto's bytes)."""
    shape = plan.shape
    if plan.kind == _PACKED:
        bits = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=plan.numel)  # new array, 0/1 bytes
        mask = torch.from_numpy(bits).view(torch.bool).view(shape)
        if plan.fill == _FILL_BOOL:
            return mask
        return torch.zeros(shape, dtype=plan.dtype).masked_fill_(mask, _MASK_FORMATS[plan.dtype].values[plan.fill])
    if plan.kind == _NONE:
        if plan.numel == 0:
            return torch.empty(shape, dtype=plan.dtype)
        dtype = plan.dtype
        if dtype is torch.bool:  # bytes other than 0/1 are not valid bools: normalise
            return torch.frombuffer(bytearray(buffer), dtype=torch.uint8).view(shape) != 0
        if dtype is torch.bfloat16 and len(buffer) == 4 * plan.numel:  # hivemind's legacy bf16 (sent as fp32)
            return torch.frombuffer(bytearray(buffer), dtype=torch.float32).view(shape).to(torch.bfloat16)
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is not None:  # shaped by numpy: no torch op (`.view` is one, 10-30 us in a waiting process)
            return torch.from_numpy(np.frombuffer(bytearray(buffer), dtype=np_dtype).reshape(shape))
        return torch.frombuffer(bytearray(buffer), dtype=dtype).view(shape)
    try:
        tensor = deserialize_torch_tensor(proto)
    except Exception as exc:  # hivemind's decoders are not written for hostile input: convert at the boundary
        raise WireError(f"tensor {i} ({_compression_name(plan.kind)}, shape {shape}) failed to decode: {exc}") from exc
    if tensor.dtype != plan.dtype or tuple(tensor.shape) != shape:
        _fail(f"tensor {i} decoded to {tensor.dtype} {tuple(tensor.shape)}, declared {plan.dtype} {shape}")
    return tensor


class _Decoder:
    """Rebuilds the structure from the metadata tree, checking every node."""

    __slots__ = ("tensors", "used", "max_depth")

    def __init__(self, tensors: list[torch.Tensor], max_depth: int) -> None:
        self.tensors = tensors
        self.used = bytearray(len(tensors))
        self.max_depth = max_depth

    def node(self, node: Any, depth: int) -> Any:
        tp = type(node)
        if tp in _DECODED_LEAVES:
            return node
        if tp is list:
            if not node or type(tag := node[0]) is not int:
                raise _PathError(WireError, f"array node must start with an int tag, got {node[:1]!r:.50}")
            if tag == _TAG_LIST or tag == _TAG_TUPLE:
                if depth >= self.max_depth:
                    raise _PathError(WireError, f"nesting deeper than {self.max_depth} containers (Limits.max_depth)")
                items = node[1:]
                for i, item in enumerate(items):
                    if type(item) not in _DECODED_LEAVES:  # leaves are most nodes: no call for them
                        try:
                            items[i] = self.node(item, depth + 1)
                        except _PathError as exc:
                            exc.segments.append(i)
                            raise
                return items if tag == _TAG_LIST else tuple(items)
            if len(node) != 2:
                raise _PathError(WireError, f"node with tag {tag} must have 1 value, has {len(node) - 1}")
            value = node[1]
            if tag == _TAG_TENSOR:
                if type(value) is not int or not 0 <= value < len(self.tensors):
                    raise _PathError(
                        WireError, f"tensor reference {value!r:.50} is not an index into the {len(self.tensors)} tensors"
                    )
                self.used[value] = 1
                return self.tensors[value]
            if tag == _TAG_DTYPE:
                dtype = _DTYPE_VALUES.get(value) if type(value) is str else None
                if dtype is None:
                    raise _PathError(WireError, f"{value!r:.50} is not a torch dtype name")
                return dtype
            if tag == _TAG_CACHE:
                if type(value) is not str:
                    raise _PathError(WireError, f"cache session id must be a str, got {type(value).__name__}")
                return CacheRef(value)
            raise _PathError(WireError, f"unknown node tag {tag}")
        if tp is dict:
            if depth >= self.max_depth:
                raise _PathError(WireError, f"nesting deeper than {self.max_depth} containers (Limits.max_depth)")
            for key, value in node.items():  # msgpack built this map for us alone: rebuilt in place
                if type(key) is not str:
                    raise _PathError(WireError, f"dict key {key!r:.50} of type {type(key).__name__}: keys must be str")
                if type(value) not in _DECODED_LEAVES:
                    try:
                        node[key] = self.node(value, depth + 1)
                    except _PathError as exc:
                        exc.segments.append(key)
                        raise
            return node
        raise _PathError(WireError, f"unexpected msgpack value of type {tp.__name__}")


def decode(
    tensors: Sequence[runtime_pb2.Tensor],
    metadata: bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
    raw_tensors: bool = False,
    raw_keys: Collection[str] = (),
    built: dict[int, torch.Tensor] | None = None,
) -> Any:
    """Rebuild the structure `encode` produced. Input is untrusted: anything wrong raises `WireError`.

    Every tensor proto is checked (compression, dtype, shape vs. bytes, limits) before it is allocated,
    and the bytes allocated so far never pass the limits; a tensor referenced several times decodes to
    one shared object. With `raw_tensors`, tensors are neither checked nor built: each is a `RawTensor`
    to pass on (the structure is checked as ever). `raw_keys` does that only under those keys of a
    top-level map: a peer forwarding a pushed step builds what it runs and passes the later hops'
    part on as it came (a tensor referenced both there and elsewhere is built, and passed on raw).
    `built`, when given, receives the tensors built, by their index in the message (`peer.steady` refills them).
    """
    n = len(tensors)
    if n > limits.max_tensors:
        _fail(f"message has {n} tensors, limit is {limits.max_tensors} (Limits.max_tensors)")
    size = len(metadata)
    if size > limits.max_metadata_bytes:
        _fail(f"metadata is {size} bytes, limit is {limits.max_metadata_bytes} (Limits.max_metadata_bytes)")
    try:
        top = msgpack.unpackb(
            metadata,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,  # every element takes at least one byte
            max_map_len=size // 2,
            max_ext_len=0,  # the format uses no extension types
        )
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError, UnicodeDecodeError, ...
        raise WireError(f"metadata ({size} bytes) is not valid msgpack: {exc}") from exc
    if type(top) is not list or len(top) != 3:
        _fail(f"metadata must be [version, specs, tree], got {type(top).__name__} of length {_len(top)}")
    version, specs, tree = top
    if version != FORMAT_VERSION or type(version) is not int:
        _fail(f"metadata format version {version!r:.50}, this peer reads version {FORMAT_VERSION}")
    if type(specs) is not list or len(specs) != n:
        _fail(f"metadata lists {_len(specs)} tensor specs for {n} tensors")

    raw = [RawTensor(tensors[i], specs[i]) for i in range(n)] if raw_tensors or raw_keys else None
    if raw_tensors:
        return _walk(_Decoder(raw, limits.max_depth), tree)
    decoder = _Decoder(_LazyTensors(tensors, specs, limits), limits.max_depth)
    if raw_keys and type(tree) is dict and any(key in tree for key in raw_keys):
        passed_on = _Decoder(raw, limits.max_depth)
        result = {}
        for key, value in tree.items():
            if type(key) is not str:
                _fail(f"metadata at {key!r:.50}: dict key of type {type(key).__name__}: keys must be str")
            try:
                result[key] = (passed_on if key in raw_keys else decoder).node(value, 1)
            except _PathError as exc:
                exc.segments.append(key)
                raise WireError(f"metadata at {exc.path()}: {exc.message}") from None
        used = [a or b for a, b in zip(decoder.used, passed_on.used)]
    else:
        result = _walk(decoder, tree)
        used = decoder.used
    if n and not all(used):
        _fail(f"tensor {list(used).index(0)} is never referenced in the metadata")
    if built is not None:
        built.update(decoder.tensors.built)
    return result


def _walk(decoder: "_Decoder", tree: Any, depth: int = 0) -> Any:
    try:
        return decoder.node(tree, depth)
    except _PathError as exc:
        raise WireError(f"metadata at {exc.path()}: {exc.message}") from None


class _LazyTensors:
    """The tensors of a message, each checked and built when the structure first references it."""

    __slots__ = ("protos", "specs", "limits", "built", "total")

    def __init__(self, protos: Sequence[runtime_pb2.Tensor], specs: list, limits: Limits) -> None:
        self.protos, self.specs, self.limits = protos, specs, limits
        self.built: dict[int, torch.Tensor] = {}
        self.total = 0

    def __len__(self) -> int:
        return len(self.protos)

    def __getitem__(self, i: int) -> torch.Tensor:
        tensor = self.built.get(i)
        if tensor is None:
            proto = self.protos[i]
            buffer = proto.buffer  # read once: each access copies out of the proto
            plan, nbytes = _plan_tensor(i, proto, self.specs[i], len(buffer), self.limits)
            self.total += nbytes
            if self.total > self.limits.max_total_bytes:
                _fail(
                    f"tensors add up to {self.total} bytes, limit is {self.limits.max_total_bytes} "
                    f"(Limits.max_total_bytes), at tensor {i}"
                )
            tensor = self.built[i] = _build(i, plan, proto, buffer)
        return tensor


def _len(value: Any) -> str:
    return str(len(value)) if isinstance(value, (list, dict, str, bytes)) else "n/a"


def decode_message(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, raw_tensors: bool = False, raw_keys: Collection[str] = (),
    built: dict[int, torch.Tensor] | None = None,
) -> Any:
    """`decode` of one serialized ``runtime_pb2.ExpertRequest`` (as `encode_message` makes)."""
    request = parse_message(data, limits=limits)
    return decode(request.tensors, request.metadata, limits=limits, raw_tensors=raw_tensors, raw_keys=raw_keys,
                  built=built)


def parse_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> runtime_pb2.ExpertRequest:
    """The protobuf of a message, its tensors and metadata not yet looked at (`decode` checks them)."""
    # protobuf framing adds a few bytes per tensor; the payload itself is bounded by the decoded limits
    max_size = limits.max_total_bytes + limits.max_metadata_bytes + 64 * (limits.max_tensors + 1)
    if len(data) > max_size:
        _fail(
            f"message is {len(data)} bytes, limit is {max_size} (Limits.max_total_bytes + max_metadata_bytes + framing)"
        )
    try:
        return runtime_pb2.ExpertRequest.FromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise WireError(f"message ({len(data)} bytes) is not a valid ExpertRequest protobuf: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# Messages that repeat one framing

TENSORS_TAG, METADATA_TAG = 0x12, 0x1A  # ExpertRequest fields 2 (repeated Tensor) and 3 (bytes), length-delimited
BUFFER_TAG = 0x0A  # Tensor field 1 (bytes): written first in protobuf's canonical form


def varint(n: int) -> bytes:
    """Protobuf's encoding of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def message_fields(data: bytes) -> list[tuple[int, int, int, int]] | None:
    """The top-level fields of a message, each (tag, where its tag starts, where its value starts, its end), when all
    are length-delimited and well framed; else None. Reads the framing alone: nothing is decoded or checked."""
    out, pos, end = [], 0, len(data)
    while pos < end:
        tag, start, size, shift = data[pos], pos, 0, 0
        if tag & 7 != 2:
            return None
        pos += 1
        while True:
            if pos >= end or shift > 28:
                return None
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if pos + size > end:
            return None
        out.append((tag, start, pos, pos + size))
        pos += size
    return out


@dataclass(frozen=True)
class _Framing:
    """What a message of the learnt framing holds besides its tensors' values."""

    length: int  # the message's size
    fixed: tuple[tuple[int, bytes], ...]  # (offset, bytes) of everything outside the tensors' buffers
    tensors: tuple[tuple[int, int, torch.dtype, tuple[int, ...], int], ...]  # per tensor: (buffer offset, bytes, dtype, shape, numel)
    metadata: bytes  # the msgpack metadata, rebuilt into the structure at each message


class RepeatDecoder:
    """`decode_message` for a stream of messages that repeat one framing: a session's replies to its client.

    A decode step's reply is the same bytes step after step but for its tensors' values. The first reply is
    decoded in full, and its framing learnt: where each tensor's buffer lies, and every other byte. A later message
    of the very same length whose other bytes are all equal is then decoded by copying each buffer into a fresh
    tensor and rebuilding the structure from the (equal, already checked) metadata; anything else is decoded in
    full again, and becomes the framing to look for. Only framings whose tensors take any bytes as a valid value
    are learnt: uncompressed, not bit-packed, not bool, no legacy bf16. The result equals `decode_message`'s; it is
    a few times cheaper, which counts on every token's path in a process that has been waiting
    (docs/performance.md). One stream per instance: it is not thread-safe.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_bytes: int = 1 << 20):
        self.limits = limits
        self.max_bytes = max_bytes  # larger messages are decoded in full, never learnt
        self._framing: _Framing | None = None
        self.hits = 0

    def decode(self, data: bytes) -> Any:
        framing = self._framing
        if framing is not None and len(data) == framing.length and all(
            data.startswith(piece, at) for at, piece in framing.fixed
        ):
            tensors = []
            for at, size, dtype, shape, numel in framing.tensors:
                np_dtype = _NUMPY_DTYPES.get(dtype)
                if np_dtype is not None:  # shaped by numpy: no torch op (as `_build`)
                    tensor = torch.from_numpy(np.frombuffer(data, np_dtype, numel, at).reshape(shape).copy())
                else:
                    tensor = torch.empty(shape, dtype=dtype)
                    ctypes.memmove(tensor.data_ptr(), data[at:at + size], size)
                tensors.append(tensor)
            self.hits += 1
            return _walk(_Decoder(tensors, self.limits.max_depth), msgpack.unpackb(framing.metadata, raw=False)[2])
        message = parse_message(data, limits=self.limits)
        built: dict[int, torch.Tensor] = {}
        result = decode(message.tensors, message.metadata, limits=self.limits, built=built)
        self._framing = self._learn(data, message, built) if len(data) <= self.max_bytes else None
        return result

    @staticmethod
    def _learn(data: bytes, message: runtime_pb2.ExpertRequest, built: dict[int, torch.Tensor]) -> _Framing | None:
        fields_ = message_fields(data)
        protos = message.tensors
        if not fields_ or fields_[-1][0] != METADATA_TAG or len(fields_) != len(protos) + 1 or len(built) != len(protos):
            return None
        if data[fields_[-1][2]:fields_[-1][3]] != message.metadata:
            return None
        if any(spec is not None for spec in msgpack.unpackb(message.metadata, raw=False)[1]):
            return None  # bit-packed tensors: their bits are not their values
        fixed, tensors, at = [], [], 0
        for i, ((tag, _, start, end), proto) in enumerate(zip(fields_, protos)):
            tensor, size = built[i], len(proto.buffer)
            head = bytes((BUFFER_TAG,)) + varint(size)
            if (tag != TENSORS_TAG or proto.compression != _NONE or not size or not data.startswith(head, start)
                    or tensor.dtype is torch.bool or tensor.numel() * tensor.element_size() != size):
                return None  # compressed, empty, bool or converted (legacy bf16): rebuilt, not copied
            buffer = start + len(head)
            fixed.append((at, data[at:buffer]))
            tensors.append((buffer, size, tensor.dtype, tuple(tensor.shape), tensor.numel()))
            at = buffer + size
        fixed.append((at, data[at:]))
        return _Framing(len(data), tuple(fixed), tuple(tensors), message.metadata)


def skeleton(obj: Any, tensors: list[torch.Tensor], seen: dict[int, int] | None = None) -> Any:
    """What a structure holds besides its tensors' values, as a value that compares equal exactly when two
    structures encode alike but for those values: each tensor becomes (its number in order of first appearance,
    dtype, shape, whether contiguous), appended to `tensors` the first time. Leaves keep their type (``1``,
    ``True`` and ``1.0`` differ). A type `encode` would not send as such (a `RawTensor`, a tensor off the CPU,
    or one with grad or a negated view) gives ``None``: such a structure is not refilled (`RepeatEncoder`)."""
    seen = {} if seen is None else seen
    tp = type(obj)
    if tp is dict:
        out = []
        for key, value in obj.items():
            part = skeleton(value, tensors, seen)
            if part is None and value is not None:
                return None
            out.append((key, part))
        return (dict, tuple(out))
    if tp is list or tp is tuple:
        out = []
        for value in obj:
            part = skeleton(value, tensors, seen)
            if part is None and value is not None:
                return None
            out.append(part)
        return (tp, tuple(out))
    if tp is torch.Tensor:
        number = seen.get(id(obj))
        if number is None:
            if obj.device.type != "cpu" or obj.requires_grad or obj.is_neg():
                return None
            number = seen[id(obj)] = len(tensors)
            tensors.append(obj)
        return (torch.Tensor, number, obj.dtype, tuple(obj.shape), obj.is_contiguous())
    if tp is CacheRef:
        return (CacheRef, obj.session_id)
    if obj is None or tp in _NATIVE_LEAVES or tp is int or tp is torch.dtype:
        return (tp, obj)
    return None


@dataclass(frozen=True)
class _Learnt:
    """What `RepeatEncoder` learnt from a full encoding."""

    key: Any  # the caller's description of the step it was built from
    specs: tuple[tuple[torch.dtype, torch.Size], ...]  # each given tensor's dtype and shape
    tensor_part: bytes  # the message up to its metadata field
    slots: tuple[tuple[int, int, int], ...]  # (index into the given tensors, buffer offset in tensor_part, bytes)
    metadata_head: bytes  # the metadata without its last value


class RepeatEncoder:
    """`encode_message` for a stream of structures that repeat one shape: a session's decode-step requests.

    Step after step a client sends the same request but for its tensors' values and its step number. The caller
    describes what it would build without building it: `key`, equal for two steps exactly when their structures
    would be equal but for `tensors`' values and `last_int`, the value of the tree's last key `last_key`
    (`StepRequest.to_wire` writes ``step`` last), plus `tensors` themselves. The first such step is built (`build()`) and
    encoded in full, and what its bytes hold learnt: where each of `tensors` lies. A later step with an equal `key`
    and tensors of the same dtypes, shapes and sharing gets those bytes with its tensors' bytes copied in and its
    `last_int` written anew. Every tensor of the message must be one of `tensors`, contiguous and sent raw (not
    bit-packed, not compressed, not bool); else nothing is learnt and every step is encoded in full. The bytes
    decode to exactly what the full encoding's decode to (a value that happens to look like a mask travels raw,
    where the full encoding would bit-pack it). One stream per instance: it is not thread-safe.
    """

    def __init__(self, last_key: str = "step", limits: Limits = DEFAULT_LIMITS):
        self.last_key = last_key
        self.limits = limits
        self._learnt: _Learnt | None = None
        self.hits = 0

    def encode(self, key: Any, tensors: Sequence[torch.Tensor], last_int: int, build: Callable[[], Any]) -> bytes:
        learnt = self._learnt
        if learnt is not None and learnt.key == key and len(tensors) == len(learnt.specs):
            if all(t.dtype == d and t.shape == s and t.is_contiguous() and t.device.type == "cpu" and not t.requires_grad
                   and not t.is_neg() for t, (d, s) in zip(tensors, learnt.specs)):
                part = bytearray(learnt.tensor_part)
                base = ctypes.addressof(ctypes.c_char.from_buffer(part))
                for j, at, size in learnt.slots:
                    ctypes.memmove(base + at, tensors[j].data_ptr(), size)
                metadata = learnt.metadata_head + msgpack.packb(last_int)
                self.hits += 1
                return bytes(part) + bytes((METADATA_TAG,)) + varint(len(metadata)) + metadata
        tree = build()
        indices: dict[int, int] = {}
        data = encode_message(tree, limits=self.limits, indices=indices)
        self._learnt = self._learn(key, tensors, last_int, tree, data, indices)
        return data

    def _learn(self, key: Any, tensors: Sequence[torch.Tensor], last_int: int, tree: Any, data: bytes,
               indices: dict[int, int]) -> _Learnt | None:
        if (type(tree) is not dict or not tree or next(reversed(tree)) != self.last_key or type(last_int) is not int
                or type(tree[self.last_key]) is not int or tree[self.last_key] != last_int):
            return None
        fields_ = message_fields(data)
        if not fields_ or fields_[-1][0] != METADATA_TAG or fields_[-1][3] != len(data):
            return None
        metadata = data[fields_[-1][2]:]
        tail = msgpack.packb(last_int)
        if not metadata.endswith(tail) or any(spec is not None for spec in msgpack.unpackb(metadata, raw=False)[1]):
            return None
        protos = fields_[:-1]
        slots, covered = [], set()
        for j, tensor in enumerate(tensors):
            i = indices.get(id(tensor))
            if i is None or not tensor.is_contiguous() or tensor.dtype is torch.bool or i >= len(protos):
                return None
            tag, _, start, end = protos[i]
            size = tensor.numel() * tensor.element_size()
            head = bytes((BUFFER_TAG,)) + varint(size)
            if tag != TENSORS_TAG or not size or not data.startswith(head, start) or start + len(head) + size > end:
                return None
            if i not in covered:
                covered.add(i)
                slots.append((j, start + len(head), size))
        if len(covered) != len(protos):
            return None  # a tensor in the message that is not one of `tensors`: its bytes would go stale
        for j, at, size in slots:  # the proto's bytes must be the tensor's own (not converted, not compressed)
            if data[at:at + size] != ctypes.string_at(tensors[j].data_ptr(), size):
                return None
        specs = tuple((t.dtype, t.shape) for t in tensors)
        return _Learnt(key, specs, data[:fields_[-1][1]], tuple(slots), metadata[: len(metadata) - len(tail)])
