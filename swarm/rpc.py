"""The RPC surface of a peer on hivemind's libp2p, shared by the peer (servicer) and clients (stub).

Only bytes cross this layer: a step request/response is one `swarm.wire` message. Messages larger
than a libp2p stream frame (~4 MiB) are cut into chunks; the first chunk announces the total size,
which the receiver checks against its limit before reading on. The logic behind each call lives in
a *backend* object the peer supplies, so `swarm` never imports `peer`.

Calls:
- ``rpc_step`` (stream in, stream out): run blocks on one hidden state, in a session or stateless.
- ``rpc_close`` (unary): close a session.
- ``rpc_info`` (unary): what the peer serves (msgpack map).
"""

from __future__ import annotations

import asyncio
import struct
from typing import AsyncIterator, Iterator, Protocol

import msgpack
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarm.protocol import error_to_wire
from swarm.wire import encode_message

CHUNK_BYTES = 3 * 1024**2  # payload per stream message; libp2p frames are capped at 4 MiB
MAX_MESSAGE_BYTES = 1024**3  # a peer refuses a step larger than this before reading it


class MessageTooLarge(ValueError):
    pass


class Backend(Protocol):
    async def step(self, data: bytes, owner: str) -> bytes: ...

    async def close_session(self, session_id: str, owner: str) -> bool: ...

    async def info(self) -> dict: ...


_HEADER = struct.Struct(">Q")  # total message size, in front of the first chunk


def split_message(data: bytes, cls=runtime_pb2.ExpertRequest) -> Iterator:
    """The stream messages (`cls` protos) that carry `data`; the first starts with the total size."""
    payload = memoryview(_HEADER.pack(len(data)) + data)
    for offset in range(0, len(payload), CHUNK_BYTES):
        yield cls(metadata=bytes(payload[offset : offset + CHUNK_BYTES]))


async def join_message(stream: AsyncIterator, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """Reassemble `split_message`'s chunks, refusing a message over `limit` before reading it."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        raise MessageTooLarge("the stream ended before any message arrived") from None
    if len(first.metadata) < _HEADER.size:
        raise MessageTooLarge(f"first chunk of {len(first.metadata)} bytes has no size header")
    (total,) = _HEADER.unpack_from(first.metadata)
    if total > limit:
        raise MessageTooLarge(f"message of {total} bytes exceeds the limit of {limit} bytes")
    parts, size = [first.metadata[_HEADER.size :]], len(first.metadata) - _HEADER.size
    # read to the end of the stream, not just to `total`: hivemind closes a stream as soon as the
    # handler returns, so a side that stops reading early can break the other's end-of-stream write
    async for chunk in stream:
        size += len(chunk.metadata)
        if size > total:
            raise MessageTooLarge(f"message announced {total} bytes, more arrived")
        parts.append(chunk.metadata)
    if size != total:
        raise MessageTooLarge(f"message announced {total} bytes, {size} arrived")
    return b"".join(parts)


class BlockService(ServicerBase):
    """Registered by peers (with their backend); clients use `BlockService.get_stub(p2p, peer_id)`."""

    def __init__(self, backend: Backend | None = None, receive_timeout: float = 60.0):
        self.backend = backend
        self.receive_timeout = receive_timeout  # seconds a client may take to send one whole request

    async def rpc_step(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            data = await asyncio.wait_for(join_message(requests), self.receive_timeout)
        except MessageTooLarge as exc:
            reply = encode_message(error_to_wire(exc))
        except asyncio.TimeoutError:
            reply = encode_message(error_to_wire(TimeoutError(f"request not received within {self.receive_timeout} s")))
        else:
            reply = await self.backend.step(data, context.remote_id.to_base58())
        for chunk in split_message(reply, runtime_pb2.ExpertResponse):
            yield chunk

    async def rpc_close(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        closed = await self.backend.close_session(request.uid[:128], context.remote_id.to_base58())
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"closed": bool(closed)}))

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(await self.backend.info()))
