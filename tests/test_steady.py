"""A session's next step refilled from its last one (`peer.steady`): only when the bytes say it is the same request
but for its step and tensor values, never for anything else, and never into a tensor something kept."""

from __future__ import annotations

import pytest
import torch

from peer.steady import SteadySteps
from swarm.chain import FORWARDED_KEYS, deliver, link_hops, plan_forward
from swarm.protocol import CacheRef, StepRequest, StepResponse
from swarm.wire import WireError, decode_message, encode_message


def _request(step: int, seed: int, *, session: str = "s1", max_length: int | None = 64, rows: int = 1,
             mask: torch.Tensor | None = None, pushed: bool = False, last: bool = False) -> bytes:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 1, 8, generator=g)
    cos, sin = torch.randn(rows, 1, 4, generator=g), torch.randn(rows, 1, 4, generator=g)
    kwargs = {"position_embeddings": (cos, sin), "position_ids": torch.tensor([[step + 5]]), "cache": CacheRef(session),
              "attention_mask": mask, "use_cache": True}
    request = StepRequest(0, 2, hidden, [((), kwargs)], [0, 0], session_id=session, cache_class="DynamicCache",
                          max_length=max_length, step=step)
    if pushed:
        later = StepRequest(2, 4, torch.empty(0), [((), kwargs)], [0, 0], session_id=session, step=step,
                            session_key="k" * 32, hop_timeout=5.0)
        request.next = link_hops([("peer-b", {k: v for k, v in later.to_wire().items() if k != "hidden" and v is not None})])
        request.trail = []
    if last:  # the last hop of a pushed step with tail delivery: the outputs before it, as a forwarding peer sends them
        request.session_key, request.owner, request.hop_timeout, request.tail = "k" * 32, "client", 5.0, True
        request.trail = [torch.randn(rows, 1, 8, generator=g) for _ in range(2)]
    return encode_message(request.to_wire())


def _full(data: bytes) -> StepRequest:
    return StepRequest.from_wire(decode_message(data, raw_keys=FORWARDED_KEYS))


def _same(a: StepRequest, b: StepRequest) -> None:
    assert (a.start, a.end, a.layer_calls, a.session_id, a.step, a.max_length) == (b.start, b.end, b.layer_calls, b.session_id, b.step, b.max_length)
    assert torch.equal(a.hidden, b.hidden)
    (args_a, kw_a), (args_b, kw_b) = a.calls[0], b.calls[0]
    assert args_a == args_b and kw_a.keys() == kw_b.keys()
    for x, y in zip(kw_a["position_embeddings"], kw_b["position_embeddings"]):
        assert torch.equal(x, y)
    assert torch.equal(kw_a["position_ids"], kw_b["position_ids"])


def test_the_next_step_of_a_session_is_refilled_and_equals_its_full_decode():
    steady = SteadySteps()
    first = steady.decode(_request(3, 0), "client")
    steady.settle(first)
    for step in range(4, 8):
        data = _request(step, step)
        got = steady.decode(data, "client")
        assert got is first  # the same request object, its tensors refilled in place
        _same(got, _full(data))
        steady.settle(got)
    assert steady.hits == 4 and len(steady) == 1


def test_a_pushed_step_passes_the_new_tensors_on_and_its_forward_is_the_same_bytes():
    steady = SteadySteps()
    steady.settle(steady.decode(_request(3, 0, pushed=True), "client"))
    data = _request(4, 1, pushed=True)
    got, want = steady.decode(data, "client"), _full(data)
    assert steady.hits == 1
    _same(got, want)
    assert [t.proto.buffer for t in got.next.tensors] == [t.proto.buffer for t in want.next.tensors]
    assert got.trail == want.trail == []
    out = torch.randn(1, 1, 8)
    assert plan_forward(got, out, "client").request == plan_forward(want, out, "client").request


@pytest.mark.parametrize("change", ["session", "max_length", "rows", "owner", "step+2", "same step", "key order"])
def test_anything_but_the_next_step_number_and_the_values_is_decoded_in_full(change):
    steady = SteadySteps()
    template = steady.decode(_request(3, 0), "client")
    steady.settle(template)
    owner = "other" if change == "owner" else "client"
    step = {"step+2": 5, "same step": 3}.get(change, 4)
    if change == "key order":  # the same request with `step` not written last: never refilled
        msg = _full(_request(step, 1)).to_wire()
        msg = {"step": msg.pop("step"), **msg}
        data = encode_message(msg)
    else:
        data = _request(step, 1, session="s2" if change == "session" else "s1",
                        max_length=65 if change == "max_length" else 64, rows=2 if change == "rows" else 1)
    got = steady.decode(data, owner)
    assert steady.hits == 0 and got is not template
    _same(got, _full(data))


def test_bit_packed_masks_and_bool_tensors_are_never_refilled():
    steady = SteadySteps()
    for step, mask in enumerate([torch.zeros(1, 1, 1, 4), torch.tensor([[True, False, True]])] * 2):
        if mask.dtype != torch.bool:
            mask[..., 1] = torch.finfo(torch.float32).min  # an additive mask: travels bit-packed
        request = steady.decode(_request(step + 1, step, mask=mask), "client")
        steady.settle(request)
    assert steady.hits == 0 and len(steady) == 0


def test_a_tensor_kept_after_its_step_is_never_refilled():
    """A block or a cache that keeps an argument (here: the test itself) must not see it change at the next step:
    the template is dropped instead."""
    steady = SteadySteps()
    first = steady.decode(_request(3, 0), "client")
    kept = first.hidden
    before = kept.clone()
    steady.settle(first)
    assert steady.dropped == 1 and len(steady) == 0
    nxt = steady.decode(_request(4, 1), "client")
    assert nxt is not first and steady.hits == 0
    assert torch.equal(kept, before)


def test_a_template_is_not_refilled_while_its_step_runs():
    steady = SteadySteps()
    first = steady.decode(_request(3, 0), "client")  # not settled: still running
    second = steady.decode(_request(4, 1), "client")
    assert second is not first and steady.hits == 0
    assert torch.equal(first.hidden, _full(_request(3, 0)).hidden)  # the running one is untouched


def test_garbage_still_gets_the_full_decoders_error():
    steady = SteadySteps()
    steady.settle(steady.decode(_request(3, 0), "client"))
    good = _request(4, 1)
    with pytest.raises(WireError):
        steady.decode(good[:-3], "client")  # truncated protobuf
    with pytest.raises(WireError):
        steady.decode(b"\x0a\xff\xff", "client")
    assert steady.decode(good, "client").step == 4 and steady.hits == 1  # and the session goes on


@pytest.mark.parametrize("kind", ["pushed", "last", "own reply"])
def test_what_a_refilled_step_sends_on_is_the_bytes_swarm_chain_builds(kind):
    """The next request of a pushed step, the last hop's reply kept for the client, and a step's own reply (a
    one-peer route, or no push) are put together from the framing learnt at the first step (as `peer.handler`
    does); they must be exactly what `swarm.chain` (or, for the own reply, `encode_message`) builds from the full
    decode of the same bytes."""
    steady = SteadySteps()
    for step in (3, 4, 5, 127, 128, 129):  # 127 -> 128: the step takes two bytes from there, the lengths change
        data = _request(step, step, pushed=kind == "pushed", last=kind == "last")
        got, want = steady.decode(data, "peer-a"), _full(data)
        out = torch.randn(1, 1, 8)
        if kind == "pushed":
            built, sent = plan_forward(want, out, "peer-a").request, steady.forward(got, out)
            sent = sent and sent.request
        elif kind == "last":
            built, sent = deliver(want, out, "peer-a").data, steady.deliver(got, out, "peer-a")
            sent = sent and sent.data
        else:
            built, sent = encode_message(StepResponse(hidden=out).to_wire()), steady.reply(got, out)
        if sent is None:  # what the handler does: swarm.chain builds it, and steady learns from it
            steady.learn(got, built, reply=kind == "own reply")
        else:
            assert sent == built
        steady.settle(got)
    # 3 and 127 were decoded in full (127 does not follow 5) and taught the framing; the other four were refilled
    assert steady.hits == steady.assembled == 4


def test_a_pushed_or_delivered_step_gets_no_refilled_own_reply():
    """Its own reply is not the bytes such a step answers with: `reply` leaves those to the handler."""
    for kind in ("pushed", "last"):
        steady = SteadySteps()
        for step in (3, 4):
            got = steady.decode(_request(step, step, pushed=kind == "pushed", last=kind == "last"), "peer-a")
            out = torch.randn(1, 1, 8)
            steady.learn(got, encode_message(StepResponse(hidden=out).to_wire()), reply=True)
            assert steady.reply(got, out) is None
            steady.settle(got)


def test_the_step_is_packed_as_msgpack_packs_it():
    import msgpack

    from peer.steady import _packed_step

    for step in [*range(70_000), 1 << 20, (1 << 31) - 1]:
        assert _packed_step(step) == msgpack.packb(step)
