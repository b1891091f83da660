"""The wire codec: exact round trips, bandwidth savings, and a decoder that only ever raises WireError."""

from __future__ import annotations

import collections
import math
import os
import re
import struct

import msgpack
import numpy as np
import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.wire import (
    FORMAT_VERSION, CacheRef, Limits, RawTensor, WireError, decode, decode_message, encode, encode_message, raw_tensor,
)

CT = runtime_pb2.CompressionType
SMALL_LIMITS = Limits(max_tensors=64, max_tensor_bytes=1 << 20, max_total_bytes=4 << 20, max_metadata_bytes=1 << 16)
# WIRE_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the file fast
FUZZ = settings(
    max_examples=int(os.environ.get("WIRE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def assert_same(a, b, path="obj"):
    """Exact equality: same types (tuple is not list), tensors bitwise equal, floats bitwise equal."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{path}: bits differ"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def round_trip(obj, **kwargs):
    """Through bytes, as a peer sees it."""
    return decode_message(encode_message(obj, **kwargs))


def causal_mask(batch: int, length: int, dtype: torch.dtype, fill: float | None = None) -> torch.Tensor:
    fill = torch.finfo(dtype).min if fill is None else fill
    mask = torch.full((length, length), fill, dtype=dtype).triu(1)  # (q, k)
    return mask[None, None].expand(batch, 1, length, length).clone()  # (batch, 1, q, k)


# ------------------------------------------------------------------------------------------ round trips


def test_nested_structure_round_trips_with_exact_types():
    hidden = torch.randn(2, 3, 8)
    obj = {
        "hidden": hidden,
        "layers": [
            ((hidden,), {"use_cache": True, "position_embeddings": (torch.ones(3), torch.zeros(3) + 0.5)}),
            ([], {"past_key_values": CacheRef("session-1"), "dtype": torch.bfloat16, "head_mask": None}),
        ],
        "scalars": (0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, float("inf"), float("nan"), False),
        "text": "привет",
        "raw": b"\x00\xff",
        "empty": ((), [], {}),
        "dtypes": [torch.float32, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn],
    }
    out = round_trip(obj)
    assert_same(obj, out)
    assert type(out["layers"][0][1]["position_embeddings"]) is tuple
    assert out["layers"][1][1]["past_key_values"] == CacheRef("session-1")


@pytest.mark.parametrize("leaf", [None, 7, "x", b"y", 1.25, True, CacheRef("s"), torch.float16, torch.arange(3)])
def test_bare_leaf_round_trips(leaf):
    assert_same(leaf, round_trip(leaf))


def test_same_tensor_object_travels_once_and_decodes_shared():
    cos, sin = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    layers = [{"position_embeddings": (cos, sin), "i": i} for i in range(5)]
    tensors, metadata = encode(layers)
    assert len(tensors) == 2
    out = decode(tensors, metadata)
    assert all(layer["position_embeddings"][0] is out[0]["position_embeddings"][0] for layer in out)
    assert all(layer["position_embeddings"][1] is out[0]["position_embeddings"][1] for layer in out)
    assert_same(layers, out)


def test_equal_but_distinct_tensors_stay_distinct():
    a = torch.ones(3)
    tensors, metadata = encode([a, a.clone()])
    out = decode(tensors, metadata)
    assert len(tensors) == 2 and out[0] is not out[1]


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8],
)
def test_every_bit_pattern_round_trips(dtype):
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    info = torch.iinfo(int_dtype)
    bits = torch.randint(info.min, info.max, (3, 5, 7), dtype=int_dtype, generator=torch.Generator().manual_seed(0))
    tensor = bits.view(dtype)  # includes NaN payloads, infinities, -0.0, subnormals for floats
    assert_same(tensor, round_trip(tensor))
    tensors, _ = encode(tensor)
    assert len(tensors[0].buffer) == tensor.numel() * itemsize  # bf16 travels as 2 bytes, not hivemind's legacy fp32


def test_bool_tensor_travels_as_bits():
    mask = torch.rand(2, 1, 512, 512, generator=torch.Generator().manual_seed(0)) > 0.5
    tensors, metadata = encode(mask)
    assert len(tensors[0].buffer) == mask.numel() // 8
    assert_same(mask, decode(tensors, metadata))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_additive_mask_travels_as_bits_and_rebuilds_bitwise(dtype):
    mask = causal_mask(2, 512, dtype)  # (2, 1, 512, 512), 0 or finfo.min
    tensors, metadata = encode({"attention_mask": mask})
    dense_fp32 = mask.numel() * 4
    wire = len(tensors[0].buffer)
    assert wire == dense_fp32 // 32  # 1 bit per element
    out = decode(tensors, metadata)["attention_mask"]
    assert_same(mask, out)


def test_neg_inf_masks_of_any_rank_travel_as_bits():
    for mask in (causal_mask(1, 64, torch.float32, -math.inf)[0, 0], causal_mask(3, 16, torch.bfloat16, -math.inf)):
        tensors, metadata = encode(mask)
        assert len(tensors[0].buffer) == (mask.numel() + 7) // 8
        assert_same(mask, decode(tensors, metadata))


def test_an_empty_tensor_with_absurd_dimensions_is_a_wire_error():
    # found by test_fuzz_tensor_protos: 0 elements pass every size limit, but torch.empty overflowed its strides
    proto = runtime_pb2.Tensor(compression=CT.NONE, buffer=b"", size=[0, 229, 291792, 292504, 471899], dtype="float32")
    with pytest.raises(WireError, match=r"multiply past 2\*\*62"):
        decode([proto], msgpack.packb([FORMAT_VERSION, [None], [2, 0]]))
    spec = [[0, 229, 291792, 292504, 471899], "bool", 0]
    packed = runtime_pb2.Tensor(compression=CT.NONE, buffer=b"", size=[0], dtype="uint8")
    with pytest.raises(WireError, match=r"multiply past 2\*\*62"):
        decode([packed], msgpack.packb([FORMAT_VERSION, [spec], [2, 0]]))
    assert decode([runtime_pb2.Tensor(compression=CT.NONE, buffer=b"", size=[0, 7], dtype="float32")],
                  msgpack.packb([FORMAT_VERSION, [None], [2, 0]])).shape == (0, 7)


def test_all_zero_float_tensor_is_exact_and_small():
    zeros = torch.zeros(4, 1, 8, 8, dtype=torch.bfloat16)
    tensors, metadata = encode(zeros)
    assert len(tensors[0].buffer) == 32
    assert_same(zeros, decode(tensors, metadata))


@pytest.mark.parametrize(
    "tensor",
    [
        causal_mask(1, 8, torch.float32)[0],  # finfo.min in 3-D: not an additive mask, goes raw
        causal_mask(1, 8, torch.float32) * -0.0,  # -0.0 must not become +0.0
        torch.where(causal_mask(1, 8, torch.float32) == 0, torch.tensor(0.0), torch.tensor(-1e30)),  # other fill
        torch.tensor([[[[0.0, float("nan")]]]]),
    ],
)
def test_almost_masks_go_raw_and_exact(tensor):
    tensors, metadata = encode(tensor)
    assert len(tensors[0].buffer) == tensor.numel() * tensor.element_size()
    assert_same(tensor, decode(tensors, metadata))


def test_non_contiguous_grad_and_parameter_tensors_encode():
    base = torch.randn(4, 6, 8, requires_grad=True)
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1::3],
        "expanded": torch.randn(1, 8).expand(5, 8),  # stride 0
        "param": torch.nn.Parameter(torch.randn(3, 3)),
        "bool_t": (torch.randn(5, 7) > 0).t(),
        "mask_t": causal_mask(2, 6, torch.float16).transpose(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
    }
    out = round_trip(views)
    for key, tensor in views.items():
        assert_same(tensor.detach().contiguous(), out[key], key)
        assert not out[key].requires_grad and out[key].is_contiguous()
    out["transposed"].add_(1)  # decoded tensors own writable memory


def test_views_are_read_from_their_own_first_element_and_negated_views_by_value():
    """The encoder reads a tensor's bytes from memory (no torch op on the decode path's hot loop): a view's first
    element sits at an offset into its storage, and a negated view's memory holds the values before negation."""
    mask = causal_mask(1, 8, torch.float32)
    views = {
        "offset mask": mask[:, :, :, 1:],  # first element finfo.min, the storage's first 0
        "offset activation": torch.cat([torch.zeros(1, 1, 1, 4), torch.randn(1, 1, 1, 4)], dim=-1)[..., 4:],
        "negated activation": torch._neg_view(torch.randn(2, 3)),
        "negated mask": torch._neg_view(torch.full((1, 1, 2, 2), torch.finfo(torch.float32).max)),  # all finfo.min
        "negated zero": torch._neg_view(torch.zeros(4)),  # -0.0: not a mask, bits kept
    }
    for key, tensor in views.items():
        tensors, metadata = encode(tensor)
        out = decode(tensors, metadata)
        assert_same(tensor.resolve_neg().contiguous(), out, key)
        packed = len(tensors[0].buffer) < tensor.numel() * tensor.element_size()
        assert packed == key.endswith(" mask"), key


def test_activation_compression_applies_to_activations_only():
    hidden = torch.randn(2, 16, 64)
    obj = {
        "hidden": hidden,
        "mask": causal_mask(2, 16, torch.float32),
        "ids": torch.arange(16),
        "bf16": torch.randn(4, 4, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.0),
    }
    for compression in (CT.FLOAT16, CT.MEANSTD_16BIT):
        tensors, metadata = encode(obj, activation_compression=compression)
        assert tensors[0].compression == compression
        assert len(tensors[0].buffer) < hidden.numel() * 4 * 0.6
        out = decode(tensors, metadata)
        assert out["hidden"].dtype == torch.float32
        torch.testing.assert_close(out["hidden"], hidden, atol=5e-3, rtol=1e-3)
        for key in ("mask", "ids", "bf16"):
            assert_same(obj[key], out[key], key)
        torch.testing.assert_close(out["scalar"], obj["scalar"], atol=1e-3, rtol=1e-3)
    assert_same(obj, decode(*encode(obj, activation_compression=CT.NONE)))


@pytest.mark.parametrize("compression", [CT.UNIFORM_8BIT, CT.QUANTILE_8BIT, CT.BLOCKWISE_8BIT, 99])
def test_unusable_compressions_are_refused_on_encode(compression):
    with pytest.raises(ValueError, match="activation_compression"):
        encode(torch.randn(4), activation_compression=compression)


def test_interoperates_with_hivemind_codec():
    tensors, _ = encode([torch.randn(3, 4), torch.randn(5, dtype=torch.bfloat16), torch.arange(4)])
    for proto, expected_dtype in zip(tensors, (torch.float32, torch.bfloat16, torch.int64)):
        assert deserialize_torch_tensor(proto).dtype == expected_dtype
    # protos made by hivemind itself (its default sends bf16 as float32) decode too
    originals = [torch.randn(2, 3), torch.randn(4, dtype=torch.bfloat16), torch.randn(2, 8)]
    protos = [serialize_torch_tensor(t) for t in originals[:2]] + [serialize_torch_tensor(originals[2], CT.FLOAT16)]
    metadata = msgpack.packb([FORMAT_VERSION, [None] * 3, [0, [2, 0], [2, 1], [2, 2]]])
    out = decode(protos, metadata)
    assert_same(originals[:2], out[:2])
    torch.testing.assert_close(out[2], originals[2], atol=5e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------- encode errors


Point = collections.namedtuple("Point", "x y")


class Bar:
    pass


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"kwargs": {"foo": [1, 2, Bar()]}}, r"^kwargs\['foo'\]\[2\]: cannot send object of type (tests\.)?test_wire\.Bar$"),
        ([{1: "a"}], r"^\[0\]: cannot send dict key 1 of type int"),
        ((0, {"s": {1, 2}}), r"^\[1\]\['s'\]: cannot send object of type set"),
        ({"p": Point(1, 2)}, r"^p: cannot send object of type (tests\.)?test_wire\.Point"),
        ({"a": np.zeros(3)}, r"^a: cannot send object of type numpy\.ndarray"),
        ({"c": torch.zeros(2, dtype=torch.complex64)}, r"^c: cannot send a tensor of dtype torch\.complex64"),
        ({"m": torch.empty(2, device="meta")}, r"^m: cannot send a meta tensor"),
        ({"s": torch.eye(3).to_sparse()}, r"^s: cannot send a tensor with layout"),
        (Bar(), r"^<message>: cannot send object of type"),
    ],
)
def test_unsupported_objects_raise_type_error_with_path(obj, message):
    with pytest.raises(TypeError, match=message):
        encode(obj)


def test_encode_refuses_cycles_and_oversize():
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="nesting deeper than 32"):
        encode(cyclic)
    with pytest.raises(ValueError, match="outside the 64-bit range"):
        encode({"n": [2**64]})
    with pytest.raises(ValueError, match=r"^x: tensor of shape \(1024,\) and dtype float32 is 4096 bytes, limit is 1000"):
        encode({"x": torch.zeros(1024) + 1}, limits=Limits(max_tensor_bytes=1000))


# ---------------------------------------------------------------------------------------- decode errors


def packed_spec_message(shape, dtype="float32", fill=1, packed_len=1):
    proto = runtime_pb2.Tensor(compression=CT.NONE, buffer=b"\x00" * packed_len, size=[packed_len], dtype="uint8")
    return [proto], msgpack.packb([FORMAT_VERSION, [[shape, dtype, fill]], [2, 0]])


def test_huge_declared_shapes_are_rejected_before_allocating():
    tensors, metadata = packed_spec_message([10**6, 10**6])  # 10**12 elements behind 1 byte
    with pytest.raises(WireError, match=r"tensor 0 declares shape \(1000000, 1000000\) of float32 = 1000000000000 elements"):
        decode(tensors, metadata)
    proto = runtime_pb2.Tensor(compression=CT.NONE, buffer=b"", size=[2, 4096, 4096], dtype="float32")
    metadata = msgpack.packb([FORMAT_VERSION, [None], [2, 0]])
    with pytest.raises(WireError, match=r"33554432 elements \(134217728 bytes\), limit is 16777216 elements"):
        decode([proto], metadata, limits=Limits(max_tensor_bytes=64 << 20))


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ([], msgpack.packb([FORMAT_VERSION, [], [2, 0]]), r"tensor reference 0 is not an index into the 0 tensors"),
        ([], msgpack.packb([FORMAT_VERSION + 1, [], None]), r"format version 2, this peer reads version 1"),
        ([], msgpack.packb([FORMAT_VERSION, [None], None]), r"1 tensor specs for 0 tensors"),
        ([], msgpack.packb([FORMAT_VERSION, [], [7, 1]]), r"unknown node tag 7"),
        ([], msgpack.packb([FORMAT_VERSION, [], [3, "float33"]]), r"'float33' is not a torch dtype name"),
        ([], msgpack.packb([FORMAT_VERSION, [], {"a": [0, {b"k": 1}]}]), r"at a\[0\]: dict key b'k' of type bytes"),
        ([], msgpack.packb([FORMAT_VERSION, [], [0] * 40 + [None]]), None),  # flat list: fine
        ([], b"\x93\x01\x90" + b"\x91" * 40 + b"\xc0", r"metadata at <message>: array node must start with an int tag"),
        ([], msgpack.packb([FORMAT_VERSION, [], [True, 1]]), r"must start with an int tag"),
        ([], b"\xc1", r"not valid msgpack"),
        ([], msgpack.packb([FORMAT_VERSION, [], None]) + b"\x00", r"not valid msgpack"),
        (
            [runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[2, 4], dtype="float32")],
            msgpack.packb([FORMAT_VERSION, [None], [2, 0]]),
            r"tensor 0 declares shape \(2, 4\) of float32 \(NONE\) = 8 elements, which needs 32 bytes, but carries 7",
        ),
        (
            [runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="object")],
            msgpack.packb([FORMAT_VERSION, [None], [2, 0]]),
            r"tensor 0 has dtype 'object'",
        ),
        (
            [runtime_pb2.Tensor(buffer=b"\x00" * 9, size=[1], dtype="float32", compression=CT.UNIFORM_8BIT)],
            msgpack.packb([FORMAT_VERSION, [None], [2, 0]]),
            r"tensor 0 uses compression UNIFORM_8BIT",
        ),
        (
            [runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[1], dtype="float32", requires_grad=True)],
            msgpack.packb([FORMAT_VERSION, [None], [2, 0]]),
            r"requires_grad",
        ),
        (
            [runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[1], dtype="float32")] * 2,
            msgpack.packb([FORMAT_VERSION, [None, None], [2, 1]]),
            r"tensor 0 is never referenced",
        ),
        (*packed_spec_message([3, 3], "int64", 1, 2), r"bit-packed mask dtype 'int64'"),
        (*packed_spec_message([3, 3], "float32", 1, 1), r"must be a raw uint8 proto of shape \(2,\) and 2 bytes"),
        (*packed_spec_message([3, -3], "bool", 0, 1), r"dimensions must be non-negative ints"),
        (*packed_spec_message([1] * 9, "bool", 0, 1), r"declares 9 dimensions, limit is 8"),
    ],
)
def test_malformed_input_raises_wire_error_with_details(tensors, metadata, message):
    if message is None:
        decode(tensors, metadata)
        return
    with pytest.raises(WireError, match=message):
        decode(tensors, metadata)


def test_limits_on_counts_depth_and_sizes():
    deep: list = [None]
    for _ in range(33):
        deep = [deep]
    tensors, metadata = encode(deep, limits=Limits(max_depth=40))
    with pytest.raises(WireError, match=r"nesting deeper than 32 containers"):
        decode(tensors, metadata)
    tensors, metadata = encode([torch.ones(1) for _ in range(5)])
    with pytest.raises(WireError, match=r"message has 5 tensors, limit is 4"):
        decode(tensors, metadata, limits=Limits(max_tensors=4))
    with pytest.raises(WireError, match=r"add up to 12 bytes, limit is 10"):
        decode(tensors, metadata, limits=Limits(max_total_bytes=10))
    with pytest.raises(WireError, match=r"metadata is \d+ bytes, limit is 3"):
        decode(tensors, metadata, limits=Limits(max_metadata_bytes=3))
    with pytest.raises(WireError, match="not a valid ExpertRequest"):
        decode_message(b"\xff\xff\xff")
    with pytest.raises(WireError) as info:
        decode_message(b"\x12\x03\x2a\x01\xff")  # dtype string that is not UTF-8
    assert info.value.__cause__ is not None


# ------------------------------------------------------------------------------------------ properties

TENSOR_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    kind = draw(st.sampled_from(["bits", "mask_min", "mask_neginf", "zeros"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    info = torch.iinfo(int_dtype)
    tensor = torch.randint(info.min, info.max, shape, dtype=int_dtype, generator=generator).view(dtype)
    if kind != "bits" and dtype.is_floating_point:
        fill = torch.finfo(dtype).min if kind == "mask_min" else -math.inf
        zero, fill = torch.tensor(0.0, dtype=dtype), torch.tensor(fill, dtype=dtype)
        tensor = torch.where(tensor.view(int_dtype) % 2 == 0, zero, fill)
    if kind == "zeros":
        tensor = torch.zeros(shape, dtype=dtype)
    return tensor


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool])
    | st.builds(CacheRef, st.text(max_size=8))
    | tensors()
)
structures = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures)
def test_random_structures_round_trip(obj):
    assert_same(obj, round_trip(obj))


def valid_message() -> bytes:
    shared = torch.randn(2, 3)
    return encode_message(
        {
            "h": shared,
            "layers": [(shared, {"m": causal_mask(1, 4, torch.float32), "b": torch.ones(5) > 0}), CacheRef("s")],
            "x": [1, 2.5, "t", b"b", None, torch.int32, torch.arange(3, dtype=torch.int32)],
        },
        activation_compression=CT.MEANSTD_16BIT,
    )


VALID = valid_message()
VALID_REQUEST = runtime_pb2.ExpertRequest.FromString(VALID)


def decodes_or_wire_error(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except WireError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    decodes_or_wire_error(decode_message, data, limits=SMALL_LIMITS)
    decodes_or_wire_error(decode, list(VALID_REQUEST.tensors), data, limits=SMALL_LIMITS)


@FUZZ
@given(st.data())
def test_fuzz_mutated_messages(data):
    target = data.draw(st.sampled_from(["message", "metadata"]))
    blob = bytearray(VALID if target == "message" else VALID_REQUEST.metadata)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and blob:
            blob[pos] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xCE, 0xCF, 0xDD, 0xDF, 0x91, 0x92]))
        elif op == "truncate":
            del blob[pos:]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    if target == "message":
        decodes_or_wire_error(decode_message, bytes(blob), limits=SMALL_LIMITS)
    else:
        decodes_or_wire_error(decode, list(VALID_REQUEST.tensors), bytes(blob), limits=SMALL_LIMITS)


scalar_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, 1, 2, 3, 4, 5, -1, 10**12, 2**32])
    | st.floats()
    | st.sampled_from(["bool", "float32", "bfloat16", "int64", "uint8", "object", "float8_e4m3fn", ""])
    | st.binary(max_size=4)
)
msgpack_values = st.recursive(
    scalar_values,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=3) | st.binary(max_size=2), children, max_size=3)
    | st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, -1]), st.lists(children, max_size=3)).map(lambda t: [t[0], *t[1]]),
    max_leaves=20,
)
VALID_SPECS = msgpack.unpackb(VALID_REQUEST.metadata)[1]
spec_values = st.sampled_from(VALID_SPECS) | st.tuples(
    st.lists(st.integers(-1, 6) | st.sampled_from([10**12, 2**40]), max_size=9) | scalar_values,
    st.sampled_from(["bool", "float32", "bfloat16", "float16", "float64", "int64", 3, None]),
    st.integers(-1, 3) | scalar_values,
).map(list) | msgpack_values


@FUZZ
@given(
    specs=st.just(VALID_SPECS)
    | st.lists(spec_values, min_size=len(VALID_SPECS), max_size=len(VALID_SPECS))
    | st.lists(spec_values, max_size=5)
    | msgpack_values,
    tree=msgpack_values,
    version=st.sampled_from([1] * 6 + [0, True, "1", 1.0]),
)
def test_fuzz_random_metadata(specs, tree, version):
    """Metadata that is valid msgpack but anything else: tags, indices, specs are random."""
    metadata = msgpack.packb([version, specs, tree])
    tensors = list(VALID_REQUEST.tensors)[: len(specs) if isinstance(specs, list) else 0]
    decodes_or_wire_error(decode, tensors, metadata, limits=SMALL_LIMITS)


@FUZZ
@given(
    buffer=st.binary(max_size=64),
    size=st.lists(st.integers(0, 9), max_size=4) | st.lists(st.integers(0, 2**32 - 1), max_size=10),
    dtype=st.sampled_from(
        ["float32", "bfloat16", "float16", "float64", "int64", "bool", "uint8", "object", "U8", "", "float8_e5m2"]
    ),
    compression=st.sampled_from([CT.NONE, CT.NONE, CT.FLOAT16, CT.MEANSTD_16BIT, *CT.values(), 17]),
    requires_grad=st.sampled_from([False] * 5 + [True]),
    spec=st.none() | spec_values,
)
def test_fuzz_tensor_protos(buffer, size, dtype, compression, requires_grad, spec):
    """Tensor protos with random fields, bytes and specs; sizes often consistent so decoding is reached."""
    numel = math.prod(size[:-1])
    if size and buffer and size[-1] == 0 and numel <= 4096:  # steer a share of the cases to exact buffer lengths
        buffer = (buffer * (numel * 8 // len(buffer) + 1))[: numel * {"float64": 8, "int64": 8, "float32": 4}.get(dtype, 2)]
        size = size[:-1]
    proto = runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, compression=compression, requires_grad=requires_grad)
    metadata = msgpack.packb([FORMAT_VERSION, [spec], [0, [2, 0], [2, 0]]])
    decodes_or_wire_error(decode, [proto], metadata, limits=SMALL_LIMITS)
    request = runtime_pb2.ExpertRequest(tensors=[proto], metadata=metadata).SerializeToString()
    decodes_or_wire_error(decode_message, request, limits=SMALL_LIMITS)


def payload_protos() -> list[runtime_pb2.Tensor]:
    """One proto of each decodable kind: MEANSTD_16BIT, FLOAT16, bit-packed mask and bool, raw int, raw bool."""
    meanstd, _ = encode(torch.randn(3, 5), activation_compression=CT.MEANSTD_16BIT)
    float16, _ = encode(torch.randn(2, 2, dtype=torch.float64), activation_compression=CT.FLOAT16)
    packed, _ = encode([causal_mask(1, 5, torch.bfloat16), torch.ones(11) > 0, torch.arange(6)])
    return [*meanstd, *float16, *packed, serialize_torch_tensor(torch.ones(9) > 0)]


PAYLOAD_PROTOS = payload_protos()
PAYLOAD_METADATA = msgpack.packb(
    [
        FORMAT_VERSION,
        [None, None, [[1, 1, 5, 5], "bfloat16", 1], [[11], "bool", 0], None, None],
        [0, *([2, i] for i in range(6))],
    ]
)


@FUZZ
@given(st.lists(st.binary(min_size=64, max_size=64), min_size=len(PAYLOAD_PROTOS), max_size=len(PAYLOAD_PROTOS)))
def test_fuzz_payload_bytes_of_well_formed_protos_always_decode(noise):
    """Random bytes inside correctly sized buffers (NaN stats, pad bits, bools that are not 0/1) decode without error."""
    protos = []
    for proto, fill in zip(PAYLOAD_PROTOS, noise):
        size = len(proto.buffer)
        buffer = (fill * (size // 64 + 1))[:size]
        protos.append(runtime_pb2.Tensor(buffer=buffer, size=proto.size, dtype=proto.dtype, compression=proto.compression))
    out = decode(protos, PAYLOAD_METADATA)
    assert [tuple(t.shape) for t in out] == [(3, 5), (2, 2), (1, 1, 5, 5), (11,), (6,), (9,)]
    assert set(out[5].view(torch.uint8).tolist()) <= {0, 1}  # raw bool bytes are normalised
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float64 and out[2].dtype == torch.bfloat16


def test_raw_tensors_pass_through_unchanged():
    """A forwarding peer decodes without building tensors and re-encodes what it got: bit for bit the same
    tensors arrive, masks still bit-packed, shared tensors still sent once."""
    shared = torch.randn(1, 4, 8)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    obj = {"hidden": torch.randn(1, 4, 16, dtype=torch.bfloat16), "rotary": (shared, shared), "mask": mask,
           "flags": torch.tensor([True, False]), "cache": CacheRef("s"), "n": 3}
    data = encode_message(obj)
    raw = decode_message(data, raw_tensors=True)
    assert type(raw["hidden"]).__name__ == "RawTensor" and raw["rotary"][0] is raw["rotary"][1]
    again = encode_message({**raw, "extra": torch.ones(2)})  # a raw tensor and a new one in one message
    assert len(again) < len(data) + 200  # nothing re-serialized bigger (the mask stays bit-packed)
    got = decode_message(again)
    assert_same({k: v for k, v in got.items() if k != "extra"}, obj)
    assert got["rotary"][0] is got["rotary"][1]
    assert torch.equal(got["extra"], torch.ones(2))
    with pytest.raises(WireError):  # the structure is still checked
        decode_message(b"\x00garbage", raw_tensors=True)


def test_raw_keys_build_this_hops_part_and_pass_the_rest_on():
    """A peer running a pushed step builds the tensors it uses and keeps the later hops' part as it came:
    a tensor only the later hops use is not even checked here (the peer that uses it checks it), one
    used by both is built for this peer and passed on raw."""
    shared, later_only = torch.randn(1, 4, 8), torch.randn(3, 3)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    obj = {"hidden": torch.randn(1, 4, 16), "rotary": shared,
           "next": [{"peer": "b", "request": {"rotary": shared, "mask": mask, "x": later_only}}]}
    tensors, metadata = encode(obj)
    got = decode(tensors, metadata, raw_keys=("next",))
    assert isinstance(got["rotary"], torch.Tensor) and torch.equal(got["rotary"], shared)
    request = got["next"][0]["request"]
    assert all(isinstance(request[k], RawTensor) for k in ("rotary", "mask", "x"))
    # passed on with a new hidden state, the next peer gets bit-identical tensors, the mask still bit-packed
    data = encode_message({**request, "hidden": raw_tensor(torch.ones(2))})
    assert_same(decode_message(data), {"rotary": shared, "mask": mask, "x": later_only, "hidden": torch.ones(2)})

    # a corrupt tensor of the later hops' part: not this peer's business; of its own part: refused here
    index = metadata_index_of(tensors, later_only)
    broken = list(tensors)
    broken[index] = runtime_pb2.Tensor(buffer=b"\x00" * 3, size=[3, 3], dtype="float32")
    assert isinstance(decode(broken, metadata, raw_keys=("next",))["next"][0]["request"]["x"], RawTensor)
    with pytest.raises(WireError, match="carries 3"):
        decode(broken, metadata)
    # the structure is checked everywhere: a reference to no tensor under `next` is refused with its path
    version, specs, tree = msgpack.unpackb(metadata)
    tree["next"][1]["request"]["x"][1] = len(tensors)
    with pytest.raises(WireError, match=re.escape("metadata at next[0]['request']['x']: tensor reference")):
        decode(tensors, msgpack.packb([version, specs, tree]), raw_keys=("next",))


def metadata_index_of(protos, tensor: torch.Tensor) -> int:
    """The proto carrying `tensor`'s bytes."""
    data = tensor.numpy().tobytes()
    return next(i for i, p in enumerate(protos) if p.buffer == data)
