"""Fault-tolerant sessions: peers that die, hang or fail mid-generation; missing blocks; bans.

Two parts:
- in-process peers (the real handler, runner and wire codec) behind a transport that kills, freezes
  or breaks them on cue: exact checks of re-routing and replay (beam search, padded batches, chains of
  replacements, replacements starting mid-range, failures during replay, abandoned steps);
- real processes (`swarm dht`, `swarm run-peer`): kill -9 and SIGSTOP a peer in the middle of a
  64-token generation, restart it, remove a whole range.

Every generation is compared with the same checkpoint run whole in this process (float32: same tokens).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.inprocess import start_local_peers
from swarm.client import DistributedModelMixin
from swarm.local import LocalTransport
from swarm.model import load_client_model
from swarm.protocol import RemoteError, error_to_wire
from swarm.router import Bans, PeerUnreachable, ReplyLost, RetryPolicy, SessionLost, SwarmRouter
from swarm.routing import MissingBlocksError, Span
from swarm import router as router_module
from swarm.wire import encode_message
from tests.disturb import Directory, generate_and_disturb, peer_named
from tests.tiny_models import save_test_llama, save_tiny

FAST = RetryPolicy(ban_base_s=0.5, ban_max_s=2.0, heal_timeout_s=1.0, poll_interval_s=0.05)


# ---------------------------------------------------------------------------------------------------
# in-process: a transport that fails on cue


class FaultyTransport:
    """`LocalTransport` plus faults: dead peers, a peer that fails at its n-th step, lost replies, errors."""

    def __init__(self, peers):
        self.inner = LocalTransport(peers)
        self.dead: set[str] = set()
        self.calls: Counter = Counter()
        self.triggers: list[dict] = []  # armed one at a time, in order

    def kill_when(self, peers: set[str], at: int, mode: str = "dead") -> None:
        """Once the triggers before it have fired: the `at`-th step sent to any of `peers` fails, in `mode`:
        "dead" (unreachable from then on), "lost" (runs the step, the reply is lost: `ReplyLost`), "error"
        (a retryable error reply)."""
        self.triggers.append({"peers": set(peers), "at": at, "mode": mode, "seen": 0})

    def step(self, peer_id: str, request: bytes) -> bytes:
        self.calls[peer_id] += 1
        if peer_id in self.dead:
            raise PeerUnreachable(f"peer {peer_id} is dead")
        if self.triggers and peer_id in self.triggers[0]["peers"]:
            trigger = self.triggers[0]
            trigger["seen"] += 1
            if trigger["seen"] == trigger["at"]:
                self.triggers.pop(0)
                if trigger["mode"] == "dead":
                    self.dead.add(peer_id)
                    raise PeerUnreachable(f"peer {peer_id} died")
                if trigger["mode"] == "lost":
                    self.inner.step(peer_id, request)
                    raise ReplyLost(f"peer {peer_id}: the stream ended before any message arrived")
                return encode_message(error_to_wire(RuntimeError("CUDA error: an illegal memory access")))
        return self.inner.step(peer_id, request)

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        if peer_id in self.dead:
            raise PeerUnreachable(f"peer {peer_id} is dead")
        self.inner.close_session(peer_id, session_id)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = save_tiny("llama", tmp_path_factory.mktemp("rel"))  # 6 blocks
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, local


def make_split(path, ranges, visible=None, policy=FAST, seed=0):
    """A client model over in-process peers `ranges`; `visible` (indices) are in the directory at first."""
    peers = start_local_peers(path, ranges)
    transport = FaultyTransport(peers)
    spans = [Span(p.peer_id, p.start, p.end) for p in peers]
    directory = Directory(spans if visible is None else [spans[i] for i in visible])
    routers = []

    def make_router(layout, config):
        routers.append(SwarmRouter(layout.num_blocks, directory, transport, rng=random.Random(seed), policy=policy))
        return routers[0]

    model = load_client_model(
        path, make_router, auto_class=AutoModelForCausalLM, dtype=torch.float32, mixin=DistributedModelMixin
    )
    return model, peers, transport, directory, routers[0]


def ids(n=5, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def padded_batch():
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0
    return x, mask


GREEDY = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("kept_as", ["copies", "encoded"])
def test_killed_peer_is_replaced_and_replayed_exactly(llama, kept_as, monkeypatch):
    """The replay history keeps small steps' arguments as copies and larger ones wire-encoded: both replay."""
    if kept_as == "encoded":
        monkeypatch.setattr(router_module, "SNAPSHOT_COPY_BYTES", -1)
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 3), (3, 6), (3, 6)])
    replicas = {peers[1].peer_id, peers[2].peer_id}
    transport.kill_when(replicas, at=9)  # mid-generation: after the prefill and 7 decode steps
    assert torch.equal(split.generate(ids(), **GREEDY), local.generate(ids(), **GREEDY))
    assert len(transport.dead) == 1
    (dead,) = transport.dead
    # the survivor replayed the 8 earlier steps (prefill included), then went on
    survivor = (replicas - {dead}).pop()
    assert transport.calls[survivor] == 8 + (GREEDY["max_new_tokens"] - 8)


def test_beam_search_and_padded_batch_survive_failures(llama):
    path, local = llama
    split, peers, transport, *_ = make_split(path, [(0, 3), (3, 6), (0, 3), (3, 6)])
    beams = dict(max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=0)
    transport.kill_when({peers[0].peer_id, peers[2].peer_id}, at=6)  # beam reorders must be replayed in order
    assert torch.equal(split.generate(ids(), **beams), local.generate(ids(), **beams))
    assert not transport.triggers
    x, mask = padded_batch()
    transport.kill_when({peers[1].peer_id, peers[3].peer_id}, at=5, mode="lost")  # lost twice: the peer is replaced
    transport.kill_when({peers[1].peer_id, peers[3].peer_id}, at=1, mode="lost")
    got = split.generate(x, attention_mask=mask, **GREEDY)
    assert torch.equal(got, local.generate(x, attention_mask=mask, **GREEDY))
    assert not transport.triggers


def test_replacement_can_be_a_chain_or_start_mid_range(llama):
    path, local = llama
    # route 0:3 + 3:6; when 3:6 dies, only 2:5 (used from 3, mid-range) + 5:6 are left
    split, peers, transport, *_ = make_split(path, [(0, 3), (3, 6), (2, 5), (5, 6)])
    transport.kill_when({peers[1].peer_id}, at=7)
    with split.inference_session(max_length=64) as cache:
        out = split.generate(ids(), **GREEDY)
        hops = [(h.peer_id, h.start, h.end) for h in cache._swarm_session.hops]
    assert torch.equal(out, local.generate(ids(), **GREEDY))
    assert hops == [(peers[0].peer_id, 0, 3), (peers[2].peer_id, 3, 5), (peers[3].peer_id, 5, 6)]
    alive = [p for p in peers if p.peer_id not in transport.dead]
    assert sum(p.handler.runner.num_sessions for p in alive) == 0  # every session closed, replacements too


def test_failure_during_replay_and_peer_errors_reroute_again(llama):
    path, local = llama
    split, peers, transport, *_ = make_split(path, [(0, 6), (0, 3), (3, 6), (0, 6)])
    everyone = {p.peer_id for p in peers}
    transport.kill_when(everyone, at=6)  # whoever is used first dies at its 6th step
    transport.kill_when(everyone, at=3, mode="error")  # its replacement fails (retryably) while replaying
    assert torch.equal(split.generate(ids(), **GREEDY), local.generate(ids(), **GREEDY))
    assert len(transport.dead) == 1 and not transport.triggers


def test_a_lost_reply_is_repeated_and_the_peer_does_not_run_the_step_twice(llama):
    path, local = llama
    split, peers, transport, _, router = make_split(path, [(0, 3), (3, 6)])
    transport.kill_when({peers[1].peer_id}, at=6, mode="lost")  # the peer ran step 6; its reply is lost once
    with split.inference_session(max_length=64) as cache:
        out = split.generate(ids(), **GREEDY)
        runner = peers[1].handler.runner
        (session,) = runner._sessions.values()
        assert session.steps == GREEDY["max_new_tokens"]  # one per forward pass: the repeat ran nothing
        assert [h.peer_id for h in cache._swarm_session.hops] == [peers[0].peer_id, peers[1].peer_id]
    assert torch.equal(out, local.generate(ids(), **GREEDY))
    assert not transport.triggers and router.bans.active() == frozenset()


def test_stateless_forward_retries_on_another_route(llama):
    path, local = llama
    split, peers, transport, *_ = make_split(path, [(0, 3), (3, 6), (3, 6)])
    transport.dead.add(peers[1].peer_id)
    x, mask = padded_batch()
    for _ in range(3):  # whichever replica the route picks first
        with torch.no_grad():
            got = split(input_ids=x, attention_mask=mask, use_cache=False).logits
            torch.testing.assert_close(got, local(input_ids=x, attention_mask=mask, use_cache=False).logits)


def test_missing_blocks_fail_within_the_bound_then_the_session_resumes(llama):
    path, local = llama
    split, peers, transport, directory, router = make_split(path, [(0, 3), (3, 6)])
    prompt = ids(6, seed=2)
    with split.inference_session(max_length=64):
        first = split.generate(prompt, max_new_tokens=5, do_sample=False)
        transport.dead.add(peers[1].peer_id)
        began = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 3\.\.5 of 6") as err:
            split.generate(first, max_new_tokens=5, do_sample=False)
        assert time.monotonic() - began < FAST.heal_timeout_s + 3.0
        assert peers[1].peer_id in str(err.value)  # says which peer failed and why
        directory.spans = [s for s in directory.spans if s.peer_id != peers[1].peer_id]
        with pytest.raises(MissingBlocksError, match="no peer serves"):
            split.generate(first, max_new_tokens=5, do_sample=False)
        # the swarm heals: a new peer for 3:6; the same session goes on, rebuilt there by replay
        (new,) = start_local_peers(path, [(3, 6)])
        new.peer_id = "local-new"
        transport.inner.peers[new.peer_id] = new
        directory.spans.append(Span(new.peer_id, 3, 6))
        second = split.generate(first, max_new_tokens=5, do_sample=False)
    assert torch.equal(second, local.generate(prompt, max_new_tokens=10, do_sample=False))


def test_the_requests_own_errors_are_raised_at_once_without_bans(llama):
    path, _ = llama
    split, peers, transport, _, router = make_split(path, [(0, 3), (3, 6)])
    began = time.monotonic()
    with pytest.raises(RemoteError, match="not supported") as err:  # peers build only growing caches
        split.generate(ids(), max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert time.monotonic() - began < 5 and not err.value.retry
    assert router.bans.active() == frozenset()
    split2, peers2, transport2, _, router2 = make_split(path, [(0, 3), (3, 6)])
    transport2.kill_when({peers2[0].peer_id}, at=1, mode="error")
    # a peer-side failure (retry: true) with no alternative: banned, waited for, then used again
    assert split2.generate(ids(), max_new_tokens=2, do_sample=False).shape[1] == 7
    assert not transport2.triggers


def test_history_over_its_limit_ends_the_session_clearly(llama):
    path, _ = llama
    # the prefill's history (~3.3 KB: hidden states at the 2 hop boundaries, rotary tables) fits, and ~4 decode
    # steps later (~0.6 KB each) it is dropped, well before the peer dies at call 12
    tiny = RetryPolicy(ban_base_s=0.5, heal_timeout_s=1.0, poll_interval_s=0.05, max_history_bytes=6_000)
    split, peers, transport, *_ = make_split(path, [(0, 3), (3, 6), (3, 6)], policy=tiny)
    transport.kill_when({peers[1].peer_id, peers[2].peer_id}, at=12)
    with split.inference_session(max_length=64):
        with pytest.raises(SessionLost, match="max_history_bytes"):
            split.generate(ids(), **GREEDY)
        with pytest.raises(SessionLost, match="start a new session"):  # and it says so again, not something obscure
            split.generate(ids(), **GREEDY)


def test_the_replay_history_is_a_snapshot_of_the_arguments():
    """Whatever the caller does to its argument objects after a step, a replay sends what the step sent."""
    rotary = (torch.ones(1, 1, 4), torch.zeros(1, 1, 4))
    position = torch.tensor([7])
    layer_calls = [((), {"position_embeddings": rotary, "cache_position": position})] * 3
    causal = torch.ones(256, 256, dtype=torch.bool).triu(1)
    big = torch.zeros(1, 1, 256, 256).masked_fill(causal, torch.finfo(torch.float32).min)  # a prefill's mask
    original = big.clone()  # past the copy limit: kept encoded, bit-packed
    for calls, kept in ((layer_calls, "copied"), ([((), {"attention_mask": big})] * 3, "encoded")):
        snapshot = router_module._CallsSnapshot.of(calls)
        assert getattr(snapshot, kept) is not None
        for _, kwargs in calls:
            for value in kwargs.values():
                (value[0] if isinstance(value, tuple) else value).add_(1)  # the caller reuses its buffers
        expanded = snapshot.expand()
        assert len(expanded) == 3 and expanded[0] is expanded[2]  # layers that shared arguments still do
        if kept == "copied":
            assert torch.equal(expanded[1][1]["position_embeddings"][0], torch.ones(1, 1, 4))
            assert torch.equal(expanded[1][1]["cache_position"], torch.tensor([7]))
        else:
            assert torch.equal(expanded[1][1]["attention_mask"], original)
            assert snapshot.nbytes < big.numel() // 4  # a bit per element, not 4 bytes
    assert router_module._CallsSnapshot.of(layer_calls).nbytes == 4 * 4 + 4 * 4 + 8  # shared tensors count once


def test_bans_double_and_expire():
    now = [0.0]
    bans = Bans(2.0, 10.0, clock=lambda: now[0])
    assert [bans.ban("a") for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]
    assert bans.active() == {"a"}
    now[0] = 9.9
    assert bans.active() == {"a"} and bans.next_expiry() == pytest.approx(0.1)
    now[0] = 10.0
    assert bans.active() == frozenset() and bans.next_expiry() is None
    bans.succeeded("a")
    assert bans.ban("a") == 2.0  # a success starts the backoff over


# ---------------------------------------------------------------------------------------------------
# real processes: kill -9, SIGSTOP, restart, a whole range gone

E2E_CONFIG = dict(step_timeout=3.0, heal_timeout=12.0, ban_base_s=2.0, directory_ttl=2.0)
PROMPT = torch.tensor([[11, 22, 33, 44, 55]])
LONG = dict(max_new_tokens=64, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel-e2e")
    path = save_test_llama(root, 8)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    return root, path, local.generate(PROMPT, **LONG)


@pytest.fixture(scope="module")
def swarm8(llama8):
    from tests.processes import SwarmProcesses

    root, model, _ = llama8
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        peers = {}
        launched = [
            ("A", procs.start_peer(model, dht, "0:4", name="A", wait=False)),
            *[(n, procs.start_peer(model, dht, "4:8", "--identity-path", str(root / f"{n}.key"), name=n, wait=False))
              for n in ("B", "C")],
        ]
        for name, proc in launched:
            peers[name] = SwarmProcesses.wait_ready(proc)
        yield procs, dht, peers


@pytest.fixture(scope="module")
def client8(llama8, swarm8):
    from swarm import AutoDistributedModelForCausalLM, ClientConfig

    _, model, _ = llama8
    _, dht, _ = swarm8
    client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[dht], client_config=ClientConfig(**E2E_CONFIG))
    yield client
    client.swarm_connection.close()


def forward_counts(client, proc) -> tuple[int, int]:
    """Steps a peer forwarded along a pushed route, and forwards that failed (its `rpc_info`)."""
    info = client.swarm_connection.transport.info(proc.info["peer_id"])
    return info["forwarded"], info["forward_failures"]


def test_e2e_kill_9_mid_generation_gives_the_same_tokens(client8, swarm8, llama8):
    procs, dht, peers = swarm8
    killed: list[str] = []

    def kill(hops):
        victim = peer_named(peers, next(h.peer_id for h in hops if h.start == 4))
        peers[victim].stop(signal.SIGKILL)
        killed.append(victim)

    counts = forward_counts(client8, peers["A"])
    out, before, after = generate_and_disturb(client8, PROMPT, LONG, 16, kill)
    assert torch.equal(out, llama8[2])
    (victim,) = killed
    assert peers[victim].info["peer_id"] in {h.peer_id for h in before}
    assert peers[victim].info["peer_id"] not in {h.peer_id for h in after}  # re-routed to the replica
    # the steps were pushed (A forwarded them to 4:8), the chain broke at the killed peer, and pushing went on
    forwarded, failures = (a - b for a, b in zip(forward_counts(client8, peers["A"]), counts))
    assert failures >= 1 and forwarded >= 64 - 16


def test_e2e_frozen_peer_times_out_and_the_restarted_peer_is_used_again(client8, swarm8, llama8):
    from tests.processes import SwarmProcesses

    procs, dht, peers = swarm8
    root, model, want = llama8
    (dead,) = [name for name in ("B", "C") if not peers[name].alive]
    old_id = peers[dead].info["peer_id"]
    peers[dead] = SwarmProcesses.wait_ready(
        procs.start_peer(model, dht, "4:8", "--identity-path", str(root / f"{dead}.key"), name=dead, wait=False)
    )
    assert peers[dead].info["peer_id"] == old_id  # the same identity: the client had banned it
    frozen: list[str] = []

    def freeze(hops):
        victim = peer_named(peers, next(h.peer_id for h in hops if h.start == 4))
        os.killpg(peers[victim].popen.pid, signal.SIGSTOP)
        frozen.append(victim)

    counts = forward_counts(client8, peers["A"])
    began = time.monotonic()
    try:
        out, before, after = generate_and_disturb(client8, PROMPT, LONG, 16, freeze)
    finally:
        for name in frozen:
            os.killpg(peers[name].popen.pid, signal.SIGCONT)
    assert torch.equal(out, want)
    forwarded, failures = (a - b for a, b in zip(forward_counts(client8, peers["A"]), counts))
    assert failures >= 1 and forwarded >= 64 - 16  # A waited for the frozen peer, gave up, and pushing went on
    (victim,) = frozen
    used = {h.peer_id for h in before} | {h.peer_id for h in after}
    assert peers[victim].info["peer_id"] not in {h.peer_id for h in after}
    assert old_id in used  # the restarted peer served this session (from the start, or as the replacement)
    assert time.monotonic() - began < 90


def test_e2e_all_peers_of_a_range_gone_fail_clearly_within_the_bound(client8, swarm8):
    procs, dht, peers = swarm8
    for name in ("B", "C"):
        peers[name].stop(signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(MissingBlocksError, match=r"block\(s\) 4\.\.7 of 8"):
        client8.generate(PROMPT, max_new_tokens=4, do_sample=False)
    bound = E2E_CONFIG["heal_timeout"] + 2 * E2E_CONFIG["step_timeout"] + 5
    assert time.monotonic() - began < bound
