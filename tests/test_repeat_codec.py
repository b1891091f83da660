"""swarm.wire's codecs for a stream of messages of one framing (a session's decode steps): every result equals the
full codec's, and anything but new tensor values falls back to it."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.wire import (
    CacheRef, RawTensor, RepeatDecoder, RepeatEncoder, WireError, decode_message, encode_message, raw_tensor, skeleton,
)
from tests.test_wire import assert_same


def reply(seed: int, shape=(1, 1, 16), dtype=torch.float32, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"v": 4, "hidden": torch.randn(shape, generator=g).to(dtype),
            "trail": [torch.randn(shape, generator=g).to(dtype), torch.arange(3) + seed], **extra}


def test_repeated_replies_decode_as_in_full_into_fresh_tensors():
    decoder = RepeatDecoder()
    seen = []
    for seed in range(20):
        data = encode_message(reply(seed))
        got = decoder.decode(data)
        assert_same(got, decode_message(data))
        seen.append(got)
    assert decoder.hits == 19  # the first is decoded in full and learnt
    seen[0]["hidden"].add_(1)  # results own their memory: writable, shared with neither the bytes nor each other
    assert_same(seen[1], decode_message(encode_message(reply(1))))


@pytest.mark.parametrize("change", ["shape", "dtype", "metadata", "tensor count"])
def test_a_reply_of_another_framing_is_decoded_in_full_and_learnt(change):
    decoder = RepeatDecoder()
    decoder.decode(encode_message(reply(0)))
    other = {"shape": reply(1, shape=(1, 2, 16)), "dtype": reply(1, dtype=torch.float64),
             "metadata": reply(1, extra=1), "tensor count": {**reply(1), "more": torch.ones(2)}}[change]
    for seed in (1, 2):
        data = encode_message(other if seed == 1 else {**other, "hidden": other["hidden"] * 2})
        assert_same(decoder.decode(data), decode_message(data))
    assert decoder.hits == 1  # the second of the new framing
    data = encode_message(reply(3))  # back to the first framing: in full again
    assert_same(decoder.decode(data), decode_message(data))
    assert decoder.hits == 1


def test_bool_bit_packed_and_compressed_tensors_are_never_copied():
    for message in ({"m": torch.tensor([True, False, True])},
                    {"mask": torch.zeros(1, 1, 4, 4).masked_fill_(torch.eye(4, dtype=torch.bool), torch.finfo(torch.float32).min)}):
        decoder = RepeatDecoder()
        for _ in range(3):
            data = encode_message(message)
            assert_same(decoder.decode(data), decode_message(data))
        assert decoder.hits == 0
    decoder = RepeatDecoder()
    for seed in range(3):
        data = encode_message(reply(seed), activation_compression=runtime_pb2.CompressionType.FLOAT16)
        assert_same(decoder.decode(data), decode_message(data))
    assert decoder.hits == 0


def test_bad_bytes_after_a_learnt_framing_are_a_wire_error_and_the_framing_survives():
    decoder = RepeatDecoder()
    good = encode_message(reply(0))
    decoder.decode(good)
    bad_header = bytearray(encode_message(reply(1)))
    bad_header[-3] ^= 0xFF  # inside the metadata: same length, not the learnt bytes, decoded in full
    for data in (good[:-1], b"\x00" * len(good), bytes(bad_header), b"garbage"):
        with pytest.raises(WireError):
            decoder.decode(data)
    data = encode_message(reply(2))
    assert_same(decoder.decode(data), decode_message(data))


def request_tree(hidden, calls, step, key="k"):
    return {"v": 4, "hidden": hidden, "calls": calls, "session_id": "s", "session_key": key, "step": step}


def step_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    cos, sin = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 8, generator=g)
    kwargs = {"position_embeddings": (cos, sin), "cache_position": torch.tensor([seed]), "past_key_values": CacheRef("s"),
              "use_cache": True, "attention_mask": None}
    return torch.randn(1, 1, 16, generator=g), [[[], kwargs], [[], {**kwargs, "layer": 2}]]


def test_repeated_requests_are_the_full_encodings_bytes_across_step_number_widths():
    encoder = RepeatEncoder()
    steps = [1, 2, 126, 127, 128, 129, 255, 256, 65535, 65536, 70000]
    for step in steps:
        hidden, calls = step_inputs(step)
        tensors = [hidden]
        key = skeleton(calls, tensors, {id(hidden): 0})
        data = encoder.encode(key, tensors, step, lambda: request_tree(hidden, calls, step))
        assert data == encode_message(request_tree(hidden, calls, step))
    assert encoder.hits == len(steps) - 1


def test_a_new_key_or_new_shapes_are_encoded_in_full():
    encoder = RepeatEncoder()
    built = []

    def send(step, hidden, calls, key_text="k"):
        tensors = [hidden]
        key = (skeleton(calls, tensors, {id(hidden): 0}), key_text)

        def build():
            built.append(step)
            return request_tree(hidden, calls, step, key_text)

        assert encoder.encode(key, tensors, step, build) == encode_message(request_tree(hidden, calls, step, key_text))

    send(1, *step_inputs(1))
    send(2, *step_inputs(2))
    send(3, *step_inputs(3), key_text="other key")  # what the key describes changed: built
    hidden, calls = step_inputs(4)
    send(4, torch.randn(1, 2, 16), calls, key_text="other key")  # a caller's key that misses a shape: still built
    assert built == [1, 3, 4]


def test_nothing_is_learnt_when_a_tensor_of_the_message_is_not_among_the_given_ones():
    encoder = RepeatEncoder()
    for step in range(1, 4):
        hidden, calls = step_inputs(step)
        extra = torch.full((2,), float(step))  # in the message, unknown to the encoder: its bytes would go stale

        def build():
            tree = {**request_tree(hidden, calls, step), "extra": extra}
            tree["step"] = tree.pop("step")  # still the last key: only the unknown tensor stops the learning
            return tree

        assert encoder.encode("key", [hidden], step, build) == encode_message(build())
    assert encoder.hits == 0


def test_nothing_is_learnt_for_bool_or_mask_tensors_or_a_step_that_is_not_last():
    cases = {
        "bool": lambda s: ({"v": 4, "m": torch.tensor([True, s % 2 == 0]), "step": s}, "m"),
        "mask": lambda s: ({"v": 4, "m": torch.zeros(1, 1, 2, 2), "step": s}, "m"),
        "step not last": lambda s: ({"v": 4, "m": torch.randn(3), "step": s, "after": 1}, "m"),
    }
    for name, make in cases.items():
        encoder = RepeatEncoder()
        for step in range(1, 4):
            tree, field = make(step)
            assert encoder.encode(name, [tree[field]], step, lambda: tree) == encode_message(tree), name
        assert encoder.hits == 0, name


def test_skeleton_tells_apart_what_encodes_differently():
    a, b = torch.zeros(2), torch.zeros(2)

    def of(obj):
        return skeleton(obj, [])

    assert of({"x": (a, b, 1)}) == of({"x": (torch.ones(2), torch.ones(2), 1)})
    assert of({"x": (a, a)}) != of({"x": (a, b)})  # shared once vs two tensors
    assert of([1]) != of([True]) != of([1.0])
    assert of([a]) != of([torch.zeros(3)]) != of([torch.zeros(2, dtype=torch.float64)])
    assert of((a,)) != of([a])
    assert of([CacheRef("s")]) != of([CacheRef("t")])
    assert of([torch.zeros(2, 2).t()]) != of([torch.zeros(2, 2)])  # not contiguous
    assert of([raw_tensor(a)]) is None and of({"x": [torch.zeros(2, requires_grad=True)]}) is None
    assert of({"x": None}) == (dict, (("x", (type(None), None)),))
    assert isinstance(raw_tensor(a), RawTensor)
