"""The RPC surface of a peer on hivemind's libp2p, shared by the peer (servicer) and clients (stub).

Only bytes cross this layer: a step request/response is one `swarm.wire` message. Messages larger
than a libp2p stream frame (~4 MiB) are cut into chunks; the first chunk announces the total size,
which the receiver checks against its limit before reading on. The logic behind each call lives in
a *backend* object the peer supplies, so `swarm` never imports `peer`.

Calls:
- ``rpc_step`` (stream in, stream out): run blocks on one hidden state, in a session or stateless.
- ``rpc_step_unary`` (unary): the same for a step that fits one message each way.
- ``rpc_direct`` (unary): a ticket for a direct TCP connection, which then carries steps (`swarm.direct`).
- ``rpc_close`` (unary): close a session.
- ``rpc_info`` (unary): what the peer serves (msgpack map).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Protocol

import msgpack
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarm.protocol import CollectRequest, ProtocolError, RequestRefused, error_to_wire
from swarm.wire import encode_message

UNARY_MAX_BYTES = 1536 * 1024  # steps up to this size go in one unary message (hivemind caps one at ~2 MiB)
CHUNK_BYTES = 3 * 1024**2  # payload per stream message; libp2p frames are capped at 4 MiB
MAX_MESSAGE_BYTES = 1024**3  # a peer refuses a step larger than this before reading it


class MessageTooLarge(RequestRefused):
    """A stream message over the receiver's limit, or one whose chunks do not add up to its header."""


class EmptyStream(MessageTooLarge):
    """The stream ended before its first message: the other side closed it without sending anything."""


class PeerBusy(RequestRefused):
    """The peer has too many requests (or bytes) in flight; retry later or elsewhere."""


@dataclass(frozen=True)
class RpcLimits:
    """What a peer's RPC surface accepts, before any request reaches the runner. Bytes and seconds."""

    max_message_bytes: int = MAX_MESSAGE_BYTES  # one step request, as announced by its first chunk
    max_inflight_bytes: int = 2 * 1024**3  # requests being received or run, all clients together
    max_inflight_steps: int = 256  # steps being received, queued or run, all clients together
    max_inflight_steps_per_client: int = 64  # the same, per client (a client runs several sessions at once)
    receive_timeout_s: float = 60.0  # a client must send one whole request within this
    send_timeout_s: float = 60.0  # a client must take each reply chunk within this (it may never read)
    linger_s: float = 10.0  # after the reply, wait this long for the client to close the stream (see rpc_step)


class Backend(Protocol):
    async def step(self, data: bytes, owner: str) -> bytes: ...

    async def close_session(self, session_id: str, owner: str) -> bool: ...

    async def info(self) -> dict: ...

    def collect(self, request: CollectRequest, owner: str, reply: Callable[[bytes], None]) -> object | None: ...

    def cancel_collect(self, waiting: object) -> None: ...


_HEADER = struct.Struct(">Q")  # total message size, in front of the first chunk


def split_message(data: bytes, cls=runtime_pb2.ExpertRequest) -> Iterator:
    """The stream messages (`cls` protos) that carry `data`; the first starts with the total size."""
    payload = memoryview(_HEADER.pack(len(data)) + data)
    for offset in range(0, len(payload), CHUNK_BYTES):
        yield cls(metadata=bytes(payload[offset : offset + CHUNK_BYTES]))


async def read_header(stream: AsyncIterator, limit: int = MAX_MESSAGE_BYTES) -> tuple[int, bytes]:
    """The announced total size and the payload of the first chunk, refusing a total over `limit`."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        raise EmptyStream("the stream ended before any message arrived") from None
    if len(first.metadata) < _HEADER.size:
        raise MessageTooLarge(f"first chunk of {len(first.metadata)} bytes has no size header")
    (total,) = _HEADER.unpack_from(first.metadata)
    if total > limit:
        raise MessageTooLarge(f"message of {total} bytes exceeds the limit of {limit} bytes")
    return total, first.metadata[_HEADER.size :]


async def read_body(stream: AsyncIterator, total: int, first: bytes, to_end: bool = True) -> bytes:
    """The rest of a message announced as `total` bytes; with `to_end`, read to the end of the stream.

    Peers read requests to the end: hivemind closes a stream as soon as the handler returns, so a peer
    that stopped reading early could break the client's end-of-stream write. Clients stop at `total`
    and close the stream themselves (see `BlockService.rpc_step`).
    """
    parts, size = [first], len(first)
    if size > total:
        raise MessageTooLarge(f"message announced {total} bytes, more arrived")
    if not to_end and size == total:
        return b"".join(parts)
    async for chunk in stream:
        size += len(chunk.metadata)
        if size > total:
            raise MessageTooLarge(f"message announced {total} bytes, more arrived")
        parts.append(chunk.metadata)
        if not to_end and size == total:
            break
    if size != total:
        raise MessageTooLarge(f"message announced {total} bytes, {size} arrived")
    return b"".join(parts)


async def join_message(stream: AsyncIterator, limit: int = MAX_MESSAGE_BYTES, to_end: bool = True) -> bytes:
    """Reassemble `split_message`'s chunks, refusing a message over `limit` before reading it."""
    total, first = await read_header(stream, limit)
    return await read_body(stream, total, first, to_end)


async def read_reply(stream: AsyncIterator, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """A client's read of a peer's reply: stops at the announced size and closes the stream at once."""
    try:
        return await join_message(stream, limit, to_end=False)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class Stubs:
    """`BlockService` stubs by base58 peer id, kept: building one parses the id (tens of µs), which a decode
    step would otherwise pay per hop. Raises ValueError for a string that is not a peer id."""

    def __init__(self, p2p, max_size: int = 4096):
        self.p2p, self.max_size = p2p, max_size
        self._stubs: dict[str, object] = {}

    def get(self, peer_id: str):
        stub = self._stubs.get(peer_id)
        if stub is None:
            from hivemind.p2p import PeerID

            if len(self._stubs) >= self.max_size:  # peers come and go: forget them all now and then
                self._stubs.clear()
            stub = self._stubs[peer_id] = BlockService.get_stub(self.p2p, PeerID.from_base58(peer_id))
        return stub


async def call_step(stub, request: bytes, direct=None, peer_id: str | None = None) -> bytes:
    """Send one step request to the peer behind `stub` and return its reply (clients, and peers forwarding a
    pushed step). With `direct` (a `swarm.direct.DirectClient`) and a direct path to `peer_id`, it goes
    over that TCP connection. Otherwise over libp2p: a request that fits goes in one unary message; one
    that does not, or whose reply would not (the peer answers empty), goes over a stream: a session step
    is numbered, so the repeat is answered from the reply the peer kept, not run twice."""
    if direct is not None and peer_id is not None:
        reply = await direct.step(stub, peer_id, request)
        if reply is not None:
            return reply

    if len(request) <= UNARY_MAX_BYTES:  # the common decode step: one message each way
        reply = await stub.rpc_step_unary(runtime_pb2.ExpertRequest(metadata=request))
        if reply.metadata:
            return reply.metadata
    from hivemind.utils.asyncio import iter_as_aiter  # only here: the direct path above runs no import statement

    stream = await stub.rpc_step(iter_as_aiter(split_message(request)))
    return await read_reply(stream)


async def _drain(stream: AsyncIterator) -> None:
    """Read and drop the rest of a stream (so the sender's end-of-stream write does not break)."""
    async for _ in stream:
        pass


class _Reservation:
    """Bytes of the in-flight budget held for one request; `release()` (or leaving a `with`) gives them back."""

    def __init__(self, service: "BlockService", total: int):
        self.service, self.total = service, total

    def release(self) -> None:
        self.service._inflight_bytes -= self.total
        self.total = 0

    def __enter__(self) -> "_Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Admission:
    """One request counted in flight (per client and overall) while a `with` holds it.

    A plain context manager: `contextlib.asynccontextmanager` costs an async generator and its turns per
    request, on the path of every step, for bookkeeping that never awaits."""

    __slots__ = ("service", "client")

    def __init__(self, service: "BlockService", client: str):
        limits, mine = service.limits, service._per_client.get(client, 0)
        if service._inflight_steps >= limits.max_inflight_steps:
            raise PeerBusy(f"peer busy: {service._inflight_steps} requests in flight (limit {limits.max_inflight_steps})")
        if mine >= limits.max_inflight_steps_per_client:
            raise PeerBusy(f"this client has {mine} requests in flight here (limit {limits.max_inflight_steps_per_client})")
        service._inflight_steps += 1
        service._per_client[client] = mine + 1
        self.service, self.client = service, client

    def __enter__(self) -> "_Admission":
        return self

    def __exit__(self, *exc) -> None:
        service, client = self.service, self.client
        service._inflight_steps -= 1
        left = service._per_client[client] - 1
        if left:
            service._per_client[client] = left
        else:
            del service._per_client[client]


class BlockService(ServicerBase):
    """Registered by peers (with their backend); clients use `BlockService.get_stub(p2p, peer_id)`.

    Before a request reaches the backend: its announced size is checked and reserved against
    `RpcLimits.max_inflight_bytes` (so memory stays bounded however many clients send at once), the
    number of requests in flight is bounded per client and overall, the whole request must arrive
    within `receive_timeout_s`, and each reply chunk must be taken within `send_timeout_s`. A refusal
    is an error reply (`retry: true`); the peer goes on serving.
    """

    def __init__(self, backend: Backend | None = None, receive_timeout: float | None = None, limits: RpcLimits | None = None):
        self.backend = backend
        limits = limits or RpcLimits()
        if receive_timeout is not None:
            limits = RpcLimits(**{**limits.__dict__, "receive_timeout_s": receive_timeout})
        self.limits = limits
        self.receive_timeout = limits.receive_timeout_s
        self._inflight_bytes = 0
        self._inflight_steps = 0
        self._per_client: dict[str, int] = {}
        self.direct = None  # a swarm.direct.DirectServer when the peer accepts direct connections

    def _admitted(self, client: str) -> _Admission:
        """Count a request in flight (per client and overall), refusing it past the limits."""
        return _Admission(self, client)

    def reserve(self, total: int) -> "_Reservation":
        """Reserve `total` bytes of the in-flight budget for one request; `release()` gives them back."""
        if self._inflight_bytes + total > self.limits.max_inflight_bytes:
            raise PeerBusy(
                f"peer busy: {self._inflight_bytes} bytes of requests in flight, {total} more would exceed "
                f"{self.limits.max_inflight_bytes}"
            )
        self._inflight_bytes += total
        return _Reservation(self, total)

    async def admitted_step(self, data: bytes, client: str) -> bytes:
        """`data` run by the backend for `client` within the in-flight limits, or the error reply that says why not
        (direct connections' steps come here too: `swarm.direct`)."""
        try:
            with self._admitted(client):
                return await self.backend.step(data, client)
        except RequestRefused as exc:
            return encode_message(error_to_wire(exc))

    def collect(self, data: bytes, client: str, reply: Callable[[bytes], None]) -> object | None:
        """Tail delivery: `reply(bytes)` with the reply the backend kept for `client` (`data`: a packed
        `CollectRequest`, a direct connection's COLLECT frame), now or when it arrives, or with the error that says
        why not. Returns what to pass to `backend.cancel_collect` if the caller goes away first, or None."""
        try:
            request = CollectRequest.unpack(data)
        except ProtocolError as exc:
            reply(encode_message(error_to_wire(exc)))
            return None
        return self.backend.collect(request, client, reply)

    async def rpc_collect(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Tail delivery over libp2p: `metadata` is a packed `CollectRequest`, answered as a direct connection's
        COLLECT frame is (the kept reply, or an error map). A caller that gives up takes its wait along."""
        answer = asyncio.get_running_loop().create_future()
        waiting = self.collect(request.metadata, context.remote_id.to_base58(),
                               lambda data: answer.done() or answer.set_result(data))
        try:
            data = await answer
        finally:
            if waiting is not None and not answer.done():
                self.backend.cancel_collect(waiting)
        if len(data) > UNARY_MAX_BYTES:
            why = MessageTooLarge(f"the kept reply ({len(data)} bytes) does not fit one unary message; ask the chain")
            data = encode_message(error_to_wire(why))
        return runtime_pb2.ExpertResponse(metadata=data)

    async def rpc_step_unary(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A small step in one message each way: ~0.8 ms round trip on loopback against ~3 ms for a stream.

        Clients use it for requests up to `UNARY_MAX_BYTES`; a reply that would not fit comes back empty
        and the client repeats the request over `rpc_step` (session steps are numbered, so the peer
        answers the repeat from the reply it kept instead of running the step twice).
        """
        client = context.remote_id.to_base58()
        data = request.metadata
        try:
            if len(data) > UNARY_MAX_BYTES:
                raise MessageTooLarge(f"a unary step carries at most {UNARY_MAX_BYTES} bytes, got {len(data)}")
            with self._admitted(client), self.reserve(len(data)):
                reply = await self.backend.step(data, client)
        except RequestRefused as exc:
            reply = encode_message(error_to_wire(exc))
        if len(reply) > UNARY_MAX_BYTES:
            return runtime_pb2.ExpertResponse()  # empty: "ask again over a stream"
        return runtime_pb2.ExpertResponse(metadata=reply)

    async def rpc_step(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        limits, client = self.limits, context.remote_id.to_base58()
        try:
            with self._admitted(client):
                async with asyncio.timeout(limits.receive_timeout_s):
                    total, first = await read_header(requests, limits.max_message_bytes)
                    with self.reserve(total):
                        data = await read_body(requests, total, first)
                with self.reserve(total):
                    reply = await self.backend.step(data, client)
        except TimeoutError:
            reply = encode_message(error_to_wire(PeerBusy(f"request not received within {limits.receive_timeout_s} s")))
        except RequestRefused as exc:
            reply = encode_message(error_to_wire(exc))
            try:  # let an honest sender finish its write (its reply says why), within the same time bound
                await asyncio.wait_for(_drain(requests), limits.receive_timeout_s)
            except Exception:  # noqa: BLE001 - best effort; the reply goes out regardless
                pass
        # a client that never reads would block this stream forever: cancel it after send_timeout_s
        # (hivemind writes each yielded chunk from the task that iterates this generator)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for chunk in split_message(reply, runtime_pb2.ExpertResponse):
            watchdog = loop.call_later(limits.send_timeout_s, task.cancel)
            try:
                yield chunk
            finally:
                watchdog.cancel()
        # Let the client close the stream: it does as soon as it holds the announced bytes (`read_reply`),
        # and hivemind then cancels this generator. Closing from this side right after the reply can get the
        # stream reset before the client's p2p daemon has passed the reply on (go-yamux drops unread data on
        # a reset): under load, about one reply in a thousand was lost that way.
        await asyncio.sleep(limits.linger_s)

    async def rpc_direct(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Where and how to open a direct TCP connection to this peer (`swarm.direct`); empty if it offers none."""
        if self.direct is None:
            return runtime_pb2.ExpertResponse()
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(self.direct.issue(context.remote_id.to_base58())))

    async def rpc_close(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        closed = await self.backend.close_session(request.uid[:128], context.remote_id.to_base58())
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"closed": bool(closed)}))

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(await self.backend.info()))
