"""Direct TCP connections for steps (`swarm.direct`).

Two parts:
- the listener and the caller on a real TCP socket in this process, in front of a real `BlockService`
  (its limits included) whose backend echoes what it gets and who sent it: the ticket handshake, the
  peer's proof of its key, answers matched by id out of order, and every way to misbehave on the
  connection (no hello, a forged, reused or expired ticket, an oversized frame, a wrong frame kind, too
  many requests at once); each is refused with a reason and the listener serves the next caller.
  The ticket comes from a stand-in for the libp2p call (`TicketStub`); the real call runs in the
  second part.
- real processes (`swarm dht`, `swarm run-peer`): a pushed generation goes over direct connections
  from the client to the first peer and from peer to peer, and equals the local model's; the same with
  the client set to "never" and with a peer started with `--direct never` (libp2p only, same tokens);
  garbage on a real peer's direct port does not stop it serving.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from swarm.client import ClientConfig
from swarm.aio import BackgroundLoop
from swarm.direct import (
    FRAME, HELLO, REFUSED, REPLY, STEP, WELCOME, BlockingDirectClient, DirectClient, DirectServer, allowed, frame,
    welcome_mac,
)
from swarm.protocol import RequestRefused
from swarm.rpc import BlockService, RpcLimits
from swarm.wire import decode_message
from tests.processes import wait_until
from tests.tiny_models import save_test_llama


class EchoBackend:
    """Answers `owner|data` after `delay(data)` seconds."""

    def __init__(self):
        self.calls: list[tuple[bytes, str]] = []

    async def step(self, data: bytes, owner: str) -> bytes:
        self.calls.append((data, owner))
        if data.startswith(b"sleep:"):
            await asyncio.sleep(float(data.split(b":")[1]))
        return owner.encode() + b"|" + data


class TicketStub:
    """What `BlockService.get_stub(p2p, peer).rpc_direct` returns for `owner`, without libp2p."""

    def __init__(self, server: DirectServer, owner: str):
        self.server, self.owner = server, owner

    async def rpc_direct(self, request):
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(self.server.issue(self.owner)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def start(limits: RpcLimits | None = None, **kwargs) -> tuple[DirectServer, EchoBackend]:
    backend = EchoBackend()
    server = DirectServer(BlockService(backend=backend, limits=limits), "127.0.0.1", 0, **kwargs)
    await server.start()
    return server, backend


async def read_frame(reader) -> tuple[int, int, bytes]:
    length, kind, request_id = FRAME.unpack(await reader.readexactly(FRAME.size))
    return kind, request_id, await reader.readexactly(length)


async def hello(server: DirectServer, owner: str = "alice", ticket: dict | None = None):
    ticket = ticket or server.issue(owner)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    nonce = b"n" * 16
    writer.write(frame(HELLO, 0, ticket["ticket"] + nonce))
    kind, _, payload = await read_frame(reader)
    return reader, writer, kind, payload, ticket, nonce


def test_a_peer_on_every_interface_offers_its_network_addresses_before_loopback():
    from peer.server import direct_hosts

    maddrs = ["/ip4/127.0.0.1/tcp/5/p2p/Qm", "/ip4/192.168.1.5/tcp/5/p2p/Qm", "/ip6/::1/tcp/5", "/ip4/192.168.1.5/udp/5"]
    assert direct_hosts(maddrs) == ["192.168.1.5"]
    assert direct_hosts(["/ip4/127.0.0.1/tcp/5"]) == ["127.0.0.1"]
    assert direct_hosts(["/dns4/example.org/tcp/5"]) == []


def test_policy_allows_loopback_and_private_addresses_only_by_default():
    assert allowed("127.0.0.1", "private") and allowed("10.1.2.3", "private") and allowed("192.168.0.7", "private")
    assert allowed("::1", "private") and allowed("fd00::1", "private")
    assert not allowed("8.8.8.8", "private") and not allowed("peer.example.org", "private")
    assert allowed("8.8.8.8", "always") and not allowed("127.0.0.1", "never")
    with pytest.raises(ValueError, match="direct must be one of"):
        ClientConfig(direct="sometimes")
    with pytest.raises(ValueError, match="direct policy"):
        DirectClient(policy="sometimes")


def test_handshake_proves_the_peer_and_binds_steps_to_the_ticket_owner():
    async def main():
        server, backend = await start()
        reader, writer, kind, payload, ticket, nonce = await hello(server, "alice")
        assert kind == WELCOME and payload == welcome_mac(ticket["key"], nonce)
        assert ticket["hosts"] == ["127.0.0.1"] and ticket["port"] == server.port
        # three requests at once: the slow one is answered last, each by its own id
        for request_id, data in ((7, b"sleep:0.3"), (8, b"fast"), (9, b"sleep:0.1")):
            writer.write(frame(STEP, request_id, data))
        answers = [await read_frame(reader) for _ in range(3)]
        assert [a[1] for a in answers] == [8, 9, 7]
        assert all(kind == REPLY for kind, _, _ in answers)
        assert dict((rid, body) for _, rid, body in answers)[7] == b"alice|sleep:0.3"
        assert {owner for _, owner in backend.calls} == {"alice"}
        assert server.steps == 3
        writer.close()
        await server.close()

    run(main())


def test_forged_reused_and_expired_tickets_are_refused():
    async def main():
        now = [0.0]
        server, backend = await start(clock=lambda: now[0], ticket_ttl_s=10)
        forged = {**server.issue("alice"), "ticket": b"x" * 16}
        *_, kind, payload, _, _ = await hello(server, ticket=forged)
        assert kind == REFUSED and b"unknown or expired ticket" in payload
        ticket = server.issue("alice")
        *_, kind, _, _, _ = await hello(server, ticket=ticket)
        assert kind == WELCOME
        *_, kind, payload, _, _ = await hello(server, ticket=ticket)  # a second use
        assert kind == REFUSED and b"unknown or expired" in payload
        stale = server.issue("alice")
        now[0] = 11.0
        *_, kind, payload, _, _ = await hello(server, ticket=stale)
        assert kind == REFUSED
        assert backend.calls == []
        await server.close()

    run(main())


def test_malformed_connections_are_refused_and_the_listener_goes_on():
    async def main():
        server, backend = await start(limits=RpcLimits(max_message_bytes=1000), hello_timeout_s=0.5)
        # not a hello first
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(frame(STEP, 1, b"hi"))
        kind, _, payload = await read_frame(reader)
        assert kind == REFUSED and b"first frame must be a hello" in payload
        assert await reader.read() == b""  # and closed
        # silence: closed after the hello timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        t0 = time.monotonic()
        assert await reader.read() == b""
        assert time.monotonic() - t0 < 5
        # an oversized step: refused before its body is read, the connection closed
        reader, writer, *_ = await hello(server)
        writer.write(FRAME.pack(5000, STEP, 3))
        kind, request_id, payload = await read_frame(reader)
        assert (kind, request_id) == (REFUSED, 3) and b"exceeds the limit of 1000 bytes" in payload
        assert await reader.read() == b""
        # an unknown frame kind after the hello
        reader, writer, *_ = await hello(server)
        writer.write(frame(99, 4, b""))
        kind, _, payload = await read_frame(reader)
        assert kind == REFUSED and b"unexpected frame kind 99" in payload
        # garbage bytes
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        kind, _, _ = await read_frame(reader)
        assert kind == REFUSED
        # ... and an honest caller is served
        reader, writer, kind, *_ = await hello(server, "bob")
        writer.write(frame(STEP, 5, b"ok"))
        assert await read_frame(reader) == (REPLY, 5, b"bob|ok")
        assert backend.calls == [(b"ok", "bob")]
        await server.close()

    run(main())


def test_limits_apply_per_request_and_the_connection_stays_usable():
    async def main():
        limits = RpcLimits(max_inflight_steps_per_client=1, max_inflight_bytes=100)
        server, backend = await start(limits=limits)
        reader, writer, *_ = await hello(server, "carol")
        writer.write(frame(STEP, 1, b"sleep:0.3"))
        writer.write(frame(STEP, 2, b"second"))  # over the per-client limit while the first runs
        writer.write(frame(STEP, 3, b"y" * 200))  # over the in-flight bytes
        answers = {rid: body for _, rid, body in [await read_frame(reader) for _ in range(3)]}
        assert answers[1] == b"carol|sleep:0.3"
        for rid, reason in ((2, "requests in flight here"), (3, "bytes of requests in flight")):
            error = decode_message(answers[rid])
            assert reason in str(error), error
        writer.write(frame(STEP, 4, b"again"))
        assert await read_frame(reader) == (REPLY, 4, b"carol|again")
        assert server.service._inflight_bytes == 0 and server.service._inflight_steps == 0
        await server.close()

    run(main())


def test_the_caller_opens_one_connection_and_falls_back_where_there_is_no_path():
    async def main():
        server, backend = await start()
        client = DirectClient()
        stub = TicketStub(server, "dave")
        replies = await asyncio.gather(*(client.step(stub, "peer-a", b"sleep:0.%d" % (3 - i)) for i in range(3)))
        assert replies == [b"dave|sleep:0.%d" % (3 - i) for i in range(3)]
        assert client.steps == 3 and server.connections == 1
        # the peer's address is not allowed by the policy: no connection, the caller uses libp2p
        assert await DirectClient(policy="never").step(stub, "peer-a", b"x") is None
        public = TicketStub(server, "dave")
        public.server = type("Public", (), {"issue": lambda self, owner: {**server.issue(owner), "hosts": ["8.8.8.8"]}})()
        assert await client.step(public, "peer-b", b"x") is None
        # a peer that offers no direct path (libp2p only), and one whose port is closed
        class NoOffer:
            async def rpc_direct(self, request):
                return runtime_pb2.ExpertResponse()
        assert await client.step(NoOffer(), "peer-c", b"x") is None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        closed = TicketStub(server, "dave")
        closed.server = type("Closed", (), {"issue": lambda self, owner: {**server.issue(owner), "port": closed_port}})()
        assert await client.step(closed, "peer-d", b"x") is None
        # the peer goes away: the request in flight fails, and the next call has no path (reconnect refused)
        pending = asyncio.ensure_future(client.step(stub, "peer-a", b"sleep:5"))
        await asyncio.sleep(0.2)
        await server.close()
        with pytest.raises(ConnectionError):
            await pending
        assert await client.step(stub, "peer-a", b"x") is None  # its port is closed now: libp2p from here on
        client.close()

    run(main())


def test_the_blocking_caller_keeps_one_connection_per_thread_and_falls_back_where_there_is_no_path():
    """The client's steps go from the calling thread itself (`BlockingDirectClient`): the same handshake and
    fallbacks as `DirectClient`, a connection per thread, and a failed call leaves no half-used connection."""
    loop = BackgroundLoop()
    server, backend = loop.run(start())
    offers = {"peer-a": lambda: server.issue("erin"), "peer-b": lambda: {**server.issue("erin"), "hosts": ["8.8.8.8"]},
              "peer-c": lambda: None}
    asked: list[str] = []

    def get_offer(peer_id):
        asked.append(peer_id)
        return offers[peer_id]()

    client = BlockingDirectClient(get_offer)
    try:
        assert client.step("peer-a", b"one", 5) == b"erin|one"
        assert client.step("peer-a", b"two", 5) == b"erin|two"
        assert asked == ["peer-a"] and server.connections == 1 and client.steps == 2
        other: list[bytes] = []
        thread = threading.Thread(target=lambda: other.append(client.step("peer-a", b"three", 5)))
        thread.start()
        thread.join(10)
        assert other == [b"erin|three"] and asked == ["peer-a", "peer-a"]  # its own connection
        wait_until(lambda: server.connections == 1, 10.0, 0.02, "the ended thread's connection closed")
        # no path: an address the policy forbids, no offer at all; asked again only after retry_s
        assert client.step("peer-b", b"x", 5) is None and client.step("peer-c", b"x", 5) is None
        assert client.step("peer-b", b"x", 5) is None and asked.count("peer-b") == 1
        assert BlockingDirectClient(get_offer, policy="never").step("peer-a", b"x", 5) is None
        # no reply in time: TimeoutError, and the next call gets a fresh connection, not the late reply
        with pytest.raises(TimeoutError, match="no reply within 0.3 s"):
            client.step("peer-a", b"sleep:1", 0.3)
        assert client.step("peer-a", b"after", 5) == b"erin|after" and asked.count("peer-a") == 3
        # the peer goes away under a request: ConnectionError; then its port is closed: no path
        threading.Timer(0.3, lambda: loop.run(server.close())).start()
        with pytest.raises(ConnectionError):
            client.step("peer-a", b"sleep:5", 10)
        assert client.step("peer-a", b"x", 5) is None
    finally:
        client.close()
        loop.close()


def test_the_blocking_caller_waits_awake_only_for_quick_replies_and_only_alone():
    """`SpinWait`: a reply is polled for (a busy thread, not a sleeping one) up to the budget, only while recent
    replies came within it, and only while no other thread of the client waits; with a budget of 0, never."""
    loop = BackgroundLoop()
    server, _ = loop.run(start())
    get_offer = lambda peer_id: server.issue("erin")  # noqa: E731
    client, sleeper = BlockingDirectClient(get_offer, spin_wait_s=0.2), BlockingDirectClient(get_offer)
    try:
        def cpu_of(c, data: bytes) -> float:
            t0 = time.thread_time()
            assert c.step("peer-a", data, 10) == b"erin|" + data
            return time.thread_time() - t0

        cpu_of(client, b"warm"), cpu_of(sleeper, b"warm")
        # a reply 0.1 s away: the spinning caller burns (most of) that on its core, the sleeping one nearly nothing
        spun = client.spin.spun
        assert cpu_of(client, b"sleep:0.1") > 0.03 and client.spin.spun == spun + 1
        assert cpu_of(sleeper, b"sleep:0.1") < 0.02 and sleeper.spin.spun == 0
        # replies slower than the budget: after a few, no more spinning; quick ones again: spinning again
        for _ in range(8):
            client.step("peer-a", b"sleep:0.4", 10)
            if client.spin.typical_s > 0.2:
                break
        spun = client.spin.spun
        assert cpu_of(client, b"sleep:0.1") < 0.02 and client.spin.spun == spun
        for _ in range(20):
            client.step("peer-a", b"quick", 10)
            if client.spin.typical_s <= 0.2:
                break
        spun = client.spin.spun
        client.step("peer-a", b"quick", 10)
        assert client.spin.spun == spun + 1
        # while one thread waits (here for 1 s), another's step is slept through, not spun for
        slow = threading.Thread(target=client.step, args=("peer-a", b"sleep:1", 10))
        slow.start()
        wait_until(lambda: client.spin.spun == spun + 2, 5.0, 0.01, "the slow step spinning")
        time.sleep(0.3)  # its spin budget spent: it sleeps in the kernel, and still counts as waiting
        assert cpu_of(client, b"sleep:0.1") < 0.02 and client.spin.spun == spun + 2
        slow.join(10)
    finally:
        client.close()
        sleeper.close()
        loop.close()


def test_spin_wait_must_not_be_negative():
    with pytest.raises(ValueError, match="spin_wait_ms"):
        ClientConfig(spin_wait_ms=-1)


# ---------------------------------------------------------------------------------------------------
# real processes

PROMPT = torch.tensor([[11, 22, 33, 44, 55]])
GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama6(tmp_path_factory):
    path = save_test_llama(tmp_path_factory.mktemp("direct-e2e"), 6)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def settled(read, counts, target: int, timeout: float = 5.0):
    """`read()`'s values once every count `counts(*values)` has reached `target`, or the last reading after `timeout`.

    A peer counts a step once its own handler returns, and in a pushed chain that is after the client
    already has the tail's reply (the first peer counts when the second's DELIVERED answer arrives), so a
    reading taken the moment `generate` returns may be a step short. Waiting for the count to reach the
    target, never past it, keeps the test exact: the caller still asserts the values it gets."""
    deadline = time.monotonic() + timeout
    while True:
        values = read()
        if all(c >= target for c in counts(*values)) or time.monotonic() > deadline:
            return values
        time.sleep(0.02)


def test_e2e_steps_go_direct_client_to_peer_and_peer_to_peer_with_libp2p_as_fallback(llama6):
    from swarm import AutoDistributedModelForCausalLM
    from tests.processes import SwarmProcesses

    model, local = llama6
    expected = local.generate(PROMPT, **GREEDY)
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        launched = [procs.start_peer(model, dht, blocks, wait=False) for blocks in ("0:3", "3:6")]
        first, second = (SwarmProcesses.wait_ready(p).info["peer_id"] for p in launched)

        def client(**config):
            return AutoDistributedModelForCausalLM.from_pretrained(
                model, initial_peers=[dht], client_config=ClientConfig(step_timeout=10, **config))

        direct, libp2p = client(), client(direct="never")
        try:
            info = lambda peer: direct.swarm_connection.transport.info(peer)  # noqa: E731
            assert info(first)["direct_port"] and info(second)["direct_port"]
            assert torch.equal(direct.generate(PROMPT, **GREEDY), expected)
            # the client's 12 steps reached the first peer directly; it forwarded each directly to the second
            a, b = settled(lambda: (info(first), info(second)),
                           lambda a, b: (a["direct_steps"], a["forwarded"], b["direct_steps"]), 12)
            assert a["direct_steps"] == 12 and a["forwarded"] == 12 and b["direct_steps"] == 12
            assert direct.swarm_connection.transport.direct.steps == 12

            assert torch.equal(libp2p.generate(PROMPT, **GREEDY), expected)
            a2, b2 = settled(lambda: (info(first), info(second)), lambda _, b2: (b2["direct_steps"],), b["direct_steps"] + 12)
            assert a2["direct_steps"] == a["direct_steps"]  # the client used libp2p...
            assert b2["direct_steps"] == b["direct_steps"] + 12  # ...the first peer still forwarded directly
            assert libp2p.swarm_connection.transport.direct.steps == 0

            # garbage on a real peer's direct port: refused, and the peer goes on serving
            with socket.create_connection(("127.0.0.1", a["direct_port"]), timeout=5) as s:
                s.sendall(b"\x00" * 64)
                data = s.recv(4096)
                assert struct.unpack_from("<IBI", data)[1] == REFUSED
            assert torch.equal(direct.generate(PROMPT, **GREEDY), expected)
        finally:
            direct.swarm_connection.close()
            libp2p.swarm_connection.close()

        # a peer that accepts no direct connections: the client and the first peer reach it over libp2p
        procs.procs[-1].stop()
        launched = procs.start_peer(model, dht, "3:6", "--direct", "never", name="3:6 libp2p only")
        only_libp2p = launched.info["peer_id"]
        fresh = client(directory_ttl=0.5)
        try:
            assert torch.equal(fresh.generate(PROMPT, **GREEDY), expected)
            assert fresh.swarm_connection.transport.info(only_libp2p)["direct_port"] is None
            assert fresh.swarm_connection.transport.info(only_libp2p)["direct_steps"] == 0
        finally:
            fresh.swarm_connection.close()


def test_tickets_and_connections_are_bounded():
    async def main():
        server, _ = await start(max_tickets=1, max_connections=2)
        server.issue("a")
        with pytest.raises(RequestRefused, match="too many direct-connection tickets"):
            server.issue("b")
        server._tickets.clear()
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, _ = await asyncio.open_connection("127.0.0.1", server.port)
        kind, _, payload = await read_frame(reader)
        assert kind == REFUSED and b"too many direct connections" in payload
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.1)
        *_, kind, _, _, _ = await hello(server, "a")  # room again
        assert kind == WELCOME
        await server.close()

    run(main())
