"""The coordinator: watches peer records, publishes a versioned plan, holds a lease in the DHT.

Several may run: one holds the lease and plans; the others wait as standbys and take over when the
lease expires (the holder renews it every period). The coordinator is an optimisation, never a
single point of failure: with none alive, peers run the same planner themselves
(`swarm.assignment`), so the model stays covered.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from hivemind.utils import get_dht_time

from swarm.assignment import make_plan
from swarm.planner import PlannerConfig
from swarm.records import PlanRecord
from swarm.registry import (
    get_peers,
    list_models,
    local_peer_id,
    make_dht,
    publish_plan,
    read_control,
    release_lease,
    renew_lease,
    try_acquire_lease,
)

logger = logging.getLogger(__name__)


@dataclass
class CoordinatorConfig:
    """Everything `swarm run-coordinator` can set. Times in seconds."""

    initial_peers: list[str]
    models: list[str] = field(default_factory=list)  # model keys to plan for; empty: every model in the DHT index
    period_s: float = 5.0  # how often peer records are read and the plan is refreshed
    lease_ttl_s: float = 15.0  # a holder that stops renewing loses the lease after this long
    plan_refresh_s: float = 60.0  # republish an unchanged plan this often, so it never expires
    host: str = "127.0.0.1"
    port: int = 0
    identity_path: str | None = None
    planner: PlannerConfig = field(default_factory=PlannerConfig)


@dataclass
class ModelState:
    leader: bool = False
    epoch: int = 0
    published: dict | None = None  # assignments of the last plan we published
    published_at: float = 0.0


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.dht = None
        self.models: dict[str, ModelState] = {}
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        cfg = self.config
        self.dht = make_dht(cfg.initial_peers, host_maddrs=[f"/ip4/{cfg.host}/tcp/{cfg.port}"],
                            identity_path=cfg.identity_path)
        try:
            self.coordinator_id = local_peer_id(self.dht)
            print(f"swarm coordinator ready {self.coordinator_id}", flush=True)
            while not self._stop.is_set():
                started = time.monotonic()
                keys = cfg.models or sorted(list_models(self.dht))
                for key in keys:
                    try:
                        self.step(key)
                    except Exception:  # noqa: BLE001 - one model's failure must not stop the others
                        logger.exception("planning %s failed", key)
                self._stop.wait(max(0.0, cfg.period_s - (time.monotonic() - started)))
        finally:
            for key, state in self.models.items():
                if state.leader:  # let a standby take over now rather than after the lease expires
                    release_lease(self.dht, key, self.coordinator_id)
            self.dht.shutdown()

    def step(self, key: str) -> str:
        """One round for one model; returns what happened ("standby", "published", "unchanged", ...)."""
        cfg = self.config
        state = self.models.setdefault(key, ModelState())
        holds = (renew_lease if state.leader else try_acquire_lease)(self.dht, key, self.coordinator_id, cfg.lease_ttl_s)
        if not holds:
            if state.leader:
                print(f"swarm coordinator lost the lease of {key}", flush=True)
            state.leader = False
            return "standby"
        if not state.leader:
            control = read_control(self.dht, key)
            state.epoch = max([p.epoch for p in control.plans.values()] + [state.epoch])
            state.leader = True
            print(f"swarm coordinator leads {key} (continuing from epoch {state.epoch})", flush=True)
        records = get_peers(self.dht, key)
        if not records:
            return "no peers"
        num_blocks = max(r.num_blocks for r in records.values())
        plan = make_plan(records.values(), num_blocks, cfg.planner)
        assignments = {pid: tuple(rng) for pid, rng in plan.assignments.items()}
        now = time.monotonic()
        if assignments == state.published and now - state.published_at < cfg.plan_refresh_s:
            return "unchanged"
        if assignments != state.published:
            state.epoch += 1
        record = PlanRecord.build(
            epoch=state.epoch, num_blocks=num_blocks, assignments=assignments, uncovered=list(plan.uncovered),
            note=plan.reason[:512], coordinator_id=self.coordinator_id, created_at=get_dht_time(),
        )
        if publish_plan(self.dht, key, record):
            if assignments != state.published:
                print(f"swarm coordinator published plan {state.epoch} for {key}: " + ", ".join(
                    f"{pid[-6:]}={a}:{b}" for pid, (a, b) in sorted(assignments.items())), flush=True)
            state.published, state.published_at = assignments, now
            return "published"
        return "not stored"


def run_until_signalled(coordinator: Coordinator) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: coordinator.stop())
    coordinator.run()
