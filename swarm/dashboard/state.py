"""What the dashboard serves, as pure functions of data already read from the DHT.

`dashboard_state` extends the stable status dict of `swarm.status.collect_status` (the JSON of
`swarm status --json`) with what a dashboard needs on top: per-block throughput, peer counts by
state, and the coordinator (lease holder, plan epoch and age, standbys). Every status field is kept
as is, so a script written against `swarm status --json` reads `/api/state` unchanged.

`render_metrics` turns that state into Prometheus' text exposition format (version 0.0.4).

Nothing here touches the network; `swarm.dashboard.source` does the reading.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

from swarm.records import PEER_STATES
from swarm.registry import ControlState

DASHBOARD_STATE_VERSION = 1  # "dashboard_version" in /api/state; bumped only on incompatible changes
VERDICTS = ("healthy", "degraded", "broken")


def coordinator_entry(control: Optional[ControlState], now: float) -> dict:
    """The coordinator section of one model. `now`: DHT time (seconds)."""
    entry = {
        "present": False,  # a coordinator holds the lease now
        "leader": None,  # peer id of the lease holder
        "lease_acquired_at": None,  # DHT time the holder's tenure began
        "lease_expires_in_s": None,  # seconds until the holder's claim expires unless renewed
        "standbys": [],  # peer ids of other live claims (coordinators waiting to take over)
        "plan_epoch": None,  # epoch of the holder's plan
        "plan_age_s": None,  # seconds since the holder's plan was made
        "plan_assigned_peers": None,  # peers with a range in the plan
        "plan_uncovered": [],  # [start, end) ranges the plan could not cover
        "plan_note": "",  # the planner's remark (why blocks stay uncovered, ...)
        "last_plan_epoch": None,  # highest epoch of any plan still in the DHT (also without a live lease)
    }
    if control is None:
        return entry
    if control.max_epoch >= 0:
        entry["last_plan_epoch"] = control.max_epoch
    lease = control.lease
    if lease is not None:
        entry.update(
            present=True,
            leader=lease.coordinator_id,
            lease_acquired_at=lease.acquired_at,
            lease_expires_in_s=round(max(0.0, lease.expires_at - now), 1),
            standbys=sorted(cid for cid in control.claims if cid != lease.coordinator_id),
        )
    plan = control.plan
    if plan is not None:
        entry.update(
            plan_epoch=plan.epoch,
            plan_age_s=round(max(0.0, now - plan.created_at), 1),
            plan_assigned_peers=len(plan.assignments),
            plan_uncovered=[list(r) for r in plan.uncovered],
            plan_note=plan.note,
        )
    return entry


def block_throughput(model: Mapping) -> list[float]:
    """Summed decode throughput (tokens/s through one block) of the online peers serving each block."""
    totals = [0.0] * model["num_blocks"]
    for peer in model["peers"]:
        if peer["state"] != "online" or not peer["blocks"]:
            continue
        start, end = peer["blocks"]
        for block in range(start, min(end, len(totals))):
            totals[block] += peer["throughput"]
    return [round(t, 3) for t in totals]


def model_entry(model: Mapping, control: Optional[ControlState], now: float) -> dict:
    """One model of `/api/state`: the status model plus dashboard fields."""
    entry = dict(model)
    counts = {state: 0 for state in PEER_STATES}
    for peer in model["peers"]:
        counts[peer["state"]] = counts.get(peer["state"], 0) + 1
    throughput = block_throughput(model)
    coordinator = coordinator_entry(control, now)
    assignments = control.plan.assignments if control is not None and control.plan is not None else {}
    entry["peer_counts"] = counts
    entry["block_throughput"] = throughput
    entry["bottleneck_throughput"] = min(throughput, default=0.0)
    entry["active_sessions"] = sum(p["active_sessions"] for p in model["peers"] if p["state"] == "online")
    entry["free_cache_tokens"] = sum(p["free_cache_tokens"] for p in model["peers"] if p["state"] == "online")
    entry["peers"] = [
        {**peer, "planned_blocks": list(assignments[peer["peer_id"]]) if peer["peer_id"] in assignments else None}
        for peer in model["peers"]
    ]
    entry["coordinator"] = coordinator
    return entry


def dashboard_state(
    status: Mapping,
    controls: Mapping[str, Optional[ControlState]],
    now: float,
    *,
    updated_at: Optional[float],
    refresh_s: float,
    error: Optional[str] = None,
) -> dict:
    """`/api/state`: the status dict (see `swarm.status.collect_status`) extended for the dashboard.

    :param controls: model key -> what `swarm.registry.read_control` returned (None: not read)
    :param now: DHT time of the read
    :param updated_at: wall-clock (Unix) time of the read (None: no read succeeded yet)
    :param refresh_s: how long the dashboard reuses one read
    :param error: why the latest read failed, if it did (the state is then the last good one)
    """
    return {
        **status,
        "dashboard_version": DASHBOARD_STATE_VERSION,
        "updated_at": None if updated_at is None else round(updated_at, 3),
        "refresh_s": refresh_s,
        "error": error,
        "models": [model_entry(m, controls.get(m["model_key"]), now) for m in status["models"]],
    }


# ---------------------------------------------------------------------------------------------------
# Prometheus text format

METRICS = {
    # name: (type, help)
    "swarm_model_info": ("gauge", "A served model (always 1); labels give its name."),
    "swarm_model_blocks": ("gauge", "Blocks in the model."),
    "swarm_model_health": ("gauge", "1 for the model's current health verdict, 0 for the others."),
    "swarm_peers": ("gauge", "Peers with a live record, by state."),
    "swarm_blocks_without_replica": ("gauge", "Blocks served by no online peer (the model is broken if > 0)."),
    "swarm_blocks_single_replica": ("gauge", "Blocks served by exactly one online peer (one failure from broken)."),
    "swarm_block_replicas": ("gauge", "Online peers serving the block."),
    "swarm_block_throughput_tokens_per_second": (
        "gauge", "Summed decode throughput of the online peers serving the block (tokens/s through one block).",
    ),
    "swarm_bottleneck_throughput_tokens_per_second": ("gauge", "The smallest per-block throughput of the model."),
    "swarm_active_sessions": ("gauge", "Inference sessions open on online peers."),
    "swarm_free_cache_tokens": ("gauge", "KV-cache tokens still free on online peers."),
    "swarm_coordinator_up": ("gauge", "1 if a coordinator holds the model's lease, else 0."),
    "swarm_coordinator_standbys": ("gauge", "Live coordinator claims other than the lease holder."),
    "swarm_plan_epoch": ("gauge", "Epoch of the lease holder's plan (absent without a plan)."),
    "swarm_plan_age_seconds": ("gauge", "Seconds since the lease holder's plan was made (absent without a plan)."),
    "swarm_dashboard_state_age_seconds": ("gauge", "Seconds since the dashboard last read the DHT successfully."),
    "swarm_dashboard_dht_read_errors_total": ("counter", "Failed DHT reads since the dashboard started."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_metrics(state: Mapping, *, state_age_s: float, read_errors: int) -> str:
    """`/metrics` for a `dashboard_state` dict. No per-peer series: cardinality stays O(models x blocks)."""
    samples: dict[str, list[str]] = {name: [] for name in METRICS}

    def add(name: str, value: float, **labels: object) -> None:
        text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        samples[name].append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    for m in state["models"]:
        key = m["model_key"]
        add("swarm_model_info", 1, model=key, model_name=m["model_name"] or "")
        add("swarm_model_blocks", m["num_blocks"], model=key)
        for verdict in VERDICTS:
            add("swarm_model_health", int(m["health"] == verdict), model=key, verdict=verdict)
        for peer_state, count in m["peer_counts"].items():
            add("swarm_peers", count, model=key, state=peer_state)
        add("swarm_blocks_without_replica", sum(1 for c in m["coverage"] if c == 0), model=key)
        add("swarm_blocks_single_replica", sum(1 for c in m["coverage"] if c == 1), model=key)
        for block, replicas in enumerate(m["coverage"]):
            add("swarm_block_replicas", replicas, model=key, block=block)
        for block, throughput in enumerate(m["block_throughput"]):
            add("swarm_block_throughput_tokens_per_second", throughput, model=key, block=block)
        add("swarm_bottleneck_throughput_tokens_per_second", m["bottleneck_throughput"], model=key)
        add("swarm_active_sessions", m["active_sessions"], model=key)
        add("swarm_free_cache_tokens", m["free_cache_tokens"], model=key)
        coordinator = m["coordinator"]
        add("swarm_coordinator_up", int(coordinator["present"]), model=key)
        add("swarm_coordinator_standbys", len(coordinator["standbys"]), model=key)
        if coordinator["plan_epoch"] is not None:
            add("swarm_plan_epoch", coordinator["plan_epoch"], model=key)
            add("swarm_plan_age_seconds", coordinator["plan_age_s"], model=key)
    add("swarm_dashboard_state_age_seconds", round(state_age_s, 3))
    add("swarm_dashboard_dht_read_errors_total", read_errors)

    lines = []
    for name, (kind, help_text) in METRICS.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples[name])
    return "\n".join(lines) + "\n"
