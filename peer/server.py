"""A peer process: loads its blocks, serves them over hivemind's libp2p, announces itself in the DHT.

Wiring only: the request logic is in `peer.handler` / `peer.runner`, the RPC surface in
`swarm.rpc`, the records in `swarm.records` / `swarm.registry`. Compute runs in one worker
thread (torch parallelises inside each op), off the event loop, so the loop keeps answering
other RPCs and refreshing the announcement while a step runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.handler import StepHandler
from peer.loader import load_blocks
from peer.resources import probe_device
from peer.runner import BlockRunner, RunnerLimits
from swarm import __version__
from swarm.records import PeerRecord, model_key
from swarm.registry import announce_peer, local_peer_id, make_dht, withdraw_peer
from swarm.rpc import BlockService
from swarm.splitting import read_config_json

logger = logging.getLogger(__name__)


@dataclass
class PeerConfig:
    """Everything `swarm run-peer` can set. Units in the comments."""

    model: str  # local directory or hub id
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of DHT nodes to join
    blocks: tuple[int, int] | None = None  # [start, end) to serve; None: follow the coordinator's plan
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # weights' dtype: float32, float16, bfloat16
    max_memory: int | None = None  # bytes this peer may use; None: all free memory
    host: str = "127.0.0.1"  # interface to listen on ("0.0.0.0": all)
    port: int = 0  # TCP port; 0: any free port
    announce_maddrs: list[str] = field(default_factory=list)  # addresses other machines should dial
    public_name: str = ""  # shown on the dashboard
    identity_path: str | None = None  # libp2p key file, for a stable peer id across restarts
    announce_period_s: float = 30.0  # refresh of the DHT record
    attn_implementation: str | None = None  # transformers attention implementation; None: its default
    num_threads: int | None = None  # torch CPU threads; None: torch's default (all cores)
    use_auto_relay: bool = False  # behind NAT: be reachable through relay nodes
    limits: RunnerLimits = field(default_factory=RunnerLimits)


class PeerServer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.dht = None
        self.runner: BlockRunner | None = None
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-compute")
        self._stopping: asyncio.Event | None = None

    # ---- backend for swarm.rpc.BlockService ----------------------------------------------------------

    async def step(self, data: bytes, owner: str) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self._compute, self.handler.step, data, owner)

    async def close_session(self, session_id: str, owner: str) -> bool:
        try:
            return self.runner.close_session(session_id, owner)
        except ValueError:
            return False

    async def info(self) -> dict:
        return {
            "model": self.config.model,
            "model_key": self.model_key,
            "start": self.runner.start,
            "end": self.runner.end,
            "num_blocks": self.num_blocks,
            "dtype": self.config.dtype,
            "device": self.config.device,
            "attn_implementation": self.runner.attn_implementation,
            "sessions": self.runner.num_sessions,
            "version": __version__,
        }

    # ---- lifecycle -------------------------------------------------------------------------------------

    def load(self) -> None:
        cfg = self.config
        if cfg.blocks is None:
            raise ValueError("--blocks A:B is required until the coordinator assigns ranges")
        self.config_json = read_config_json(cfg.model)
        self.model_key = model_key(cfg.model, self.config_json)
        start, end = cfg.blocks
        loaded = load_blocks(
            cfg.model, start, end, dtype=getattr(torch, cfg.dtype), device=cfg.device,
            attn_implementation=cfg.attn_implementation,
        )
        self.num_blocks = loaded.layout.num_blocks
        self.runner = BlockRunner(loaded, cfg.limits)
        self.handler = StepHandler(self.runner)

    def record(self, state: str = "online") -> PeerRecord:
        mem = probe_device(self.config.device, self.config.max_memory)
        return PeerRecord.build(
            peer_id=self.peer_id,
            state=state,
            start_block=self.runner.start,
            end_block=self.runner.end,
            num_blocks=self.num_blocks,
            device_kind=mem.kind,
            device_name=mem.name[:128],
            dtype=self.config.dtype,
            free_memory_bytes=mem.free_bytes,
            total_memory_bytes=mem.total_bytes,
            free_cache_tokens=self.runner.free_cache_tokens,
            active_sessions=self.runner.num_sessions,
            software_version=__version__,
            public_name=self.config.public_name[:64],
            addrs=[str(a) for a in self.dht.get_visible_maddrs()][:16],
        )

    def run(self) -> None:
        """Load, serve until SIGTERM/SIGINT, then leave cleanly."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.load()
        from swarm.aio import new_event_loop

        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
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
        try:
            self.peer_id = local_peer_id(self.dht)
            p2p = await self.dht.replicate_p2p()
            service = BlockService(backend=self)
            await service.add_p2p_handlers(p2p)
            await asyncio.to_thread(self._announce, "online")
            print(
                "swarm peer ready " + json.dumps({
                    "peer_id": self.peer_id, "blocks": [self.runner.start, self.runner.end],
                    "model_key": self.model_key, "maddrs": [str(a) for a in self.dht.get_visible_maddrs()],
                }),
                flush=True,
            )
            while not self._stopping.is_set():
                try:
                    await asyncio.wait_for(self._stopping.wait(), cfg.announce_period_s)
                except asyncio.TimeoutError:
                    self.runner.expire_sessions()
                    await asyncio.to_thread(self._announce, "online")
            logger.info("leaving: announcing draining")
            await asyncio.to_thread(self._withdraw)
            await service.remove_p2p_handlers(p2p)
        finally:
            self._compute.shutdown(wait=False, cancel_futures=True)
            self.dht.shutdown()

    def _announce(self, state: str) -> None:
        expiration = max(2 * self.config.announce_period_s, 10.0)
        if not announce_peer(self.dht, self.model_key, self.record(state), expiration, model_name=self.config.model):
            logger.warning("no DHT node accepted this peer's record; is --initial-peers right?")

    def _withdraw(self) -> None:
        expiration = max(2 * self.config.announce_period_s, 10.0)
        withdraw_peer(self.dht, self.model_key, self.record("draining"), expiration)
