"""Tail delivery: the last peer keeps a pushed step's reply and its client collects it over its direct
connection (`peer.tails`, the COLLECT frame of `swarm.direct`, `CollectRequest`).

A real `DirectServer` on 127.0.0.1 with a real `Tails`; the pushed chains themselves are tested in
tests/test_push.py (in-process with faults, and with real peer processes).
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from peer.tails import Tails
from swarm.chain import Delivery
from swarm.direct import COLLECT, FRAME, REFUSED, REPLY, STEP, DirectServer, frame
from swarm.protocol import PROTOCOL_VERSION, CollectRequest, ProtocolError, StepRequest
from swarm.rpc import BlockService
from swarm.wire import decode_message
from tests.test_direct import hello, read_frame, run


class TailBackend:
    """A peer backend with nothing but its kept replies (`peer.server.PeerServer` wires the same `Tails`)."""

    def __init__(self):
        self.tails = Tails(max_waiting=8)

    async def step(self, data: bytes, owner: str) -> bytes:
        return b"step|" + data

    def collect(self, request, owner, reply):
        return self.tails.collect(request, owner, reply)

    def cancel_collect(self, waiting) -> None:
        self.tails.cancel(waiting)


def collect(session: str, step: int, timeout: float = 5.0) -> bytes:
    return CollectRequest(session, step, timeout).pack()


def error_of(payload: bytes) -> str:
    reply = decode_message(payload)
    assert isinstance(reply, dict) and "error" in reply, reply
    return reply["error"]["message"]


def test_a_collect_gets_its_clients_reply_before_or_after_it_arrives_and_nothing_else():
    async def main():
        backend = TailBackend()
        server = DirectServer(BlockService(backend=backend), "127.0.0.1", 0)
        await server.start()
        tails = backend.tails
        reader, writer, *_ = await hello(server, "alice")
        # asked first: answered when the step's reply is kept, by that call itself
        writer.write(frame(COLLECT, 1, collect("s1", 0)))
        await asyncio.sleep(0.05)
        assert tails._num_waiting == 1
        tails.put(Delivery("s1", 0, "alice", b"reply of step 0"))
        assert await read_frame(reader) == (REPLY, 1, b"reply of step 0")
        # asked after: answered at once; a step request on the same connection still works
        writer.write(frame(COLLECT, 2, collect("s1", 0)))
        assert await read_frame(reader) == (REPLY, 2, b"reply of step 0")
        writer.write(frame(STEP, 3, b"x"))
        assert await read_frame(reader) == (REPLY, 3, b"step|x")
        # another caller never gets it
        other_reader, other_writer, *_ = await hello(server, "mallory")
        other_writer.write(frame(COLLECT, 1, collect("s1", 0)))
        kind, _, payload = await read_frame(other_reader)
        assert kind == REPLY and "does not belong to this caller" in error_of(payload)
        # a step that was followed by the next one is gone; one that never comes times out
        tails.put(Delivery("s1", 1, "alice", b"reply of step 1"))
        writer.write(frame(COLLECT, 4, collect("s1", 0)))
        assert "was followed by step 1" in error_of((await read_frame(reader))[2])
        writer.write(frame(COLLECT, 5, collect("s2", 0, timeout=0.2)))
        assert "did not arrive within 0.2 s" in error_of((await read_frame(reader))[2])
        assert tails._num_waiting == 0 and tails.collected == 2 and tails.delivered == 2
        # malformed: a clear error, the connection goes on
        for rid, payload in ((6, b"\xc1garbage"), (7, msgpack.packb([PROTOCOL_VERSION, "s1", -1, 5.0])),
                             (8, msgpack.packb([PROTOCOL_VERSION, "s1", 0, 1e9])), (9, msgpack.packb([1, "s1", 0, 5.0]))):
            writer.write(frame(COLLECT, rid, payload))
            kind, got, reply = await read_frame(reader)
            assert (kind, got) == (REPLY, rid) and decode_message(reply)["error"]["retry"] is False
        writer.write(frame(COLLECT, 10, collect("s1", 1)))
        assert await read_frame(reader) == (REPLY, 10, b"reply of step 1")
        # an oversized collect frame: refused, that connection closed
        writer.write(FRAME.pack(100_000, COLLECT, 11))
        kind, rid, _ = await read_frame(reader)
        assert (kind, rid) == (REFUSED, 11) and await reader.read() == b""
        # a connection that closes with collects waiting takes them along
        reader, writer, *_ = await hello(server, "alice")
        for rid in range(3):
            writer.write(frame(COLLECT, rid, collect(f"later{rid}", 0)))
        await asyncio.sleep(0.05)
        assert tails._num_waiting == 3
        writer.close()
        await asyncio.sleep(0.1)
        assert tails._num_waiting == 0 and not tails._waiting
        # bounded: past max_waiting, a collect is refused at once
        reader, writer, *_ = await hello(server, "alice")
        for rid in range(9):
            writer.write(frame(COLLECT, rid, collect("never", rid)))
        kind, rid, payload = await read_frame(reader)
        assert rid == 8 and "collects are waiting already" in error_of(payload)
        writer.close()
        await server.close()

    run(main())


def test_kept_replies_are_bounded_in_number_bytes_and_time():
    tails = Tails(ttl_s=60.0, max_entries=3, max_bytes=25)
    for k in range(5):
        tails.put(Delivery(f"s{k}", 0, "alice", b"x"))
    assert list(tails._kept) == ["s2", "s3", "s4"]
    tails.put(Delivery("s3", 1, "alice", b"y" * 20))  # replaces s3's older reply; 22 bytes kept in all
    assert list(tails._kept) == ["s2", "s4", "s3"] and tails._kept_bytes == 22
    tails.put(Delivery("s6", 0, "alice", b"z" * 10))  # over 25 bytes: the oldest go first
    assert list(tails._kept) == ["s6"] and tails._kept_bytes == 10
    tails.put(Delivery("s7", 0, "alice", b"w" * 100))  # the newest stays, whatever its size
    assert list(tails._kept) == ["s7"]
    tails.ttl_s = 0.0  # every older one expired by the next put
    tails.put(Delivery("s8", 0, "alice", b"x"))
    assert list(tails._kept) == ["s8"] and tails._kept_bytes == 1


def test_tail_and_trail_fields_are_validated():
    base = StepRequest(0, 1, torch.zeros(1, 1, 4), [((), {})], [0], session_id="s", step=0).to_wire()
    assert StepRequest.from_wire({**base, "tail": True, "trail": [torch.zeros(1)]}).tail
    with pytest.raises(ProtocolError, match="'tail' marks the last hop"):
        StepRequest.from_wire({**base, "tail": True, "step": None})
    with pytest.raises(ProtocolError, match="'tail' must be a boolean"):
        StepRequest.from_wire({**base, "tail": 1})
    with pytest.raises(ProtocolError, match="'trail' must list"):
        StepRequest.from_wire({**base, "trail": [1, 2]})
    with pytest.raises(ProtocolError, match="'trail' must list"):
        StepRequest.from_wire({**base, "trail": [torch.zeros(1)] * 65})
    for bad in (b"", msgpack.packb({"a": 1}), msgpack.packb([PROTOCOL_VERSION, "", 0, 1.0]),
                msgpack.packb([PROTOCOL_VERSION, "s", 0, float("nan")]), msgpack.packb([PROTOCOL_VERSION, "s", True, 1.0])):
        with pytest.raises(ProtocolError):
            CollectRequest.unpack(bad)
