"""Hostile input against a real peer process, through a raw hivemind client (no swarm client code).

A 4-block Llama is served as 0:2 by a peer with small limits (the target) and 2:4 by an ordinary
peer. While an honest client generates 48 tokens through both, an attacker sends the target
malformed protobuf and msgpack, wrong dtypes, sizes declared far larger than sent, negative and huge
lengths, unknown and foreign session ids, ranges it does not serve, more sessions than it allows, a
session over its KV budget and a request it never finishes sending. Each gets a clear error reply (or,
below our protocol, a closed stream); the target's memory stays bounded; the honest client's tokens
equal the local model's. Forged and malformed DHT records are ignored by the client's routing.
Also: a property-based fuzz of `StepRequest.from_wire`, and the reply watchdog for clients that never read.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from swarm.chain import link_hops
from swarm.protocol import ProtocolError, StepRequest
from swarm.rpc import BlockService, RpcLimits, split_message
from swarm.wire import CacheRef, WireError, decode_message, encode_message
from tests.processes import ROOT, Proc, SwarmProcesses
from tests.tiny_models import save_test_llama

LIMITS = dict(max_batch=8, max_tokens_per_step=512, max_sessions=16, max_sessions_per_client=4,
              max_session_length=256, session_ttl_s=60.0)
CACHE_TOKENS = 1024  # the target's KV budget (token slots)
RPC = dict(max_message_bytes=4 * 2**20, max_inflight_bytes=16 * 2**20, receive_timeout_s=3.0, send_timeout_s=5.0)

# a peer process with custom limits: `run-peer` takes no limit flags, so build its config here
LAUNCH = """
import functools, json, sys
import peer.server as server
from peer.runner import RunnerLimits
from swarm.rpc import BlockService, RpcLimits
cfg = json.loads(sys.argv[1])
server.BlockService = functools.partial(BlockService, limits=RpcLimits(**cfg["rpc"]))
server.PeerServer(server.PeerConfig(
    model=cfg["model"], initial_peers=[cfg["dht"]], blocks=tuple(cfg["blocks"]), announce_period_s=2.0, num_threads=1,
    cache_tokens=cfg["cache_tokens"], limits=RunnerLimits(**cfg["limits"]),
)).run()
"""


def start_limited_peer(procs: SwarmProcesses, model, dht: str, blocks: tuple[int, int]) -> Proc:
    cfg = dict(model=str(model), dht=dht, blocks=blocks, limits=LIMITS, rpc=RPC, cache_tokens=CACHE_TOKENS)
    popen = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, json.dumps(cfg)], cwd=ROOT, env=procs.env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    proc = Proc(popen, f"limited peer {blocks}")
    threading.Thread(target=proc._pump, daemon=True).start()
    procs.procs.append(proc)
    return proc


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_test_llama(tmp_path_factory.mktemp("hostile"), 4)


@pytest.fixture(scope="module")
def swarm(model):
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        target = start_limited_peer(procs, model, dht, (0, 2))
        other = procs.start_peer(model, dht, "2:4", wait=False)
        SwarmProcesses.wait_ready(target)
        SwarmProcesses.wait_ready(other)
        yield procs, dht, target, other


class Attacker:
    """A raw hivemind client: a client-mode DHT node and its libp2p stack, nothing else of swarm's client."""

    def __init__(self, dht: str):
        from swarm.client import SwarmConnection

        self.conn = SwarmConnection([dht])

    def run(self, coro, timeout: float = 30.0):
        return self.conn.loop.run(coro, timeout=timeout)

    def stream(self, peer_id: str, messages, timeout: float = 30.0):
        """Send stream messages to `rpc_step`; return the reply's decoded message (None: closed without one).

        Like swarm's client, stops reading at the reply's announced size and closes the stream (a peer
        leaves closing to the client)."""
        from hivemind.p2p import PeerID

        from swarm.rpc import EmptyStream, read_reply

        async def call():
            stub = BlockService.get_stub(self.conn.p2p, PeerID.from_base58(peer_id))
            try:
                return await read_reply(await stub.rpc_step(messages))
            except EmptyStream:
                return b""

        data = self.run(call(), timeout)
        return decode_message(data) if data else None

    def step(self, peer_id: str, payload: bytes) -> dict:
        from hivemind.utils.asyncio import iter_as_aiter

        return self.stream(peer_id, iter_as_aiter(list(split_message(payload))))

    def close(self) -> None:
        self.conn.close()


def request(start=0, end=2, *, hidden=None, session=None, new=False, ops=(), max_length=None, raw=None) -> bytes:
    """A step request, encoded with the wire codec; `raw` overwrites fields of its dict (to break any of them)."""
    hidden = torch.zeros(1, 1, 64) if hidden is None else hidden
    seq = hidden.shape[1] if hidden.ndim > 2 else 1
    rotary = (torch.ones(1, seq, 16), torch.zeros(1, seq, 16))  # (batch, seq, head_dim)
    kwargs = {"position_embeddings": rotary, **({"past_key_values": CacheRef(session)} if session else {})}
    msg = StepRequest(start=start, end=end, hidden=hidden, calls=[((), kwargs)], layer_calls=[0] * max(0, end - start),
                      session_id=session, new_session=new, cache_ops=list(ops), max_length=max_length).to_wire()
    msg.update(raw or {})
    return encode_message(msg)


def expect_error(reply, *needles: str, retry: bool | None = None) -> dict:
    assert isinstance(reply, dict) and "error" in reply, f"expected an error reply, got {reply!r:.300}"
    message = reply["error"]["message"]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if retry is not None:
        assert reply["error"]["retry"] is retry, reply["error"]
    return reply["error"]


def test_hostile_requests_get_clear_errors_memory_stays_bounded_honest_session_continues(model, swarm):
    from hivemind.proto import runtime_pb2
    from hivemind.utils.asyncio import iter_as_aiter

    from swarm import AutoDistributedModelForCausalLM

    procs, dht, target, other = swarm
    peer = target.info["peer_id"]
    local = AutoModelForCausalLM.from_pretrained(model).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = local.generate(prompt, max_new_tokens=48, do_sample=False)
    client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[dht])
    attacker, rival = Attacker(dht), Attacker(dht)
    honest: dict = {"rounds": 0, "wrong": 0}
    done = threading.Event()

    def generate():  # honest sessions, one after another, for as long as the attack lasts
        try:
            while not done.is_set() or not honest["rounds"]:
                with client.inference_session(max_length=64):
                    out = client.generate(prompt, max_new_tokens=48, do_sample=False)
                honest["rounds"] += 1
                honest["wrong"] += not torch.equal(out, want)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            honest["error"] = repr(exc)

    client.generate(prompt, max_new_tokens=1, do_sample=False)  # warm up the route
    rss_before = rss_kib(target.popen.pid)
    thread = threading.Thread(target=generate)
    thread.start()
    try:
        big = 10**12
        cases = [
            # below our protocol: the chunk is not an ExpertRequest / not a swarm.wire message
            ("garbage protobuf payload", b"\x0a\xff\xff\xff\xff\x0f" + b"\x00" * 40, ["not a valid ExpertRequest"], False),
            ("garbage msgpack", runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1 not msgpack").SerializeToString(),
             ["not valid msgpack"], False),
            ("msgpack of the wrong shape", encode_message([1, 2, 3]), ["a step request must be a map"], False),
            ("tensor declared larger than sent", _declared_larger_than_sent((1000, 1000)),
             ["declares shape (1000, 1000)", "needs 4000000 bytes, but carries 4"], False),
            ("tensor declared absurdly large", _declared_larger_than_sent((10**6, 10**6)),
             ["declares shape (1000000, 1000000)", "limit is"], False),
            # wrong types and dtypes
            ("integer hidden state", request(hidden=torch.zeros(1, 1, 64, dtype=torch.int64)), ["floating tensor"], False),
            ("string block index", request(raw={"start": "0"}), ["'start' must be an integer"], False),
            ("float reorder index", request(session="s-x", ops=[("reorder_cache", torch.zeros(1))]), ["1-D int64/int32"], False),
            ("layer rows out of range", request(raw={"layer_calls": [0, 7]}), ["is not a row of the 1 calls"], False),
            # negative and huge numbers
            ("negative block", request(start=-1, end=2), ["empty, negative or absurd"], False),
            ("huge block range", request(raw={"end": big}), ["empty, negative or absurd"], False),
            ("negative max_length", request(session="s-x", new=True, max_length=-5), ["max_length must be in"], False),
            ("huge batch repeat", request(session="s-x", ops=[("batch_repeat_interleave", 10**6)]), ["repeats must be in"], False),
            ("huge crop", request(session="s-x", ops=[("crop", 2**40)]), ["out of range"], False),
            ("1000-character session id", request(session="x" * 1000, new=True), ["1..128 characters"], False),
            ("unsupported cache class", request(session="s-y", new=True, raw={"cache_class": "StaticCache"}), ["not supported"], False),
            # this peer's range and limits (another peer might accept: retry)
            ("range not served", request(2, 4), ["this peer serves 0:2"], True),
            ("batch over the limit", request(hidden=torch.zeros(9, 1, 64)), ["limit of 8"], True),
            ("sequence over the limit", request(hidden=torch.zeros(1, 300, 64)), ["limit of 256"], True),
            ("unknown session", request(session="never-opened"), ["unknown session"], True),
            ("session over the KV budget", request(session="kv-hog", new=True, hidden=torch.zeros(8, 1, 64), max_length=256),
             ["KV cache budget exhausted"], True),
        ]
        for name, payload, needles, retry in cases:
            expect_error(attacker.step(peer, payload), *needles, retry=retry)

        # sizes announced in the stream header: far over the limit, or more than is sent
        header_only = runtime_pb2.ExpertRequest(metadata=struct.pack(">Q", big) + b"x" * 10)
        expect_error(attacker.stream(peer, iter_as_aiter([header_only])), "exceeds the limit", retry=True)
        short = runtime_pb2.ExpertRequest(metadata=struct.pack(">Q", 2**20) + b"x" * 10)
        expect_error(attacker.stream(peer, iter_as_aiter([short])), "announced 1048576 bytes, 10 arrived")
        empty = runtime_pb2.ExpertRequest(metadata=b"\x00\x01")
        expect_error(attacker.stream(peer, iter_as_aiter([empty])), "no size header")
        oversized = encode_message({"blob": b"\x00" * (5 * 2**20)})  # a real message over max_message_bytes
        expect_error(attacker.step(peer, oversized), "exceeds the limit of 4194304 bytes")

        # below hivemind's framing: bytes that are no protobuf at all; the peer drops the stream
        assert attacker.run(_raw_garbage_stream(attacker.conn.p2p, peer), 30) == b""

        # sessions: foreign ids, more than allowed
        assert "error" not in rival.step(peer, request(session="rivals", new=True))
        expect_error(attacker.step(peer, request(session="rivals")), "belongs to another client", retry=True)
        assert not _close(attacker, peer, "rivals")  # closing another client's session is refused
        assert "error" not in rival.step(peer, request(session="rivals"))  # ...and it still works for its owner
        opened = [f"mine-{i}" for i in range(LIMITS["max_sessions_per_client"])]
        for sid in opened:
            assert "error" not in attacker.step(peer, request(session=sid, new=True))
        expect_error(attacker.step(peer, request(session="one-too-many", new=True)), "limit 4", retry=True)
        for sid in opened:
            assert _close(attacker, peer, sid)

        # a client that never finishes sending: the peer answers after receive_timeout_s and goes on
        began = time.monotonic()
        reply = attacker.stream(peer, _never_finishing(), timeout=RPC["receive_timeout_s"] + 20)
        expect_error(reply, "not received within 3.0 s", retry=True)
        assert time.monotonic() - began < RPC["receive_timeout_s"] + 10
        assert "error" not in attacker.step(peer, request())  # still serving
    finally:
        done.set()
        thread.join(180)
        attacker.close()
        rival.close()
    rss_after = rss_kib(target.popen.pid)
    try:
        assert honest["rounds"] >= 1 and honest["wrong"] == 0 and "error" not in honest, honest
        grown = (rss_after["VmRSS"] - rss_before["VmRSS"]) / 1024
        print(f"\ntarget peer RSS: before {rss_before['VmRSS'] / 1024:.0f} MiB, after {rss_after['VmRSS'] / 1024:.0f} MiB, "
              f"peak {rss_after['VmHWM'] / 1024:.0f} MiB; honest 48-token sessions during the attack: {honest['rounds']}")
        assert grown < 150, f"peer RSS grew by {grown:.0f} MiB under hostile input"
        assert target.alive and other.alive
    finally:
        client.swarm_connection.close()


def test_forged_and_malformed_records_are_ignored_by_the_client(model, swarm):
    """A process cannot overwrite a peer's record; records that lie or break the schema never reach routing.
    (Signature checks themselves are tested in tests/test_registry.py; this is the client's side.)"""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils import get_dht_time
    from hivemind.utils.crypto import RSAPrivateKey

    from swarm import AutoDistributedModelForCausalLM
    from swarm.client import spans_from_records
    from swarm.registry import make_dht, peers_key

    procs, dht, target, other = swarm
    client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[dht])
    key = client.swarm_model_key
    victim = target.info["peer_id"]
    private = RSAPrivateKey()
    forger = make_dht([dht], private_key=private, client_mode=True)
    try:
        entries = forger.get(peers_key(key), latest=True).value
        subkey, item = next((s, v) for s, v in entries.items() if v.value.get("peer_id") == victim)
        forged = dict(item.value, start_block=0, end_block=4, state="online")  # claim the whole model
        expiration = get_dht_time() + 30
        want = sorted([(victim, 0, 2), (other.info["peer_id"], 2, 4)])

        def routable():
            return sorted((s.peer_id, s.start, s.end) for s in spans_from_records(client.swarm_connection.peers(key).values()))

        assert not forger.store(peers_key(key), forged, expiration, subkey=subkey)  # cannot sign as the victim
        mine = RSASignatureValidator(private).local_public_key.decode()
        assert forger.store(peers_key(key), forged, expiration, subkey=mine)  # stored, signed by the wrong key
        assert routable() == want
        malformed = dict(forged, peer_id=str(forger.peer_id), throughput="fast", end_block=99)
        forger.store(peers_key(key), malformed, expiration + 1, subkey=mine)  # nodes may keep it; readers drop it
        assert routable() == want
        prompt = torch.tensor([[7, 7, 1]])
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        assert torch.equal(client.generate(prompt, max_new_tokens=6, do_sample=False),
                           local.generate(prompt, max_new_tokens=6, do_sample=False))
    finally:
        forger.shutdown()
        client.swarm_connection.close()


def _declared_larger_than_sent(shape: tuple[int, ...]) -> bytes:
    """A valid message whose hidden-state proto declares `shape` and carries 4 bytes."""
    from hivemind.proto import runtime_pb2

    req = runtime_pb2.ExpertRequest.FromString(request(hidden=torch.full((1, 1, 64), 0.5)))
    proto = next(p for p in req.tensors if list(p.size) == [1, 1, 64])
    del proto.size[:]
    proto.size.extend(shape)
    proto.buffer = b"\x00" * 4
    return req.SerializeToString()


def _close(attacker: Attacker, peer_id: str, session_id: str) -> bool:
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    async def call():
        stub = BlockService.get_stub(attacker.conn.p2p, PeerID.from_base58(peer_id))
        return await stub.rpc_close(runtime_pb2.ExpertRequest(uid=session_id))

    return msgpack.unpackb(attacker.run(call()).metadata)["closed"]


async def _never_finishing():
    """A request stream that announces 1 MiB, sends 100 bytes and then never sends more nor ends."""
    from hivemind.proto import runtime_pb2

    yield runtime_pb2.ExpertRequest(metadata=struct.pack(">Q", 2**20) + b"x" * 100)
    await asyncio.Event().wait()


async def _raw_garbage_stream(p2p, peer_id: str):
    """Open the step handler's libp2p stream and write bytes hivemind's protobuf framing cannot parse."""
    from hivemind.p2p import P2P, PeerID

    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), "BlockService.rpc_step")
    writer.write(P2P.MESSAGE_MARKER + (40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\xff" * 40)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------------
# no processes


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12),
    st.binary(max_size=12),
    st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
              st.lists(st.integers(0, 3), max_size=3), st.sampled_from([torch.float32, torch.int64, torch.bool])),
    st.builds(CacheRef, st.text(max_size=8)),
)
_values = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(st.text(max_size=6), inner, max_size=4),
), max_leaves=12)
_fields = ["v", "start", "end", "hidden", "calls", "layer_calls", "session_id", "new_session", "cache_class",
           "cache_ops", "attn_implementation", "max_length", "step", "next", "owner", "session_key", "hop_timeout"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_step_request_from_wire_raises_only_protocol_errors(data):
    """Start from a valid request, replace any fields with anything the wire can carry: only ProtocolError."""
    msg = {**StepRequest(start=0, end=2, hidden=torch.zeros(1, 1, 4), calls=[((), {"x": torch.ones(1)})],
                         layer_calls=[0, 0], session_id="s", cache_ops=[("crop", 1)], owner="client", session_key="k" * 32,
                         hop_timeout=3.0, next=link_hops([("peer", {"start": 2})])).to_wire()}
    for name in data.draw(st.lists(st.sampled_from(_fields), max_size=4)):
        if data.draw(st.booleans()):
            msg[name] = data.draw(_values)
        else:
            msg.pop(name, None)
    if data.draw(st.booleans()):
        msg[data.draw(st.text(max_size=6))] = data.draw(_values)
    try:
        # through the real codec too: what cannot travel is not a peer's problem
        decoded = decode_message(encode_message(msg))
    except (TypeError, ValueError):
        return
    try:
        StepRequest.from_wire(decoded)
    except (ProtocolError, WireError):
        pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.integers()), st.dictionaries(st.text(), st.integers()),
                 st.binary()))
def test_fuzz_step_request_from_wire_on_any_top_level_value(value):
    with pytest.raises(ProtocolError):
        StepRequest.from_wire(value)


def test_reply_watchdog_cancels_a_stream_whose_client_never_reads():
    """hivemind writes each reply chunk from the task iterating `rpc_step`; a client that never reads
    blocks that write forever. The watchdog cancels the task after `send_timeout_s`."""

    class Backend:
        async def step(self, data: bytes, owner: str) -> bytes:
            return b"reply"

    class Context:
        class remote_id:
            @staticmethod
            def to_base58():
                return "client"

    service = BlockService(Backend(), limits=RpcLimits(send_timeout_s=0.3))

    async def requests():
        for chunk in split_message(b"request"):
            yield chunk

    async def hivemind_like_sender():
        async for _chunk in service.rpc_step(requests(), Context()):
            await asyncio.Event().wait()  # the client never reads: the write never completes

    async def main():
        task = asyncio.create_task(hivemind_like_sender())
        began = asyncio.get_running_loop().time()
        with pytest.raises(asyncio.CancelledError):
            await task
        return asyncio.get_running_loop().time() - began

    assert 0.25 < asyncio.run(main()) < 3
    assert service._inflight_steps == 0 and service._inflight_bytes == 0 and not service._per_client
