"""Direct TCP connections for step requests, next to libp2p, on networks the user trusts (loopback, LAN).

Why: a step over hivemind's libp2p crosses four processes (caller -> its p2p daemon -> the peer's
daemon -> the peer) and costs ~0.8 ms per round trip on an idle loopback, 1-1.5 ms under load;
a plain TCP connection between the two Python processes costs ~0.1 ms (docs/performance.md). A
pushed step makes two crossings per hop, so this is most of a hop's cost.

What stays on libp2p: the DHT, peer identity, `rpc_info`, closing sessions, and every step to a peer
whose direct address is not allowed or not reachable. The direct connection is opened through an
authenticated libp2p call: `rpc_direct` hands the caller a one-time ticket and a secret key, bound to
the caller's libp2p peer id. On the TCP connection the caller sends the ticket and a nonce, and the
peer proves it holds the key by answering HMAC(key, nonce); from then on every step on that
connection runs as that caller's (sessions stay bound to their owner, exactly as over libp2p).

What it does not give: encryption. Hidden states travel in the clear, so callers use direct
connections only to loopback and private addresses by default (`ClientConfig.direct`), and peers
listen on the same interface as their libp2p host (docs/decisions.md).

Frames, both ways: a 9-byte header (payload length u32, kind u8, request id u32, little-endian),
then the payload. Requests on one connection are answered as they finish, matched by id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import contextlib
import functools
import os
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import msgpack

from swarm.aio import within
from swarm.protocol import MAX_COLLECT_BYTES, RequestRefused, error_to_wire
from swarm.wire import encode_message

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<IBI")  # payload length, kind, request id
HELLO, WELCOME, STEP, REPLY, REFUSED, COLLECT = 1, 2, 3, 4, 5, 6
MAX_COLLECTS = 64  # collects waiting at once on one connection
KEEP, DROP, STOP = object(), object(), object()  # what to do with a frame, once its header is read
TICKET_BYTES, NONCE_BYTES, KEY_BYTES = 16, 16, 32
POLICIES = ("private", "always", "never")
# Benchmarks only: every frame is handled this long after it arrived (peers) or was read (clients), to emulate a
# network's one-way latency on loopback where the kernel offers no netem (benchmarks/generate.py --latency-ms).
EMULATED_LATENCY_S = float(os.environ.get("SWARM_DIRECT_LATENCY_MS", "0") or 0) / 1e3


class DirectRefused(ConnectionError):
    """The peer closed the direct connection and said why (a bad ticket, a malformed frame, ...)."""


def welcome_mac(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, b"swarm-direct/1" + nonce, hashlib.sha256).digest()


def allowed(host: str, policy: str) -> bool:
    """May a caller with `policy` send steps in the clear to `host`? "private": loopback and private ranges only."""
    if policy == "never":
        return False
    if policy == "always":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: where it resolves to is not ours to judge
    return address.is_loopback or address.is_private or address.is_link_local


def check_welcome(kind: int, payload: bytes, key: bytes, nonce: bytes) -> None:
    """The caller's check of the peer's answer to its hello: the peer holds the ticket's key, or it refused."""
    if kind != WELCOME or not hmac.compare_digest(payload, welcome_mac(key, nonce)):
        raise DirectRefused(payload.decode(errors="replace")[:300] if kind == REFUSED else "bad welcome")


def frame(kind: int, request_id: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(len(payload), kind, request_id) + payload


# ---- the peer's side ---------------------------------------------------------------------------------


@dataclass
class _Ticket:
    owner: str
    key: bytes
    expires: float


class DirectServer:
    """A peer's TCP listener. `service` is its `swarm.rpc.BlockService`: the same backend and the same
    limits (requests in flight per client and overall, bytes in flight, receive and send timeouts)."""

    def __init__(self, service, host: str, port: int = 0, hosts: list[str] | None = None,
                 ticket_ttl_s: float = 30.0, hello_timeout_s: float = 5.0, max_tickets: int = 4096,
                 max_connections: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.host, self.port = host, port
        self.hosts = hosts or [host]  # where callers should connect (the listen host unless it is 0.0.0.0)
        self.ticket_ttl_s, self.hello_timeout_s, self.max_tickets = ticket_ttl_s, hello_timeout_s, max_tickets
        self.max_connections = max_connections  # open at once, authenticated or not (each holds a socket)
        self.clock = clock
        self.steps = 0  # steps answered over direct connections (rpc_info: "direct_steps")
        self.connections = 0  # connections open now
        self._tickets: dict[bytes, _Ticket] = {}
        self._server: asyncio.AbstractServer | None = None
        self._open: set[_PeerSide] = set()

    async def start(self) -> int:
        self._server = await asyncio.get_running_loop().create_server(lambda: _PeerSide(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop open connections (their callers' requests fail at once, not at a timeout)."""
        for conn in list(self._open):
            conn.transport.close()
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - leaving anyway
                pass

    def issue(self, owner: str) -> dict:
        """`rpc_direct`'s answer to `owner` (its libp2p-authenticated peer id): where to connect, a one-time
        ticket and the key the peer will prove it holds."""
        now = self.clock()
        if len(self._tickets) >= self.max_tickets:
            self._tickets = {t: v for t, v in self._tickets.items() if v.expires > now}
            if len(self._tickets) >= self.max_tickets:
                raise RequestRefused(f"too many direct-connection tickets outstanding ({self.max_tickets})")
        ticket, key = os.urandom(TICKET_BYTES), os.urandom(KEY_BYTES)
        self._tickets[ticket] = _Ticket(owner, key, now + self.ticket_ttl_s)
        return {"hosts": self.hosts, "port": self.port, "ticket": ticket, "key": key}

    def redeem(self, payload: bytes) -> tuple[str, bytes] | None:
        """A hello's payload (ticket, nonce) -> (the ticket's owner, the welcome proving our key), or None."""
        ticket = self._tickets.pop(payload[:TICKET_BYTES], None)  # one use only
        if ticket is None or ticket.expires < self.clock():
            return None
        return ticket.owner, welcome_mac(ticket.key, payload[TICKET_BYTES:])


class _Frames(asyncio.Protocol):
    """Frames cut from a connection's bytes as they arrive, by the event loop's read callback itself.

    Why not asyncio streams: a stream reader wakes a reading task for every frame, one more turn of the
    event loop before the frame is even looked at, and every step pays it on both of its connections
    (docs/performance.md). Here `frame_received` runs inside the read callback.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.header: tuple[int, int, int] | None = None  # the frame whose payload is still arriving
        self.dropping = False  # that payload is dropped as it arrives
        self.closed = False
        self._paused = False
        self._drained: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if EMULATED_LATENCY_S:
            asyncio.get_running_loop().call_later(EMULATED_LATENCY_S, self._arrived, data)
        else:
            self._arrived(data)

    def _arrived(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        try:
            while not self.closed:
                if self.header is None:
                    if len(self.buffer) < FRAME.size:
                        return
                    self.header = FRAME.unpack_from(self.buffer)
                    del self.buffer[: FRAME.size]
                    verdict = self.header_received(*self.header)
                    if verdict is STOP:
                        return
                    self.dropping = verdict is DROP
                length, kind, request_id = self.header
                if self.dropping:  # a refused frame's payload: dropped as it comes, never held whole
                    gone = min(length, len(self.buffer))
                    del self.buffer[:gone]
                    self.header = (length - gone, kind, request_id)
                    if length > gone:
                        return
                    self.header = None
                    self.frame_dropped()
                    continue
                if len(self.buffer) < length:
                    return
                view = memoryview(self.buffer)
                payload = bytes(view[:length])
                view.release()
                del self.buffer[:length]
                self.header = None
                self.frame_received(kind, request_id, payload)
        except Exception:  # noqa: BLE001 - one connection's bug must not reach the loop
            logger.exception("direct connection failed")
            self.transport.abort()

    def header_received(self, length: int, kind: int, request_id: int) -> object:
        """A frame's header, before its payload: KEEP it, DROP its payload, or STOP reading (closing)."""
        return KEEP

    def frame_dropped(self) -> None:
        """The payload of a frame `header_received` dropped has passed."""

    def frame_received(self, kind: int, request_id: int, payload: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionError("direct connection closed"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        """Wait until the other side took what was written (at once, unless the write buffer is full)."""
        if self._paused and not self.closed:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained


class _PeerSide(_Frames):
    """A peer's end of one direct connection: the hello, then steps, each answered as it finishes."""

    def __init__(self, server: DirectServer) -> None:
        super().__init__()
        self.server = server
        self.limits = server.service.limits
        self.owner: str | None = None  # the ticket's owner, once the hello passed
        self.reservation = None  # the in-flight bytes held for the step whose body is arriving
        self.tasks: set[asyncio.Task] = set()
        self.collects: dict[int, object] = {}  # request id -> its waiting collect (tail delivery)
        self.timer: asyncio.TimerHandle | None = None  # the hello, or the body of a step, must arrive by then

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        server = self.server
        server.connections += 1
        server._open.add(self)
        if server.connections > server.max_connections:
            self.refuse(0, f"too many direct connections ({server.max_connections}); use libp2p")
            return
        self.timer = asyncio.get_running_loop().call_later(server.hello_timeout_s, transport.close)

    def refuse(self, request_id: int, why: str) -> None:
        """Say why, then close (after the reason is sent)."""
        self.closed = True
        self.transport.write(frame(REFUSED, request_id, why.encode()))
        self.transport.close()

    def header_received(self, length: int, kind: int, request_id: int) -> object:
        if self.owner is None:
            if kind != HELLO or length != TICKET_BYTES + NONCE_BYTES:
                self.refuse(0, "the first frame must be a hello with a ticket and a nonce")
                return STOP
            return KEEP
        if kind == COLLECT:
            if length > MAX_COLLECT_BYTES:
                self.refuse(request_id, f"a collect request of {length} bytes exceeds {MAX_COLLECT_BYTES}")
                return STOP
            if len(self.buffer) < length:
                self.timer = asyncio.get_running_loop().call_later(self.limits.receive_timeout_s, self.transport.close)
            return KEEP
        if kind != STEP:
            self.refuse(request_id, f"unexpected frame kind {kind}")
            return STOP
        if length > self.limits.max_message_bytes:
            self.refuse(request_id, f"message of {length} bytes exceeds the limit of {self.limits.max_message_bytes} bytes")
            return STOP
        verdict = KEEP
        try:
            self.reservation = self.server.service.reserve(length)
        except RequestRefused as exc:  # answered now; the body is dropped as it comes, the connection stays usable
            self.transport.write(frame(REPLY, request_id, encode_message(error_to_wire(exc))))
            verdict = DROP
        if len(self.buffer) < length:  # the whole body within the receive timeout, or the connection goes
            self.timer = asyncio.get_running_loop().call_later(self.limits.receive_timeout_s, self.transport.close)
        return verdict

    def frame_dropped(self) -> None:
        self._body_arrived()

    def _body_arrived(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def frame_received(self, kind: int, request_id: int, payload: bytes) -> None:
        self._body_arrived()
        if self.owner is None:
            redeemed = self.server.redeem(payload)
            if redeemed is None:
                self.refuse(0, "unknown or expired ticket: ask for one with rpc_direct")
                return
            self.owner, welcome = redeemed
            self.transport.write(frame(WELCOME, 0, welcome))
            return
        if kind == COLLECT:
            self._collect(request_id, payload)
            return
        reservation, self.reservation = self.reservation, None
        task = asyncio.get_running_loop().create_task(self._step(request_id, payload, reservation))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _step(self, request_id: int, data: bytes, reservation) -> None:
        try:
            reply = await self.server.service.admitted_step(data, self.owner)
        finally:
            reservation.release()
        self.server.steps += 1
        await self._reply(request_id, reply)

    def _collect(self, request_id: int, data: bytes) -> None:
        """Answered from the step's own handler when the reply arrives (`peer.tails`): written at once, no task."""
        if len(self.collects) >= MAX_COLLECTS:
            why = RequestRefused(f"{len(self.collects)} collects are waiting on this connection already")
            self.transport.write(frame(REPLY, request_id, encode_message(error_to_wire(why))))
            return

        def reply(data: bytes) -> None:
            self.collects.pop(request_id, None)
            if self.closed:
                return
            self.transport.write(frame(REPLY, request_id, data))
            if self.transport.get_write_buffer_size() > self.limits.max_message_bytes:
                self.transport.close()  # a caller that asks and does not read: drop it

        waiting = self.server.service.collect(data, self.owner, reply)
        if waiting is not None:
            self.collects[request_id] = waiting

    async def _reply(self, request_id: int, reply: bytes) -> None:
        if self.closed:
            return
        self.transport.write(frame(REPLY, request_id, reply))
        try:
            await within(self.drain(), self.limits.send_timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            self.transport.close()  # a caller that does not read: drop it

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.server.connections -= 1
        self.server._open.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.reservation is not None:  # a body that never arrived
            self.reservation.release()
            self.reservation = None
        for task in self.tasks:
            task.cancel()
        for waiting in self.collects.values():
            self.server.service.backend.cancel_collect(waiting)
        self.collects.clear()


# ---- the caller's side ------------------------------------------------------------------------------


class _Connection(_Frames):
    """The caller's end of one direct connection (event-loop callers: peers forwarding pushed steps)."""

    def __init__(self, max_reply_bytes: int):
        super().__init__()
        self.max_reply_bytes = max_reply_bytes
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.welcome: asyncio.Future = asyncio.get_running_loop().create_future()  # the answer to our hello
        self.error: BaseException = ConnectionError("the peer closed the direct connection")

    def header_received(self, length: int, kind: int, request_id: int) -> object:
        if not self.welcome.done() and length > 4096:
            self.close(DirectRefused("bad welcome"))
            return STOP
        if length > self.max_reply_bytes:
            self.close(ConnectionError(f"reply of {length} bytes exceeds the limit of {self.max_reply_bytes}"))
            return STOP
        return KEEP

    def frame_received(self, kind: int, request_id: int, payload: bytes) -> None:
        if not self.welcome.done():
            self.welcome.set_result((kind, payload))
            return
        if kind == REFUSED:
            self.close(DirectRefused(f"the peer refused: {payload.decode(errors='replace')[:300]}"))
            return
        future = self.pending.pop(request_id, None)
        if kind == REPLY and future is not None and not future.done():
            future.set_result(payload)

    def connection_lost(self, exc) -> None:
        if exc is not None and not self.closed:
            self.error = ConnectionError(f"direct connection lost: {type(exc).__name__}: {exc}")
        super().connection_lost(exc)
        self._fail(self.error)

    def close(self, error: BaseException | None = None) -> None:
        self.error = error or ConnectionError("direct connection closed")
        self.closed = True
        self._fail(self.error)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: BaseException) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(error)
            self.welcome.exception()  # retrieved: nobody may be waiting any more
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    async def call(self, data: bytes) -> bytes:
        if self.closed:
            raise self.error
        request_id = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFF) + 1
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            self.transport.write(frame(STEP, request_id, data))
            return await future
        finally:
            self.pending.pop(request_id, None)


async def fetch_offer(stub, peer_id: str, timeout: float) -> dict | None:
    """The peer's answer to `rpc_direct` (hosts, port, ticket, key), or None if it offers no direct path."""
    from hivemind.proto import runtime_pb2

    try:
        answer = await asyncio.wait_for(stub.rpc_direct(runtime_pb2.ExpertRequest()), timeout)
        offer = msgpack.unpackb(answer.metadata, raw=False) if answer.metadata else None
    except Exception as exc:  # noqa: BLE001 - an older peer, or libp2p trouble: the step goes over libp2p
        logger.debug("no direct path to %s: %r", peer_id, exc)
        return None
    return offer if isinstance(offer, dict) else None


def offered_hosts(offer: dict | None, policy: str) -> list[str]:
    """The first 4 addresses of an offer that `policy` allows, in the peer's order."""
    if not offer:
        return []
    return [str(host) for host in offer.get("hosts", [])[:4] if allowed(str(host), policy)]


class DirectClient:
    """Steps to peers over direct connections where allowed and reachable, one connection per peer, opened
    on first use (ticket over libp2p, then TCP). `step` returns None when there is no direct path (the
    peer offers none, the policy forbids its address, or the connection cannot be opened); the caller
    then uses libp2p. A peer without a direct path is asked again after `retry_s`. Used from one event loop."""

    def __init__(self, policy: str = "private", connect_timeout_s: float = 2.0, retry_s: float = 60.0,
                 max_reply_bytes: int = 1024**3):
        if policy not in POLICIES:
            raise ValueError(f"direct policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.connect_timeout_s, self.retry_s = policy, connect_timeout_s, retry_s
        self.max_reply_bytes = max_reply_bytes
        self.steps = 0  # steps that went over a direct connection
        self._conns: dict[str, _Connection] = {}
        self._no_path_until: dict[str, float] = {}  # peer id -> monotonic time
        self._opening: dict[str, asyncio.Lock] = {}

    async def step(self, stub, peer_id: str, request: bytes) -> bytes | None:
        if self.policy == "never":
            return None
        conn = self._conns.get(peer_id)
        if conn is None or conn.closed:
            if self._no_path_until.get(peer_id, 0.0) > time.monotonic():
                return None
            lock = self._opening.setdefault(peer_id, asyncio.Lock())
            async with lock:
                conn = self._conns.get(peer_id)
                if conn is None or conn.closed:
                    conn = await self._open(stub, peer_id)
            if conn is None:
                return None
        reply = await conn.call(request)
        self.steps += 1
        return reply

    async def _open(self, stub, peer_id: str) -> _Connection | None:
        offer = await fetch_offer(stub, peer_id, self.connect_timeout_s)
        conn = None
        for host in offered_hosts(offer, self.policy):
            conn = await self._connect(host, int(offer["port"]), offer["ticket"], offer["key"], peer_id)
            if conn is not None:
                break
        if conn is None:
            self._no_path_until[peer_id] = time.monotonic() + self.retry_s
            return None
        self._conns[peer_id] = conn
        return conn

    async def _connect(self, host: str, port: int, ticket: bytes, key: bytes, peer_id: str) -> _Connection | None:
        nonce = os.urandom(NONCE_BYTES)
        opened: list[_Connection] = []

        async def handshake() -> tuple[int, bytes]:
            _, conn = await asyncio.get_running_loop().create_connection(lambda: _Connection(self.max_reply_bytes), host, port)
            opened.append(conn)
            conn.transport.write(frame(HELLO, 0, ticket + nonce))
            return await conn.welcome

        try:
            kind, payload = await within(handshake(), self.connect_timeout_s)
            check_welcome(kind, payload, key, nonce)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused, or not the peer: use libp2p
            logger.info("direct connection to %s at %s:%s failed (%r); using libp2p", peer_id, host, port, exc)
            for conn in opened:
                conn.close()
            return None
        return opened[0]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


class SpinWait:
    """Waits for a reply awake, for a little while, before sleeping in the kernel.

    Why: a client thread that sleeps while the chain runs (a few milliseconds for a small model on a fast network)
    wakes up cold: its core went idle, possibly to another process or the hypervisor, and the model code it runs
    next (head, sampling, embedding, the next step's request) runs slower for it. Polling the sockets instead keeps
    that code warm: ~4-5% of a small model's token on this 2-core machine, the median of four paired runs in both
    orders (benchmarks/ab.py, docs/performance.md). The price is a busy core while waiting, so it is bounded three ways:
    at most `max_s` per wait; only while replies come that quickly (a moving average of recent waits, measured
    whether or not they were spun for, so a slow route stops spinning and a fast one starts again); and only while
    no other thread of this client is waiting (concurrent sessions spinning would take the cores their peers need,
    and a waiting thread gains nothing from another's spin). `max_s = 0` never spins (`ClientConfig.spin_wait_ms`).
    """

    def __init__(self, max_s: float):
        self.max_s = max_s
        self.typical_s: float | None = None  # moving average of recent waits for a reply
        self.spun = 0  # waits that were spun for (rather than slept through from the start)
        self._waiting = 0  # threads waiting for a reply now
        self._lock = threading.Lock()

    def begin(self, socks: list[socket.socket], remaining: float) -> None:
        """A thread is about to block on `socks`: spin first, if it may, until one has data or the budget is spent.
        Every `begin` needs its `end`."""
        with self._lock:
            self._waiting += 1
            alone = self._waiting == 1
        if not alone or self.max_s <= 0 or (self.typical_s is not None and self.typical_s > self.max_s):
            return
        self.spun += 1
        try:
            if hasattr(select, "poll"):  # select() fails on descriptors past 1024, which a big application may reach
                poller = select.poll()
                for sock in socks:
                    poller.register(sock, select.POLLIN)
                ready = functools.partial(poller.poll, 0)
            else:
                def ready() -> list:
                    return select.select(socks, [], [], 0)[0]
            until = time.perf_counter() + min(self.max_s, remaining)
            while not ready() and time.perf_counter() < until:
                pass
        except (OSError, ValueError):  # a socket closed under us: the blocking read that follows says so
            pass

    def end(self, waited_s: float | None = None) -> None:
        """The blocking read is over; `waited_s`: how long after its request the awaited reply came, if it did."""
        with self._lock:
            self._waiting -= 1
        if waited_s is not None:
            typical = self.typical_s
            self.typical_s = waited_s if typical is None else 0.8 * typical + 0.2 * waited_s


class BlockingDirectClient:
    """Steps over direct connections from the calling thread itself, with blocking sockets: a client thread
    that waits for its step anyway needs no event loop in between. Through the event loop, a round trip
    costs two thread handoffs more (~0.2 ms here against a blocking socket's ~0.1-0.2 ms,
    docs/performance.md). One connection per (thread, peer), opened on first use: the ticket comes over
    libp2p through `get_offer(peer_id)`, then the same handshake as `DirectClient`'s. `step` returns None
    when there is no direct path (the caller then uses libp2p); a peer without one is asked again after
    `retry_s`. A connection that fails under a request is closed and the request fails (ConnectionError,
    or TimeoutError after `timeout`), like a call to an unreachable peer."""

    def __init__(self, get_offer: Callable[[str], dict | None], policy: str = "private",
                 connect_timeout_s: float = 2.0, retry_s: float = 60.0, max_reply_bytes: int = 1024**3,
                 spin_wait_s: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"direct policy must be one of {POLICIES}, got {policy!r}")
        self.get_offer, self.policy = get_offer, policy
        self.connect_timeout_s, self.retry_s, self.max_reply_bytes = connect_timeout_s, retry_s, max_reply_bytes
        self.steps = 0  # steps that went over a direct connection
        self.spin = SpinWait(spin_wait_s)  # replies that come quickly are waited for awake
        self._local = threading.local()  # .conns: peer id -> this thread's connection
        # every thread's, for close(); weak: a thread's connections close when the thread ends
        self._open: weakref.WeakSet[_BlockingConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._no_path_until: dict[str, float] = {}  # peer id -> monotonic time
        self._closed = False

    def step(self, peer_id: str, request: bytes, timeout: float) -> bytes | None:
        conn = self.connection(peer_id)
        if conn is None:
            return None
        reply = conn.call(request, timeout)
        self.steps += 1
        return reply

    def connection(self, peer_id: str) -> "_BlockingConnection | None":
        """This thread's open connection to `peer_id`, opened now if need be; None when there is no direct path."""
        if self.policy == "never" or self._closed:
            return None
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(peer_id)
        if conn is None or conn.closed:
            if self._no_path_until.get(peer_id, 0.0) > time.monotonic():
                return None
            conn = conns[peer_id] = self._connect(peer_id)
            if conn is None:
                del conns[peer_id]
                self._no_path_until[peer_id] = time.monotonic() + self.retry_s
                return None
        return conn

    def push(self, first: str, request: bytes, last: str, collect: bytes, timeout: float) -> "PushedStep | None":
        """Tail delivery: send a pushed step to `first` and, at once, the collect of its reply to `last` (a packed
        `CollectRequest`). None when either has no direct connection (the caller pushes without tail delivery)."""
        if (a := self.connection(first)) is None or (z := self.connection(last)) is None:
            return None
        deadline = time.monotonic() + timeout
        chain_id = a.send(STEP, request, timeout)
        tail_id = z.send(COLLECT, collect, timeout)
        self.steps += 1
        return PushedStep(a, chain_id, z, tail_id, deadline, self.spin)

    def _connect(self, peer_id: str) -> "_BlockingConnection | None":
        offer = self.get_offer(peer_id)
        for host in offered_hosts(offer, self.policy):
            nonce = os.urandom(NONCE_BYTES)
            sock = None
            try:
                sock = socket.create_connection((host, int(offer["port"])), timeout=self.connect_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _BlockingConnection(sock, self.max_reply_bytes, self.spin)
                sock.sendall(frame(HELLO, 0, offer["ticket"] + nonce))
                length, kind, _ = FRAME.unpack(conn.read(FRAME.size))
                payload = conn.read(min(length, 4096))
                check_welcome(kind, bytes(payload), offer["key"], nonce)
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, or not the peer: try the next, then libp2p
                logger.info("direct connection to %s at %s:%s failed (%r); using libp2p", peer_id, host, offer["port"], exc)
                if sock is not None:
                    sock.close()
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return None
                self._open.add(conn)
            return conn
        return None

    def close(self) -> None:
        """Close every thread's connections (safe from any thread; a call in progress fails)."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), weakref.WeakSet()
        for conn in conns:
            conn.close()


class _BlockingConnection:
    """One direct connection, used by one thread at a time: send a step, read its reply."""

    def __init__(self, sock: socket.socket, max_reply_bytes: int, spin: SpinWait):
        self.sock, self.max_reply_bytes, self.spin = sock, max_reply_bytes, spin
        self.closed = False
        self.next_id = 1

    def read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("direct connection closed by the peer")
            got += k
        return buf

    def call(self, data: bytes, timeout: float) -> bytes:
        request_id = self.send(STEP, data, timeout)
        sent = time.perf_counter()
        while True:
            self.spin.begin([self.sock], timeout)
            waited = None
            try:
                reply_id, payload = self.read_reply(timeout)
                if reply_id == request_id:
                    waited = time.perf_counter() - sent
            finally:
                self.spin.end(waited)
            if reply_id == request_id:  # replies to requests whose answer was not waited for are skipped
                if EMULATED_LATENCY_S:
                    time.sleep(EMULATED_LATENCY_S)
                return payload

    def send(self, kind: int, data: bytes, timeout: float) -> int:
        """Send one request frame; its id, to match the reply with."""
        request_id = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFF) + 1
        with self._failing(timeout):
            self.sock.settimeout(timeout)
            self.sock.sendall(frame(kind, request_id, data))
        return request_id

    def read_reply(self, timeout: float) -> tuple[int, bytes]:
        """The next reply frame: (request id, payload)."""
        with self._failing(timeout):
            self.sock.settimeout(timeout)
            while True:
                length, kind, reply_id = FRAME.unpack(self.read(FRAME.size))
                if length > self.max_reply_bytes:
                    raise ConnectionError(f"reply of {length} bytes exceeds the limit of {self.max_reply_bytes}")
                payload = self.read(length)
                if kind == REFUSED:
                    raise DirectRefused(f"the peer refused: {bytes(payload).decode(errors='replace')[:300]}")
                if kind == REPLY:
                    return reply_id, bytes(payload)

    @contextlib.contextmanager
    def _failing(self, timeout: float):
        """A request that fails on the way: this connection cannot be trusted any more (its reply may still come)."""
        try:
            yield
        except BaseException as exc:
            self.close()
            if isinstance(exc, socket.timeout):
                raise TimeoutError(f"no reply within {timeout:.1f} s on the direct connection") from None
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                raise ConnectionError(f"direct connection lost: {type(exc).__name__}: {exc}") from exc
            raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    __del__ = close  # a connection dropped with its thread closes its socket


class PushedStep:
    """A pushed step sent with tail delivery (`BlockingDirectClient.push`): the first peer's reply (the chain's
    answer) and the last peer's (the collected tail) come on two connections, whichever first."""

    def __init__(self, chain: _BlockingConnection, chain_id: int, tail: _BlockingConnection, tail_id: int, deadline: float,
                 spin: SpinWait):
        self._chain, self._tail = (chain, chain_id), (tail, tail_id)  # one connection when the first peer is the last
        self._got: dict[tuple, bytes] = {}
        self.deadline = deadline
        self.spin = spin
        self._sent = time.perf_counter()

    def first(self, skip_chain: bytes | None = None) -> tuple[str, bytes]:
        """("tail", the collected reply) or ("chain", the first peer's reply), whichever comes first; a chain reply
        equal to `skip_chain` (`DELIVERED`: the tail is on its way) is passed over for the tail."""
        while True:
            for kind, key in (("tail", self._tail), ("chain", self._chain)):
                if key in self._got and (kind == "tail" or self._got[key] != skip_chain):
                    if EMULATED_LATENCY_S:
                        time.sleep(EMULATED_LATENCY_S)
                    return kind, self._got[key]
            self._read(self._tail if self._chain in self._got else None)

    def chain(self) -> bytes:
        """The first peer's reply, waited for if need be."""
        while self._chain not in self._got:
            self._read(self._chain)
            if EMULATED_LATENCY_S and self._chain in self._got:
                time.sleep(EMULATED_LATENCY_S)
        return self._got[self._chain]

    def _read(self, only: tuple | None) -> None:
        """Read one reply from whichever connection has one (`only`'s connection, if given)."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from the chain or its last peer in time")
        conns = [only[0]] if only is not None else list(dict.fromkeys((self._chain[0], self._tail[0])))
        conn = conns[0]
        self.spin.begin([c.sock for c in conns], remaining)
        waited = None
        try:
            if len(conns) > 1:
                ready = select.select([c.sock for c in conns], [], [], remaining)[0]
                if not ready:
                    raise TimeoutError("no reply from the chain or its last peer in time")
                conn = next(c for c in conns if c.sock is ready[0])
            reply_id, payload = conn.read_reply(remaining)
            for key in (self._chain, self._tail):
                if key[0] is conn and key[1] == reply_id:
                    if not self._got:  # the step's first reply: what the next steps will likely wait too
                        waited = time.perf_counter() - self._sent
                    self._got[key] = payload
        finally:
            self.spin.end(waited)
