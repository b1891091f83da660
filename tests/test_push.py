"""Pushed session steps: the client sends once per step, peers forward along the route (docs/wire.md).

Two parts:
- in-process peers (the real handler, runner, codec and `swarm.chain`) behind a transport whose links
  fail on cue, the client's as well as the peers' own: exact checks of what a broken chain falls back to;
  the session key on the runner; the `next` field's validation;
- real processes (`swarm dht`, `swarm run-peer`, a 3-hop route with replicas of the later hops): tokens and
  logits equal the local model's, one client call per step, kill -9 and SIGSTOP of the middle and last
  peers mid-generation, bad chain entries and forwarded requests without the session key.

Every generation is compared with the same checkpoint run whole in this process (float32: same tokens).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.inprocess import start_local_peers
from peer.runner import BlockRunner, SessionError
from swarm.client import DistributedModelMixin
from swarm.local import LocalTransport, _Pushed
from swarm.model import load_client_model
from swarm.chain import link_hops
from swarm.protocol import PROTOCOL_VERSION, ChainLink, ProtocolError, StepRequest, StepResponse
from swarm.router import PeerUnreachable, RetryPolicy, SwarmRouter
from swarm.routing import MissingBlocksError, Span
from swarm.wire import CacheRef, decode_message, encode_message
from tests.disturb import Directory, generate_and_disturb, peer_named
from tests.tiny_models import save_test_llama, save_tiny

FAST = RetryPolicy(ban_base_s=0.5, ban_max_s=2.0, heal_timeout_s=1.0, poll_interval_s=0.05)
GREEDY = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------------------------------------------
# in-process


class ChainFaults:
    """In-process peers that forward pushed steps, with faults on any link.

    `step` is the client's call, `forward` a peer's call to the next one. `dead` peers answer nobody;
    `cut` peers answer peers but not the client; `lose[peer] = n`: the n-th forwarded step `peer` gets is
    run, but its reply does not reach the peer that forwarded it.
    """

    def __init__(self, peers, tail: bool = False):
        self.inner = LocalTransport(peers, forward_via=self.forward)
        self.tail = tail  # tail delivery: the client collects from the last peer (unless it is dead or cut)
        self.collected = 0
        self.client_calls: list[str] = []
        self.forwards: list[str] = []
        self.dead: set[str] = set()
        self.cut: set[str] = set()
        self.lose: dict[str, int] = {}

    def step(self, peer_id: str, request: bytes, timeout: float | None = None) -> bytes:
        self.client_calls.append(peer_id)
        if peer_id in self.dead or peer_id in self.cut:
            raise PeerUnreachable(f"peer {peer_id} is unreachable")
        return self.inner.step(peer_id, request)

    def collects(self, first: str, last: str) -> bool:
        return self.tail

    def push(self, first: str, request: bytes, last: str, collect, timeout: float):
        pushed = _Pushed(self.step(first, request), None)
        if last not in self.dead and last not in self.cut:
            kept = self.inner.kept.get((last, collect.session_id))
            if kept is not None and kept.step == collect.step:
                pushed = _Pushed(pushed.chain(), kept.data)
                self.collected += 1
        return pushed

    def forward(self, peer_id: str, request: bytes, sender: str) -> bytes:
        self.forwards.append(peer_id)
        if peer_id in self.dead:
            raise PeerUnreachable(f"peer {peer_id} is dead")
        reply = self.inner.call(peer_id, request, sender)
        if peer_id in self.lose:
            self.lose[peer_id] -= 1
            if self.lose[peer_id] == 0:
                del self.lose[peer_id]
                raise PeerUnreachable(f"the reply of peer {peer_id} was lost")
        return reply

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        if peer_id in self.dead or peer_id in self.cut:
            raise PeerUnreachable(f"peer {peer_id} is dead")
        self.inner.close_session(peer_id, session_id)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = save_tiny("llama", tmp_path_factory.mktemp("push"))  # 6 blocks
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_split(path, ranges, push=True, visible=None, tail=False):
    peers = start_local_peers(path, ranges)
    transport = ChainFaults(peers, tail=tail)
    spans = [Span(p.peer_id, p.start, p.end) for p in peers]
    directory = Directory(spans if visible is None else [spans[i] for i in visible])
    routers = []

    def make_router(layout, config):
        routers.append(SwarmRouter(layout.num_blocks, directory, transport, rng=random.Random(0), policy=FAST, push=push))
        return routers[0]

    model = load_client_model(path, make_router, auto_class=AutoModelForCausalLM, dtype=torch.float32,
                              mixin=DistributedModelMixin)
    return model, peers, transport, directory, routers[0]


class AtToken:
    """A `generate` streamer that calls `action()` when the `n`-th batch of tokens comes (the prompt is the first)."""

    def __init__(self, n: int, action):
        self.n, self.action, self.seen = n, action, 0

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.action()

    def end(self) -> None:
        pass


def route_now(router):
    """The hops of the router's one open session."""
    (state,) = router._states.values()
    return state.hops


def ids(n=5, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("push, tail", [(True, False), (True, True), (False, False)], ids=["push", "tail", "hop-by-hop"])
def test_a_pushed_step_is_one_client_call_and_gives_the_same_tokens(llama, push, tail):
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 2), (2, 4), (4, 6)], push=push, tail=tail)
    want = local.generate(ids(), **GREEDY)
    with split.inference_session(max_length=64):
        assert torch.equal(split.generate(ids(), **GREEDY), want)
        hops = route_now(router)
    steps = GREEDY["max_new_tokens"]  # forward passes: the prefill and 19 decode steps
    assert len(transport.client_calls) == (steps if push else 3 * steps)
    assert len(transport.forwards) == (2 * steps if push else 0)
    assert transport.collected == (steps if tail else 0)  # every step's outputs came from the last peer
    # the prefill opens the sessions, the first decode step is decoded in full; every later one is refilled
    assert [p.handler.steady.hits for p in peers] == [steps - 2] * 3
    # and what they send on is put together: the next request, the last peer's kept reply with tail delivery, or,
    # hop by hop and from the last peer of a nested chain, the step's own reply
    assert [p.handler.steady.assembled for p in peers] == [steps - 2] * 3
    # hop by hop, the client refills its requests to each peer and their replies (pushed: the state's, next test)
    assert [(h.requests.hits, h.replies.hits) for h in hops] == [(0 if push else steps - 2,) * 2] * 3
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)  # reorders ride along, pushed
    assert torch.equal(split.generate(ids(), **beams), local.generate(ids(), **beams))
    import gc

    gc.collect()  # generate's own caches are closed on the peers when collected
    assert sum(p.handler.runner.num_sessions for p in peers) == 0


@pytest.mark.parametrize("tail", [False, True], ids=["nested", "tail"])
def test_a_refilled_request_is_the_bytes_the_full_build_gives(llama, tail, monkeypatch):
    """The router's refilled decode-step requests (`swarm.wire.RepeatEncoder`) against what building and encoding
    each of them in full gives, step by step in a real generation: byte for byte."""
    from swarm.wire import RepeatEncoder

    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 2), (2, 4), (4, 6)], tail=tail)
    encode, compared = RepeatEncoder.encode, []

    def checked(self, key, tensors, last_int, build):
        hits = self.hits
        data = encode(self, key, tensors, last_int, build)
        if self.hits > hits:
            compared.append(data == encode_message(build()))
        return data

    monkeypatch.setattr(RepeatEncoder, "encode", checked)
    assert torch.equal(split.generate(ids(), **GREEDY), local.generate(ids(), **GREEDY))
    assert compared == [True] * (GREEDY["max_new_tokens"] - 2)


@pytest.mark.parametrize("tail", [False, True], ids=["nested", "tail"])
def test_a_step_copies_the_callers_arguments_while_the_peers_run_it(llama, tail):
    """The replay history's copies of a step's input and arguments (`_Step.keep`) are made once the pushed step is
    sent, before its reply is read (with tail delivery: off the token's path), and by the time the step returns
    either way; the history never holds the caller's own objects."""
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 2), (2, 4), (4, 6)], tail=tail)
    passed, kept_before_reply = [], []
    run = router._run

    def recording_run(session, hidden, layer_calls, attn):
        passed.append((hidden, layer_calls[0][1]["position_embeddings"][0]))
        return run(session, hidden, layer_calls, attn)

    push = transport.push

    def checking_push(*args):
        pushed = push(*args)
        first = pushed.first

        def first_after_keep(*a, **k):  # the reply is read now: the copies must be made
            (state,) = router._states.values()
            kept_before_reply.append(state.steps[-1].unkept is None)
            return first(*a, **k)

        pushed.first = first_after_keep
        return pushed

    router._run, transport.push = recording_run, checking_push
    with split.inference_session(max_length=64):
        assert torch.equal(split.generate(ids(), **GREEDY), local.generate(ids(), **GREEDY))
        (state,) = router._states.values()
        assert len(state.steps) == len(passed) == GREEDY["max_new_tokens"]
        # the prefill and the first decode step are encoded in full, every later request is refilled (and so is
        # every later collected reply, with tail delivery): the peers' steady hits above show the bytes are the same
        steps = len(passed)
        assert (state.requests.hits, state.replies.hits) == (steps - 2, steps - 2 if tail else 0)
        for step, (hidden, cos) in zip(state.steps, passed):
            assert step.unkept is None and step.calls is not None
            assert step.inputs[0] is not hidden and torch.equal(step.inputs[0], hidden)
            kept_cos = step.calls.expand()[0][1]["position_embeddings"][0] if step.calls.copied else None
            if kept_cos is not None:  # decode steps' arguments are copied (a prefill's are encoded)
                assert kept_cos is not cos and torch.equal(kept_cos, cos)
    assert kept_before_reply == ([True] * len(passed) if tail else [])


@pytest.mark.parametrize("tail", [False, True], ids=["nested", "tail"])
@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_peer_dying_inside_the_chain_is_replaced_and_replayed_exactly(llama, where, tail):
    path, local = llama
    split, peers, transport, *_ = make_split(path, [(0, 2), (2, 4), (4, 6), (2, 4), (4, 6)], tail=tail)
    router = split.swarm_capture.router
    # after the prompt and 7 new tokens: kill whichever peer serves that part of the route now
    kill = AtToken(8, lambda: transport.dead.add(route_now(router)[1 if where == "middle" else 2].hop.peer_id))
    with split.inference_session(max_length=64) as cache:
        out = split.generate(ids(), streamer=kill, **GREEDY)
        hops = cache._swarm_session.hops
    assert torch.equal(out, local.generate(ids(), **GREEDY))
    (dead,) = transport.dead
    assert dead not in {h.peer_id for h in hops}
    # after the failure, steps were pushed again along the new route: one client call per step from then on
    assert transport.client_calls[-1] == hops[0].peer_id and transport.forwards[-1] == hops[2].peer_id


@pytest.mark.parametrize("tail", [False, True], ids=["nested", "tail"])
def test_a_reply_lost_inside_the_chain_is_answered_again_without_running_twice(llama, tail):
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 2), (2, 4), (4, 6)], tail=tail)
    transport.lose[peers[2].peer_id] = 6  # peer 2 runs its 6th forwarded step; peer 1 never gets the reply
    with split.inference_session(max_length=64):
        out = split.generate(ids(), **GREEDY)
        (session,) = peers[2].handler.runner._sessions.values()
        assert session.steps == GREEDY["max_new_tokens"]  # the client's direct repeat was answered from the kept reply
    assert torch.equal(out, local.generate(ids(), **GREEDY))
    assert router.bans.active() == frozenset() and not transport.lose
    # nested: the client went to peer 2 directly once, one client call per step plus that one; with tail
    # delivery the client had collected peer 2's reply anyway, so the lost one did not matter
    assert transport.client_calls.count(peers[2].peer_id) == (0 if tail else 1)


def test_a_delivered_reply_the_client_cannot_collect_goes_on_hop_by_hop(llama):
    """Tail delivery: the last peer ran the step and kept its reply, but the client cannot reach it (the peers
    can). The chain answers DELIVERED; the step goes on hop by hop (the first peers answer from the replies they
    kept), the last peer is replaced by its replica and the session replayed there: the same tokens."""
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 2), (2, 4), (4, 6), (4, 6)], tail=True, visible=[0, 1, 2, 3])
    cut = AtToken(6, lambda: transport.cut.add(route_now(router)[2].hop.peer_id))
    with split.inference_session(max_length=64) as cache:
        out = split.generate(ids(), streamer=cut, **GREEDY)
        hops = cache._swarm_session.hops
    assert torch.equal(out, local.generate(ids(), **GREEDY))
    (cut,) = transport.cut
    assert cut not in {h.peer_id for h in hops} and len(hops) == 3
    assert transport.collected == GREEDY["max_new_tokens"] - 1  # all but the step that found the last peer cut


def test_a_step_abandoned_after_a_broken_chain_does_not_trust_the_peers_past_the_break(llama):
    """Peer 1 runs step t through the chain and forwards it to peer 2, which runs it too; peer 1's reply is lost
    and the client cannot reach peer 1: the step fails for good. The caller then sends a *different* step t;
    peer 2 must not answer it from the reply it kept."""
    path, local = llama
    split, peers, transport, directory, router = make_split(path, [(0, 2), (2, 4), (4, 6)])
    prompt = ids(6, seed=2)
    with split.inference_session(max_length=64):
        first = split.generate(prompt, max_new_tokens=4, do_sample=False)
        transport.lose[peers[1].peer_id] = 1
        transport.cut.add(peers[1].peer_id)
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 2\.\.3"):
            split.generate(first, max_new_tokens=4, do_sample=False)
        transport.cut.clear()
        router.bans = type(router.bans)(FAST.ban_base_s, FAST.ban_max_s)  # the swarm healed: forget the ban
        other = first.clone()
        other[0, -1] = (other[0, -1] + 1) % 128  # a different last token: step t's inputs differ
        second = split.generate(other, max_new_tokens=4, do_sample=False)
    assert torch.equal(second, local.generate(other, max_new_tokens=4, do_sample=False))


def test_a_prefill_too_large_for_one_message_goes_hop_by_hop(llama, monkeypatch):
    import swarm.router

    monkeypatch.setattr(swarm.router, "PUSH_MAX_BYTES", 100_000)  # what a unary message holds, scaled to the tiny model
    path, local = llama
    split, peers, transport, *_ = make_split(path, [(0, 2), (2, 4), (4, 6)])
    long_prompt = ids(200, seed=5)  # (1, 200, 64) float32 x 3 hops of nested replies: over the bound
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(long_prompt, **gen), local.generate(long_prompt, **gen))
    assert transport.client_calls[:3] == [p.peer_id for p in peers]  # the prefill: one call per hop
    assert len(transport.client_calls) == 3 + 2  # then the 2 decode steps, pushed


def _request(session="s", *, new=True, step=0, key=None, owner=None, next_=None) -> StepRequest:
    hidden = torch.zeros(1, 1, 64)
    rotary = (torch.ones(1, 1, 16), torch.zeros(1, 1, 16))
    return StepRequest(start=0, end=2, hidden=hidden, calls=[((), {"position_embeddings": rotary,
                       "past_key_values": CacheRef(session)})], layer_calls=[0, 0], session_id=session,
                       new_session=new, step=step, session_key=key, owner=owner, next=next_)


def test_a_forwarded_step_needs_the_session_key(llama):
    path, _ = llama
    (peer,) = start_local_peers(path, [(0, 2)])
    runner: BlockRunner = peer.handler.runner
    key = "0123456789abcdef0123456789abcdef"
    runner.step(_request(key=key), owner="client")  # the client opens it, with its key
    # another peer forwards step 1 for the client: without the key, or with a wrong one, it is refused
    with pytest.raises(SessionError, match="carries no session key"):
        runner.step(_request(new=False, step=1), owner="peer-a")
    with pytest.raises(SessionError, match="the session key does not match"):
        runner.step(_request(new=False, step=1, key="f" * 32, owner="client"), owner="peer-a")
    runner.step(_request(new=False, step=1, key=key, owner="client"), owner="peer-a")
    runner.step(_request(new=False, step=2), owner="client")  # and the owner goes on directly, keyless
    # a session opened by a forwarded step belongs to the client it names: that client may close it, the forwarder not
    runner.step(_request("t", key=key, owner="client"), owner="peer-a")
    with pytest.raises(SessionError, match="belongs to another client"):
        runner.close_session("t", "peer-a")
    assert runner.close_session("t", "client")
    # a session opened without a key cannot be used by anyone but its owner
    runner.step(_request("u"), owner="client")
    with pytest.raises(SessionError, match="does not match"):
        runner.step(_request("u", new=False, step=1, key=key, owner="client"), owner="peer-a")


def test_next_is_validated_strictly():
    ok = _request(key="k" * 32, next_=link_hops([("QmPeer", {"start": 2}), ("QmOther", {"start": 3})]))
    back = StepRequest.from_wire(decode_message(encode_message(ok.to_wire()))).next
    assert (back.peer, back.request, back.hops) == ("QmPeer", ok.next.request, 2)
    assert "next" not in _request().to_wire()  # an unpushed step looks as it did before push existed
    link = {"peer": "x", "tensors": [], "request": b"\x80", "hops": 1}
    bad = {
        "not a map": ({"next": [link]}, "'next' must be a map"),
        "peer not a str": ({"next": {**link, "peer": 5}}, r"next\.peer"),
        "peer too long": ({"next": {**link, "peer": "x" * 129}}, r"next\.peer"),
        "tensors not tensors": ({"next": {**link, "tensors": [1]}}, r"next\.tensors must be a list of tensors"),
        "request not bytes": ({"next": {**link, "request": {"start": 2}}}, r"next\.request must be that hop's packed request"),
        "no hops": ({"next": {**link, "hops": 0}}, r"next\.hops"),
        "too many hops": ({"next": {**link, "hops": 65}}, r"next\.hops"),
        "owner without key": ({"owner": "someone"}, "needs the session's 'session_key'"),
        "key without session": ({"session_id": None, "session_key": "k", "new_session": False, "step": None,
                                 "calls": [[[], {}]]}, "need a session"),
        "absurd hop timeout": ({"hop_timeout": 1e9}, "hop_timeout"),
        "non-ASCII key": ({"session_key": "ключ"}, "ASCII"),
    }
    for name, (fields, message) in bad.items():
        msg = {**_request().to_wire(), **fields}
        with pytest.raises(ProtocolError, match=message):
            StepRequest.from_wire(decode_message(encode_message(msg)))
    with pytest.raises(ProtocolError, match="then"):
        StepResponse.from_wire({"hidden": torch.zeros(1), "then": "not bytes"})


def test_a_bad_chain_entry_is_a_clear_error_and_the_peer_goes_on(llama):
    path, _ = llama
    peers = start_local_peers(path, [(0, 2), (2, 4)])
    transport = LocalTransport(peers)
    link = _request(step=0)
    link.start, link.end = 2, 4
    nested = link.to_wire()
    del nested["hidden"]
    req = _request("a", key="k" * 32, next_=link_hops([("nobody", nested)]))
    reply = StepResponse.from_wire(decode_message(transport.step("local-0", encode_message(req.to_wire()))))
    assert reply.then is None and "nobody" in reply.then_error["error"]["message"]  # no such peer: named, and retryable
    # a nested request that is garbage: the next peer's own error reply comes back, nested
    req = _request("b", key="k" * 32, next_=link_hops([("local-1", {"v": PROTOCOL_VERSION, "start": "x"})]))
    reply = StepResponse.from_wire(decode_message(transport.step("local-0", encode_message(req.to_wire()))))
    nested_reply = decode_message(reply.then)
    assert nested_reply["error"]["retry"] is False and "'start' must be an integer" in nested_reply["error"]["message"]
    # a packed request that is not a map, or not msgpack at all: the client's fault, said by the forwarding peer
    for junk in (b"\x91\x01", b"\xc1"):
        req = _request("c" + junk.hex(), key="k" * 32, next_=ChainLink("local-1", [], junk, 1))
        reply = StepResponse.from_wire(decode_message(transport.step("local-0", encode_message(req.to_wire()))))
        assert reply.then is None and reply.then_error["error"]["retry"] is False
        assert "next.request cannot be forwarded" in reply.then_error["error"]["message"]
    # both peers still serve
    assert "error" not in decode_message(transport.step("local-0", encode_message(_request("d").to_wire())))


# ---------------------------------------------------------------------------------------------------
# real processes

E2E_CONFIG = dict(step_timeout=3.0, heal_timeout=12.0, ban_base_s=2.0, directory_ttl=2.0)
PROMPT = torch.tensor([[11, 22, 33, 44, 55]])
LONG = dict(max_new_tokens=48, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    path = save_test_llama(tmp_path_factory.mktemp("push-e2e"), 8)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def swarm(llama8):
    from tests.processes import SwarmProcesses

    model, _ = llama8
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        names = [("0:3", "0:3"), ("3:5", "3:5"), ("3:5b", "3:5"), ("5:8", "5:8"), ("5:8b", "5:8")]
        launched = [(name, procs.start_peer(model, dht, blocks, name=name, wait=False)) for name, blocks in names]
        peers = {name: SwarmProcesses.wait_ready(proc) for name, proc in launched}
        yield procs, dht, peers


def connect(model, dht, **config):
    from swarm import AutoDistributedModelForCausalLM, ClientConfig

    return AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[dht],
                                                           client_config=ClientConfig(**{**E2E_CONFIG, **config}))


class CountingTransport:
    """The client's transport, counting the requests it sends."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def step(self, peer_id, request, timeout=None):
        self.calls += 1
        return self.inner.step(peer_id, request, timeout=timeout)

    def collects(self, first, last):
        return self.inner.collects(first, last)

    def push(self, first, request, last, collect, timeout):  # tail delivery: one call (and a collect from the last)
        self.calls += 1
        return self.inner.push(first, request, last, collect, timeout)

    def close_session(self, peer_id, session_id, wait=True):
        self.inner.close_session(peer_id, session_id, wait=wait)


def forwarded(client, peers, counter: str = "forwarded") -> dict[str, int]:
    return {name: client.swarm_connection.transport.info(proc.info["peer_id"])[counter] for name, proc in peers.items()}


def test_e2e_pushed_generation_equals_local_with_one_client_call_per_step(llama8, swarm):
    model, local = llama8
    _, dht, peers = swarm
    clients = {push: connect(model, dht, push=push) for push in (True, False)}
    try:
        before = forwarded(clients[True], peers)
        collected = forwarded(clients[True], peers, "tails_collected")
        for push, client in clients.items():
            router = client.swarm_capture.router
            router.transport = CountingTransport(router.transport)
            with client.inference_session(max_length=64):
                out = client.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(out, local.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0))
            assert router.transport.calls == (12 if push else 3 * 12), f"push={push}: {router.transport.calls} calls"
        after = forwarded(clients[True], peers)
        assert after["0:3"] - before["0:3"] == 12  # the first peer forwarded every step...
        assert sum(after[n] - before[n] for n in ("3:5", "3:5b")) == 12  # ...and so did the middle one
        assert sum(after[n] - before[n] for n in ("5:8", "5:8b")) == 0
        # tail delivery: the client collected every step's reply from the last peer, over its direct connection
        assert sum(v - collected[n] for n, v in forwarded(clients[True], peers, "tails_collected").items()) == 12
        # logits of a padded batch in a session (pushed prefill) and beam search
        ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        ids[0, :4], mask[0, :4] = 0, 0
        client = clients[True]
        beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(client.generate(PROMPT, **beams), local.generate(PROMPT, **beams))
        with torch.no_grad(), client.inference_session(max_length=32) as cache:
            got = client(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(got, local(ids, attention_mask=mask).logits)
    finally:
        for client in clients.values():
            client.swarm_connection.close()


def test_e2e_tail_delivery_over_libp2p_gives_the_same_tokens(llama8, swarm):
    """A client without direct connections (`direct="never"`) pushes its steps and collects every reply from the last
    peer over libp2p (`rpc_collect`); the peers still forward to each other directly."""
    model, local = llama8
    _, dht, peers = swarm
    client = connect(model, dht, direct="never")
    try:
        collected = forwarded(client, peers, "tails_collected")
        router = client.swarm_capture.router
        router.transport = CountingTransport(router.transport)
        with client.inference_session(max_length=64):
            out = client.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out, local.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0))
        assert router.transport.calls == 8 and router.transport.inner.direct.steps == 0
        assert sum(v - collected[n] for n, v in forwarded(client, peers, "tails_collected").items()) == 8
    finally:
        client.swarm_connection.close()


@pytest.mark.parametrize("signal_, position", [(signal.SIGKILL, 1), (signal.SIGSTOP, 2)], ids=["kill-9-middle", "sigstop-last"])
def test_e2e_a_peer_failing_inside_a_pushed_route_gives_the_same_tokens(llama8, swarm, signal_, position):
    model, local = llama8
    _, dht, peers = swarm
    client = connect(model, dht)
    want = local.generate(PROMPT, **LONG)
    hit: list[str] = []

    def disturb(hops):
        assert len(hops) == 3
        victim = peer_named(peers, hops[position].peer_id)
        hit.append(victim)
        if signal_ == signal.SIGKILL:
            peers[victim].stop(signal.SIGKILL)
        else:
            os.killpg(peers[victim].popen.pid, signal.SIGSTOP)

    router = client.swarm_capture.router
    router.transport = CountingTransport(router.transport)
    began = time.monotonic()
    try:
        out, before, after = generate_and_disturb(client, PROMPT, LONG, 12, disturb)
        assert torch.equal(out, want)
        # one call per pushed step, plus the failed hop's direct request and the replay of ~12-16 steps on its
        # replacement; the steps after it are pushed again (the replacement's session took the key at opening)
        assert router.transport.calls < LONG["max_new_tokens"] + 25, router.transport.calls
        (victim,) = hit
        assert peers[victim].info["peer_id"] not in {h.peer_id for h in after}  # re-routed to the replica
        assert len(after) == 3
        assert time.monotonic() - began < 90
        # pushing went on after the failure, through the replica
        replica = peer_named(peers, after[position].peer_id)
        assert replica != victim
        assert forwarded(client, {"0:3": peers["0:3"]})["0:3"] > 0
    finally:
        for name in hit:
            if signal_ == signal.SIGSTOP:
                os.killpg(peers[name].popen.pid, signal.SIGCONT)
        client.swarm_connection.close()


def test_e2e_bad_chain_entries_and_keyless_forwards_are_refused_clearly(llama8, swarm):
    from swarm.client import SwarmConnection

    model, local = llama8
    _, dht, peers = swarm
    first = peers["0:3"].info["peer_id"]
    honest = connect(model, dht)
    attacker = SwarmConnection([dht])
    try:
        def send(req: StepRequest) -> dict:
            return decode_message(attacker.transport.step(first, encode_message(req.to_wire())))

        def link(session, *, key=None, new=False, step=None, start=3, end=5) -> dict:
            req = _request(session, new=new, step=step, key=key)
            req.start, req.end, req.layer_calls = start, end, [0] * (end - start)
            msg = req.to_wire()
            del msg["hidden"]
            return msg

        def first_hop(session, key, next_):
            req = _request(session, key=key, next_=next_)
            req.start, req.end, req.layer_calls = 0, 3, [0, 0, 0]
            return req

        # malformed `next`: refused before any compute, the request's own fault
        bad = first_hop("x1", "k" * 32, None)
        msg = {**bad.to_wire(), "next": {"peer": 7, "tensors": [], "request": b"\x80", "hops": 1}}
        reply = decode_message(attacker.transport.step(first, encode_message(msg)))
        assert reply["error"]["retry"] is False and "next.peer" in reply["error"]["message"]
        # a peer id that is not base58: the first peer ran its part and says why it could not go on
        reply = StepResponse.from_wire(send(first_hop("x2", "k" * 32, link_hops([("not-base58-0OIl", link("x2"))]))))
        assert reply.then_error["error"]["retry"] is False and "not a base58 peer id" in reply.then_error["error"]["message"]

        # an honest session's hop on the middle peer, used through a forward without its key, or with a wrong one
        with honest.inference_session(max_length=64) as cache:
            start = honest.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
            state = honest.swarm_capture.router._states[cache._swarm_session.session_id]
            target = state.hops[1]
            middle, step_no = target.hop.peer_id, target.synced
            assert (target.hop.start, target.hop.end) == (3, 5)
            for key, needle in ((None, "carries no session key"), ("f" * 32, "does not match")):
                entry = link(target.session_id, key=key, step=step_no)
                reply = StepResponse.from_wire(send(first_hop(f"y{key}", "k" * 32, link_hops([(middle, entry)]))))
                nested = decode_message(reply.then)
                assert nested["error"]["type"] == "SessionError" and needle in nested["error"]["message"]
            # a foreign client sending straight to the middle peer: refused as ever
            direct = _request(target.session_id, new=False, step=step_no)
            direct.start, direct.end, direct.layer_calls = 3, 5, [0, 0]
            reply = decode_message(attacker.transport.step(middle, encode_message(direct.to_wire())))
            assert "belongs to another client" in reply["error"]["message"]
            more = honest.generate(start, max_new_tokens=4, do_sample=False, pad_token_id=0)  # the session goes on
        assert torch.equal(more, local.generate(PROMPT, max_new_tokens=8, do_sample=False, pad_token_id=0))
        s_first = _request("z")
        s_first.start, s_first.end, s_first.layer_calls = 0, 3, [0, 0, 0]
        assert "error" not in send(s_first)  # the first peer still serves
    finally:
        attacker.close()
        honest.swarm_connection.close()


def test_a_block_that_keeps_its_arguments_never_sees_them_refilled(llama):
    """A peer reuses a refilled request's tensors from step to step (`peer.steady`); a block (or cache) that keeps
    one must keep what it got: the template is dropped after the step that let it go, and the next step is decoded
    anew."""
    path, local = llama
    split, peers, *_ = make_split(path, [(0, 2), (2, 4), (4, 6)])
    block = peers[1].handler.runner.loaded.blocks[0]
    kept, forward = [], block.forward

    def keeping(*args, **kwargs):
        kept.append((kwargs["position_ids"], int(kwargs["position_ids"].flatten()[-1])))
        return forward(*args, **kwargs)

    block.forward = keeping
    assert torch.equal(split.generate(ids(), **GREEDY), local.generate(ids(), **GREEDY))
    assert all(int(t.flatten()[-1]) == value for t, value in kept)  # nothing it kept was overwritten since
    assert peers[1].handler.steady.dropped > 0 and peers[1].handler.steady.hits == 0
    assert peers[0].handler.steady.hits == GREEDY["max_new_tokens"] - 2  # the other peers go on refilling
