"""A peer process: loads its blocks, serves them over hivemind's libp2p, announces itself in the DHT.

Wiring only: the request logic is in `peer.handler` / `peer.runner`, the RPC surface in
`swarm.rpc`, the records in `swarm.records` / `swarm.registry`. Compute runs in one worker
thread (torch parallelises inside each op), off the event loop, so the loop keeps answering
other RPCs and refreshing the announcement while a step runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.capacity import InsufficientMemory, block_footprint, capacity_blocks, shortage_message
from peer.batcher import ComputeQueue
from peer.forward import Forwarder
from peer.handler import StepHandler
from peer.loader import load_blocks
from peer.resources import probe_device
from peer.runner import BlockRunner, RunnerLimits
from peer.tails import Tails
from peer.throughput import cache_key as throughput_cache_key
from peer.throughput import cached_or_measure
from swarm import __version__
from swarm.assignment import make_plan
from swarm.chain import Delivery, Forward, ForwardFailed
from swarm.protocol import DELIVERED, CollectRequest, RequestRefused, error_to_wire
from swarm.records import PeerRecord, model_key
from swarm.registry import announce_peer, get_peers, local_peer_id, make_dht, read_control
from swarm.direct import DirectClient, DirectServer
from swarm.fast_linear import KERNELS as LINEAR_KERNELS
from swarm.fast_linear import speed_up_linears
from swarm.huge_pages import move_to_huge_pages
from swarm.rpc import BlockService
from swarm.splitting import load_config, read_config_json
from swarm.wire import encode_message

logger = logging.getLogger(__name__)


@dataclass
class PeerConfig:
    """Everything `swarm run-peer` can set. Units in the comments."""

    model: str  # local directory or hub id
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of DHT nodes to join
    blocks: tuple[int, int] | None = None  # [start, end) to serve (pinned); None: follow the plan
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # weights' dtype: float32, float16, bfloat16
    max_memory: int | None = None  # bytes this peer may use; None: all free memory
    cache_tokens: int = 8192  # KV-cache budget, tokens (sequences x length) the peer reserves memory for
    activation_reserve: int = 256 * 2**20  # bytes kept free for activations of a step
    host: str = "127.0.0.1"  # interface to listen on ("0.0.0.0": all)
    port: int = 0  # TCP port; 0: any free port
    announce_maddrs: list[str] = field(default_factory=list)  # addresses other machines should dial
    public_name: str = ""  # shown on the dashboard
    identity_path: str | None = None  # libp2p key file, for a stable peer id across restarts
    announce_period_s: float = 30.0  # refresh of the DHT record
    plan_check_s: float = 5.0  # how often a peer that follows the plan looks for a new one
    drain_timeout_s: float = 30.0  # before moving to a new range, wait this long for open sessions to end
    attn_implementation: str | None = None  # transformers attention implementation; None: its default
    num_threads: int | None = None  # torch CPU threads; None: torch's default (all cores)
    use_auto_relay: bool = False  # behind NAT: be reachable through relay nodes
    throughput_cache_dir: str | None = None  # where measured throughput is cached; None: ~/.cache/swarm
    direct: str = "private"  # direct TCP connections (swarm.direct): accept them, and forward over them to peers at
    # loopback/private addresses; "always": to any address (unencrypted), "never": libp2p only, no listener
    direct_port: int = 0  # TCP port of the direct listener (on `host`); 0: any free port
    linear_kernel: str = "auto"  # fp32 CPU linear layers over several rows: "auto": oneDNN where measured faster
    # (swarm.fast_linear), "torch": torch's own kernel
    huge_pages: bool = True  # CPU weights copied into one region of transparent huge pages (swarm.huge_pages)
    batch_wait_ms: float = 50.0  # a step may wait this long (and at most one batch's time) for other active sessions' steps
    inline_max_ms: float = 50.0  # a lone session's step expected to take less runs on the event loop (peer.batcher); 0: never
    limits: RunnerLimits = field(default_factory=RunnerLimits)

    def __post_init__(self) -> None:
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}")


def direct_hosts(maddrs: list[str]) -> list[str]:
    """The IPv4 addresses in `maddrs`, in order, without duplicates; loopback ones only when nothing else is left."""
    hosts = []
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] not in hosts:
            hosts.append(parts[2])
    outside = [h for h in hosts if not h.startswith("127.")]
    return outside or hosts


class NotServing(RequestRefused):
    """The peer has no blocks loaded right now (joining, or moving to a new range)."""


class PeerServer:
    """A peer's whole lifecycle: size itself, join, get a range (pinned, planned, or self-planned), serve, move, leave."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.dtype = getattr(torch, config.dtype)
        self.dht = None
        self.runner: BlockRunner | None = None
        self.handler: StepHandler | None = None
        self.linear_rows: dict[str, int | None] = {}  # by weight shape "out x in": rows from which oneDNN runs it
        self.state = "joining"
        self._compute = ComputeQueue(
            self._run_many, expect=self._active_sessions, max_wait_s=config.batch_wait_ms / 1e3,
            inline_max_s=config.inline_max_ms / 1e3,
        )
        self.forwarder: Forwarder | None = None  # sends pushed steps on to the next peer (set once the P2P is up)
        self.tails = Tails()  # tail delivery: last hops' replies kept for their clients to collect
        self._stopping: asyncio.Event | None = None
        self._service: BlockService | None = None

    # ---- backend for swarm.rpc.BlockService ----------------------------------------------------------

    async def step(self, data: bytes, owner: str) -> bytes:
        if self.handler is None:
            return self._not_serving()
        reply = await self._compute.submit(data, owner)
        if isinstance(reply, Delivery):  # the last hop of a pushed step: its client collects the reply from here
            self.tails.put(reply)
            # the chain's answer is read only if the tail does not come: it leaves a turn of the event loop after the
            # client's reply, which `put` wrote. (This was a 0.5 ms hold; uvloop's timers count whole milliseconds, so
            # it was this turn all along, and a real 1 ms hold measured the same: docs/performance.md.)
            await asyncio.sleep(0)
            return DELIVERED
        if isinstance(reply, Forward):
            # a pushed step goes on to the next peer from here, on the event loop: the compute thread is free meanwhile
            if self.forwarder is None:
                return reply.reply(failure=ForwardFailed("this peer cannot forward steps yet"))
            return await self.forwarder.send(reply)
        return reply

    def collect(self, request: CollectRequest, owner: str, reply) -> object | None:
        return self.tails.collect(request, owner, reply)

    def cancel_collect(self, waiting) -> None:
        self.tails.cancel(waiting)

    def _run_many(self, items: list[tuple[bytes, str]], done=None) -> list:
        """On the compute thread: requests that queued up together (decode steps of sessions may merge)."""
        handler = self.handler
        if handler is None:
            return [self._not_serving()] * len(items)
        return handler.step_many(items, done)

    def _active_sessions(self) -> int:
        runner = self.runner
        return runner.active_sessions() if runner is not None else 0

    def _not_serving(self) -> bytes:
        return encode_message(error_to_wire(NotServing(f"peer is {self.state} and serves no blocks right now")))

    async def close_session(self, session_id: str, owner: str) -> bool:
        runner = self.runner
        if runner is None:
            return False
        try:
            return runner.close_session(session_id, owner)
        except ValueError:
            return False

    async def info(self) -> dict:
        runner = self.runner
        return {
            "model": self.config.model,
            "model_key": self.model_key,
            "state": self.state,
            "start": runner.start if runner else None,
            "end": runner.end if runner else None,
            "num_blocks": self.footprint.num_blocks,
            "dtype": self.config.dtype,
            "device": self.config.device,
            "attn_implementation": runner.attn_implementation if runner else None,
            "sessions": runner.num_sessions if runner else 0,
            "merged_steps": runner.merged_steps if runner else 0,  # forwards that ran several sessions' steps at once
            "merged_rows": runner.merged_rows if runner else 0,
            "merged_max_rows": runner.merged_max_rows if runner else 0,
            "merged_in_place": runner.merged_in_place if runner else 0,  # of those, without copying the caches together
            "inline_steps": self._compute.inline,  # steps run on the event loop, not handed to the compute thread
            # steps decoded by refilling the session's last request (peer.steady), and templates dropped as held
            "steady_steps": self.handler.steady.hits if self.handler else 0,
            "steady_dropped": self.handler.steady.dropped if self.handler else 0,
            "forwarded": self.forwarder.forwarded if self.forwarder else 0,
            "forward_failures": self.forwarder.failed if self.forwarder else 0,
            "tails_delivered": self.tails.delivered,  # last hops' replies kept for their clients (tail delivery)
            "tails_collected": self.tails.collected,
            "direct_port": self._service.direct.port if self._service and self._service.direct else None,
            "direct_steps": self._service.direct.steps if self._service and self._service.direct else 0,
            "linear_kernel_rows": self.linear_rows,
            "version": __version__,
        }

    # ---- sizing ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read the config, size one block on the meta device, measure (or recall) throughput."""
        cfg = self.config
        self.config_json = read_config_json(cfg.model)
        self.model_key = model_key(cfg.model, self.config_json)
        self.footprint = block_footprint(load_config(cfg.model), self.dtype)
        self.memory = probe_device(cfg.device, cfg.max_memory)
        self.capacity = capacity_blocks(self.memory.free_bytes, self.footprint, cfg.cache_tokens, cfg.activation_reserve)
        if self.capacity < 1:
            raise InsufficientMemory(self._shortage(1))
        if cfg.blocks is not None:
            start, end = cfg.blocks
            if end > self.footprint.num_blocks:
                raise ValueError(f"--blocks {start}:{end} is outside the model's {self.footprint.num_blocks} blocks")
            if end - start > self.capacity:
                raise InsufficientMemory(self._shortage(end - start))
        self.throughput = cached_or_measure(
            throughput_cache_key(self.model_key, self.memory.name, cfg.dtype),
            lambda: self._load(0, 1).blocks[0],
            torch.device(cfg.device), self.dtype,
            Path(cfg.throughput_cache_dir) if cfg.throughput_cache_dir else None,
        )

    def _shortage(self, blocks: int) -> str:
        cfg = self.config
        return shortage_message(blocks, self.memory.free_bytes, self.footprint, cfg.cache_tokens, cfg.activation_reserve, cfg.dtype)

    def _load(self, start: int, end: int):
        cfg = self.config
        loaded = load_blocks(cfg.model, start, end, dtype=self.dtype, device=cfg.device, attn_implementation=cfg.attn_implementation)
        if cfg.huge_pages and loaded.device.type == "cpu":
            logger.info("blocks %d:%d: %s", start, end, move_to_huge_pages(loaded.blocks).describe())
        if cfg.linear_kernel == "auto":  # after the move: it times the layers on their final weights
            self.linear_rows = {f"{out}x{in_}": rows for (out, in_), rows in speed_up_linears(loaded.blocks).items()}
        return loaded

    def _serve_range(self, start: int, end: int) -> None:
        limits = dataclasses.replace(self.config.limits, max_cache_tokens=self.config.cache_tokens)
        runner = BlockRunner(self._load(start, end), limits)
        self.runner, self.handler = runner, StepHandler(runner)

    def record(self) -> PeerRecord:
        mem = probe_device(self.config.device, self.config.max_memory)
        runner = self.runner
        blocks = (runner.start, runner.end) if runner is not None and self.state != "joining" else (None, None)
        return PeerRecord.build(
            peer_id=self.peer_id,
            state=self.state,
            start_block=blocks[0],
            end_block=blocks[1],
            num_blocks=self.footprint.num_blocks,
            device_kind=mem.kind,
            device_name=mem.name[:128],
            dtype=self.config.dtype,
            free_memory_bytes=mem.free_bytes,
            total_memory_bytes=mem.total_bytes,
            capacity_blocks=self.capacity,
            throughput=self.throughput.decode,
            prefill_throughput=self.throughput.prefill,
            free_cache_tokens=runner.free_cache_tokens if runner else 0,
            active_sessions=runner.num_sessions if runner else 0,
            software_version=__version__,
            public_name=self.config.public_name[:64],
            addrs=[str(a) for a in self.dht.get_visible_maddrs()][:16],
            pinned=self.config.blocks is not None,
        )

    # ---- lifecycle -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Size, join, serve until SIGTERM/SIGINT, then leave cleanly."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.prepare()
        from swarm.aio import new_event_loop

        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            # as asyncio.run does: cancel what the p2p client left running, or closing prints "Task was destroyed"
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        cfg = self.config
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.dht = make_dht(
            cfg.initial_peers,
            host_maddrs=[f"/ip4/{cfg.host}/tcp/{cfg.port}"],
            announce_maddrs=cfg.announce_maddrs or None,
            identity_path=cfg.identity_path,
            use_auto_relay=cfg.use_auto_relay,
        )
        service = None
        try:
            self.peer_id = local_peer_id(self.dht)
            p2p = await self.dht.replicate_p2p()
            service = self._service = BlockService(backend=self)
            self.forwarder = Forwarder(p2p, DirectClient(policy=cfg.direct) if cfg.direct != "never" else None)
            if cfg.direct != "never":
                service.direct = DirectServer(service, cfg.host, cfg.direct_port, hosts=self._direct_hosts())
                await service.direct.start()
            await service.add_p2p_handlers(p2p)
            if cfg.blocks is not None:
                await asyncio.to_thread(self._serve_range, *cfg.blocks)
                self.state = "online"
            await asyncio.to_thread(self._announce)
            if cfg.blocks is None:
                print(f"swarm peer joining: capacity {self.capacity} blocks, waiting for a range", flush=True)
                while self.runner is None and not self._stopping.is_set():
                    target = await asyncio.to_thread(self._assignment)
                    if target is not None:
                        await self._move(target)
                    else:
                        await self._sleep(min(cfg.plan_check_s, 1.0))
            if self._stopping.is_set():
                return
            print(
                "swarm peer ready " + json.dumps({
                    "peer_id": self.peer_id, "blocks": [self.runner.start, self.runner.end],
                    "model_key": self.model_key, "maddrs": [str(a) for a in self.dht.get_visible_maddrs()],
                }),
                flush=True,
            )
            next_announce = loop.time() + cfg.announce_period_s
            while not self._stopping.is_set():
                await self._sleep(min(cfg.plan_check_s, cfg.announce_period_s))
                if self._stopping.is_set():
                    break
                if cfg.blocks is None:
                    target = await asyncio.to_thread(self._assignment)
                    if target is not None and target != (self.runner.start, self.runner.end):
                        await self._move(target)
                        next_announce = loop.time() + cfg.announce_period_s
                        continue
                if loop.time() >= next_announce:
                    self.runner.expire_sessions()
                    await asyncio.to_thread(self._announce)
                    next_announce = loop.time() + cfg.announce_period_s
            logger.info("leaving: announcing draining")
            self.state = "draining"
            # bounded: on Ctrl-C the terminal signals the whole process group, p2p daemons included,
            # and calls through a dead daemon would hang
            try:
                await asyncio.wait_for(asyncio.to_thread(self._announce), 5)
                await asyncio.wait_for(service.remove_p2p_handlers(p2p), 2)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - leaving anyway
                logger.info("could not announce leaving cleanly: %r", exc)
        finally:
            self._compute.stop()
            if self.forwarder is not None and self.forwarder.direct is not None:
                self.forwarder.direct.close()
            if service is not None and service.direct is not None:
                await service.direct.close()
            self.dht.shutdown()

    def _direct_hosts(self) -> list[str]:
        """Where callers should open direct connections: the listen host, or, listening on every interface,
        the IPv4 addresses libp2p announces, loopback only if there is no other (a caller on another
        machine would reach some other program at its own 127.0.0.1; one on this machine can use the LAN
        address)."""
        if self.config.host not in ("0.0.0.0", "::", ""):
            return [self.config.host]
        return direct_hosts([str(maddr) for maddr in self.dht.get_visible_maddrs()])

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _assignment(self) -> tuple[int, int] | None:
        """The range this peer should serve: the live coordinator's plan, or our own plan when none is alive."""
        control = read_control(self.dht, self.model_key)
        if control.lease is not None:
            if control.plan is not None and self.peer_id in control.plan.assignments:
                return tuple(control.plan.assignments[self.peer_id])
            return None  # a coordinator is alive but has not placed us yet
        records = get_peers(self.dht, self.model_key)
        records[self.peer_id] = self.record()  # our own view of ourselves is the freshest
        return make_plan(records.values(), self.footprint.num_blocks).assignments.get(self.peer_id)

    async def _move(self, target: tuple[int, int]) -> None:
        """Serve `target` instead of the current range: stop taking sessions, let open ones finish, reload.

        While moving, the peer announces itself as `joining` (not `draining`, which means leaving): clients
        open no new sessions on it, and planners still count it, so they do not re-plan around it.
        """
        cfg = self.config
        if self.runner is not None:
            logger.info("moving from %d:%d to %d:%d", self.runner.start, self.runner.end, *target)
            self.state = "joining"
            await asyncio.to_thread(self._announce)
            deadline = asyncio.get_running_loop().time() + cfg.drain_timeout_s
            while self.runner.num_sessions and asyncio.get_running_loop().time() < deadline:
                await self._sleep(0.5)
            self.runner, self.handler = None, None
        await asyncio.to_thread(self._serve_range, *target)
        self.state = "online"
        await asyncio.to_thread(self._announce)
        print(f"swarm peer serving {target[0]}:{target[1]}", flush=True)

    def _announce(self) -> None:
        expiration = max(2 * self.config.announce_period_s, 10.0)
        if not announce_peer(self.dht, self.model_key, self.record(), expiration, model_name=self.config.model):
            logger.warning("no DHT node accepted this peer's record; is --initial-peers right?")
