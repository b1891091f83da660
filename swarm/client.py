"""The Python client: transformers models whose blocks run on a swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])
    out = model.generate(input_ids, max_new_tokens=20)          # transformers' own generate
    with model.inference_session(max_length=128):               # one KV session across calls
        out = model.generate(input_ids, max_new_tokens=8)
        out = model.generate(out, max_new_tokens=8)             # continues: only new tokens travel

The client joins the DHT as a client-mode node, reads the peers' records, routes through the
cheapest chain of peers covering all blocks, and talks to them over hivemind's libp2p.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from swarm.aio import BackgroundLoop
from swarm.protocol import CollectRequest
from swarm.records import PeerRecord, model_key
from swarm.remote import bind_session
from swarm.router import PeerUnreachable, ReplyLost, RetryPolicy, SwarmRouter
from swarm.routing import Span
from swarm.direct import POLICIES as DIRECT_POLICIES
from swarm.direct import BlockingDirectClient, fetch_offer
from swarm.fast_linear import KERNELS as LINEAR_KERNELS
from swarm.fast_linear import speed_up_linears
from swarm.huge_pages import move_to_huge_pages
from swarm.rpc import EmptyStream, Stubs, call_step
from swarm.splitting import read_config_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Client-side settings. Times in seconds."""

    connect_timeout: float = 20.0  # joining the DHT
    step_timeout: float = 120.0  # one step on one peer (a long prefill on a slow CPU peer can take a while); a pushed step
    # waits this x the hops of its route, and each peer on the way waits this x the hops after it
    close_timeout: float = 5.0  # closing a session
    directory_ttl: float = 5.0  # how long the list of peers read from the DHT is reused
    directory_min_interval: float = 1.0  # after a failure the list is read again, but not more often than this
    directory_grace: float = 15.0  # a peer missing from one DHT read is still routed to for this long
    ban_base_s: float = 5.0  # a peer that failed is avoided this long; each further failure doubles it
    ban_max_s: float = 300.0  # cap of that doubling
    heal_timeout: float = 60.0  # how long a step waits for the swarm to serve missing blocks before failing
    max_history_bytes: int = 1 << 30  # per session, what is kept to replay on a replacement peer (bytes)
    microbatches: int | None = None  # stateless batches cut into this many in-flight parts; None: automatic, 1: off
    wire_dtype: str | None = None  # "bfloat16"/"float16": hidden states travel at this lower precision; None: exact
    push: bool = True  # session steps go to the first peer only, which forwards along the route (one round trip per step)
    tail_delivery: bool = True  # pushed steps: the client collects the last peer's reply from it directly (direct
    # connections to the first and last peer needed), instead of through every peer of the route
    direct: str = "private"  # steps over direct TCP connections (swarm.direct) to peers at loopback/private addresses;
    # "always": to any address (unencrypted!), "never": libp2p only
    share_head: bool = True  # threads' concurrent sessions share one product of the output layer (swarm.shared_head)
    linear_kernel: str = "auto"  # the client's fp32 CPU linear layers (the output layer) over several rows: "auto":
    # oneDNN where measured faster at load (swarm.fast_linear), "torch": torch's own kernel
    huge_pages: bool = True  # the client's CPU weights (embeddings, output layer) copied into one region of transparent
    # huge pages (swarm.huge_pages): the output layer is read whole at every token
    spin_wait_ms: float = 5.0  # a direct step's reply is waited for awake (a busy core) up to this long, while replies
    # come that quickly (swarm.direct.SpinWait); 0: always sleep in the kernel

    def __post_init__(self) -> None:
        if not self.spin_wait_ms >= 0:
            raise ValueError(f"spin_wait_ms must be >= 0, got {self.spin_wait_ms!r}")
        wire_dtype(self.wire_dtype)  # a wrong name fails here, not at the first step
        if self.direct not in DIRECT_POLICIES:
            raise ValueError(f"direct must be one of {', '.join(DIRECT_POLICIES)}, got {self.direct!r}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            ban_base_s=self.ban_base_s, ban_max_s=self.ban_max_s, heal_timeout_s=self.heal_timeout,
            poll_interval_s=self.directory_min_interval, max_history_bytes=self.max_history_bytes,
            hop_timeout_s=self.step_timeout,
        )


WIRE_DTYPES = ("float32", "float16", "bfloat16")


def wire_dtype(name: str | None) -> torch.dtype | None:
    """The dtype hidden states travel in; a clear error for anything but the supported names."""
    if name is None:
        return None
    if name not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)} (or None: the model's own), got {name!r}")
    return getattr(torch, name)


class P2PTransport:
    """`swarm.router.Transport` over hivemind libp2p streams."""

    def __init__(self, p2p, loop: BackgroundLoop, config: ClientConfig):
        self.p2p, self.loop, self.config = p2p, loop, config
        self.stubs = Stubs(p2p)
        # steps go over direct connections from the calling thread itself (no event loop in between)
        self.direct = BlockingDirectClient(self._direct_offer, policy=config.direct, spin_wait_s=config.spin_wait_ms / 1e3)

    def _direct_offer(self, peer_id: str) -> dict | None:
        try:
            stub = self.stubs.get(peer_id)
        except ValueError:
            return None
        timeout = self.direct.connect_timeout_s
        try:
            return self.loop.run(fetch_offer(stub, peer_id, timeout), timeout=timeout + 1.0)
        except TimeoutError:
            return None

    def step(self, peer_id: str, request: bytes, timeout: float | None = None) -> bytes:
        """One step request; `timeout` (a pushed step: the whole chain's) replaces `ClientConfig.step_timeout`."""
        timeout = timeout or self.config.step_timeout
        try:
            reply = self.direct.step(peer_id, request, timeout)
            if reply is not None:
                return reply
            return self.loop.run(call_step(self.stubs.get(peer_id), request), timeout=timeout)
        except TimeoutError as exc:
            raise PeerUnreachable(f"peer {peer_id} did not answer within {timeout:.1f} s") from exc
        except EmptyStream as exc:
            raise ReplyLost(f"peer {peer_id}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - P2P errors of every kind mean the same to the caller
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PeerUnreachable(f"peer {peer_id} failed: {type(exc).__name__}: {exc}") from exc

    def collects(self, first: str, last: str) -> bool:
        """Tail delivery works over direct connections and over libp2p alike."""
        return True

    def push(self, first: str, request: bytes, last: str, collect: CollectRequest, timeout: float):
        """A pushed step to `first`, and the collect of its reply from `last` (tail delivery): over direct connections
        from this thread when both peers have one, else both over libp2p, from the client's event loop."""
        try:
            if self.direct.connection(first) is not None and self.direct.connection(last) is not None:
                pushed = self.direct.push(first, request, last, collect.pack(), timeout)
                if pushed is not None:
                    return pushed
            chain = asyncio.run_coroutine_threadsafe(call_step(self.stubs.get(first), request), self.loop.loop)
            tail = asyncio.run_coroutine_threadsafe(self._collect(last, collect.pack()), self.loop.loop)
        except Exception as exc:  # noqa: BLE001 - a connection that failed under the send: the step did not go
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PeerUnreachable(f"peer {first} or {last} failed: {type(exc).__name__}: {exc}") from exc
        return FuturePushed(chain, tail, time.monotonic() + timeout)

    async def _collect(self, peer_id: str, data: bytes) -> bytes:
        from hivemind.proto import runtime_pb2

        reply = await self.stubs.get(peer_id).rpc_collect(runtime_pb2.ExpertRequest(metadata=data))
        return reply.metadata

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        """Close a session on a peer; `wait=False` (from garbage-collection finalisers) only schedules it."""
        from hivemind.proto import runtime_pb2

        async def call():
            return await asyncio.wait_for(
                self.stubs.get(peer_id).rpc_close(runtime_pb2.ExpertRequest(uid=session_id)), self.config.close_timeout
            )

        if wait:
            self.loop.run(call(), timeout=self.config.close_timeout)
        else:
            self.loop.submit(call())

    def info(self, peer_id: str) -> dict:
        import msgpack
        from hivemind.proto import runtime_pb2

        async def call():
            return await self.stubs.get(peer_id).rpc_info(runtime_pb2.ExpertRequest())

        reply = self.loop.run(call(), timeout=self.config.step_timeout)
        return msgpack.unpackb(reply.metadata, raw=False)


class FuturePushed:
    """`swarm.direct.PushedStep`'s interface over two calls running on the client's event loop (libp2p): the
    first peer's reply (the chain's answer) and the last peer's (the collected tail), whichever first."""

    def __init__(self, chain: concurrent.futures.Future, tail: concurrent.futures.Future, deadline: float):
        self._chain, self._tail, self.deadline = chain, tail, deadline

    def first(self, skip_chain: bytes | None = None) -> tuple[str, bytes]:
        waiting = {self._chain, self._tail}
        while True:
            if self._tail.done():
                return "tail", self._result(self._tail)
            if self._chain.done():
                raw = self._result(self._chain)
                if raw != skip_chain:
                    self._tail.cancel()  # the chain broke: the last peer's reply will not come
                    return "chain", raw
                waiting.discard(self._chain)
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise PeerUnreachable("no reply from the chain or its last peer in time")
            concurrent.futures.wait(waiting, remaining, return_when=concurrent.futures.FIRST_COMPLETED)

    def chain(self) -> bytes:
        concurrent.futures.wait([self._chain], max(self.deadline - time.monotonic(), 0))
        return self._result(self._chain)

    def _result(self, future: concurrent.futures.Future) -> bytes:
        if not future.done():
            future.cancel()
            raise PeerUnreachable("no reply from the chain or its last peer in time")
        try:
            return future.result()
        except BaseException as exc:  # noqa: BLE001 - P2P errors of every kind mean the same to the caller
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PeerUnreachable(f"{type(exc).__name__}: {exc}") from exc


class SwarmConnection:
    """A client's link to the swarm: a client-mode DHT node, the P2P stack and the event loop."""

    def __init__(self, initial_peers: Sequence[str], config: ClientConfig = ClientConfig()):
        from swarm.registry import make_dht

        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs that `swarm dht` printed")
        self.config = config
        try:
            self.dht = make_dht(list(initial_peers), client_mode=True, wait_timeout=config.connect_timeout)
        except Exception as exc:  # noqa: BLE001 - hivemind raises several kinds here; one clear message instead
            raise ConnectionError(
                f"could not join the swarm through {list(initial_peers)}: {exc}. Check that `swarm dht` is running "
                "and that the addresses (including the /p2p/... part) are the ones it printed"
            ) from exc
        self.loop = BackgroundLoop()
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=config.connect_timeout)
        self.transport = P2PTransport(self.p2p, self.loop, config)
        self._closed = False
        atexit.register(self.close)  # a script that never calls close() exits without "Task was destroyed" noise

    def peers(self, key: str) -> dict[str, PeerRecord]:
        from swarm.registry import get_peers

        return get_peers(self.dht, key)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.transport.direct.close()
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            logger.debug("p2p shutdown: %s", exc)
        self.loop.close()
        self.dht.shutdown()


class DHTDirectory:
    """The spans online peers offer for one model, read from the DHT and reused for `ttl` seconds.

    Only the first read blocks the caller. Later reads run in a background thread while callers get
    the last known spans at once: a DHT lookup can take many seconds when a DHT node on the way hangs
    (a frozen peer is one), and the router's waits must stay bounded. Such a lookup can also come back
    without records that exist, so a peer missing from one read is kept for `grace` seconds after it
    was last seen; a record that *is* read (e.g. turned `draining`) always replaces the older one.
    `invalidate()` (the router calls it after a failure) asks for a read as soon as `min_interval`
    seconds have passed since the last one. Thread-safe: concurrent sessions share one directory.
    """

    def __init__(self, connection: SwarmConnection, key: str, ttl: float, min_interval: float = 1.0, grace: float = 15.0):
        self.connection, self.key = connection, key
        self.ttl, self.min_interval, self.grace = ttl, min_interval, grace
        self._records: dict[str, tuple[PeerRecord, float]] = {}  # peer id -> (record, when last read)
        self._spans: list[Span] = []
        self._read_at = float("-inf")  # when the last read started
        self._stale = False
        self._reading = False
        self._lock = threading.Lock()

    def __call__(self) -> list[Span]:
        with self._lock:
            first = self._read_at == float("-inf")
            age = time.monotonic() - self._read_at
            due = age > self.ttl or (self._stale and age >= self.min_interval)
            if not due or self._reading:
                return self._spans
            self._reading, self._stale, self._read_at = True, False, time.monotonic()
        if first:
            self._read()
        else:
            threading.Thread(target=self._read, name="swarm-directory", daemon=True).start()
        return self._spans

    def invalidate(self) -> None:
        self._stale = True

    def _read(self) -> None:
        try:
            found = self.connection.peers(self.key)
        except Exception as exc:  # noqa: BLE001 - keep the last known peers; the next read may succeed
            logger.warning("reading the peers of %s from the DHT failed: %s: %s", self.key, type(exc).__name__, exc)
            found = {}
        now = time.monotonic()
        with self._lock:
            for peer_id, record in found.items():
                self._records[peer_id] = (record, now)
            for peer_id in [p for p, (_, seen) in self._records.items() if now - seen > self.grace]:
                del self._records[peer_id]
            self._spans = spans_from_records(record for record, _ in self._records.values())
            self._reading = False


def spans_from_records(records) -> list[Span]:
    """Routable spans: online peers with a range. Throughput (tokens/s per block) turns into compute time."""
    spans = []
    for r in records:
        if r.state != "online" or r.blocks is None:
            continue
        block_time = 1.0 / r.throughput if r.throughput > 0 else 0.0
        penalty = 0.05 if r.free_cache_tokens == 0 else 0.0
        spans.append(Span(r.peer_id, r.start_block, r.end_block, block_time_s=block_time, penalty_s=penalty))
    return spans


class DistributedModelMixin:
    """Methods every distributed model gets on top of its transformers class."""

    @contextlib.contextmanager
    def inference_session(self, max_length: int | None = None) -> Iterator[object]:
        """Keep one KV-cache session on the peers across several `generate` calls.

        Inside the block, `generate` reuses the session's cache: pass the whole sequence so far
        (e.g. the previous call's output) and only the tokens the peers have not seen are sent.
        The session is closed on the peers when the block ends.
        """
        from transformers import DynamicCache

        capture = self.swarm_capture
        if capture.active_cache is not None:
            raise RuntimeError("an inference session is already open on this model")
        cache = DynamicCache(config=self.config)
        session = bind_session(cache, capture.router, max_length)
        capture.active_cache = cache
        try:
            yield cache
        finally:
            capture.active_cache = None
            if session.opened_on:
                try:
                    capture.router.close_session(session)
                except Exception as exc:  # noqa: BLE001 - the peers' session TTL cleans up anyway
                    logger.debug("could not close session %s: %s", session.session_id, exc)

    def generate(self, *args, **kwargs):
        cache = self.swarm_capture.active_cache
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return super().generate(*args, **kwargs)


def _from_pretrained(
    auto_class,
    model_name_or_path: str | Path,
    initial_peers: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    client_config: ClientConfig = ClientConfig(),
    connection: SwarmConnection | None = None,
):
    from swarm.model import load_client_model
    from swarm.shared_head import SharedHead

    connection = connection or SwarmConnection(initial_peers, client_config)
    key = model_key(str(model_name_or_path), read_config_json(model_name_or_path))

    def make_router(layout, config):
        directory = DHTDirectory(
            connection, key, client_config.directory_ttl, client_config.directory_min_interval, client_config.directory_grace
        )
        return SwarmRouter(layout.num_blocks, directory, connection.transport, policy=client_config.retry_policy(),
                           microbatches=client_config.microbatches, push=client_config.push,
                           tail=client_config.tail_delivery,
                           wire_dtype=wire_dtype(client_config.wire_dtype))

    model = load_client_model(
        model_name_or_path, make_router, auto_class=auto_class, dtype=dtype,
        attn_implementation=attn_implementation, mixin=DistributedModelMixin,
    )
    model.swarm_connection = connection
    model.swarm_model_key = key
    if client_config.huge_pages:
        move_to_huge_pages(model)
    if client_config.linear_kernel == "auto":
        speed_up_linears(model)  # before the shared head takes the output layer's forward
    model.swarm_head = SharedHead.attach(model) if client_config.share_head else None
    return model


class AutoDistributedModelForCausalLM:
    """`AutoModelForCausalLM` whose blocks run on the swarm."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | Path, initial_peers: Sequence[str], **kwargs):
        from transformers import AutoModelForCausalLM

        return _from_pretrained(AutoModelForCausalLM, model_name_or_path, initial_peers, **kwargs)


class AutoDistributedModel:
    """`AutoModel` (encoders, base models) whose blocks run on the swarm."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | Path, initial_peers: Sequence[str], **kwargs):
        from transformers import AutoModel

        return _from_pretrained(AutoModel, model_name_or_path, initial_peers, **kwargs)
