"""From peer records to a plan: shared by the coordinator and by peers that plan for themselves.

Both call the same pure planner on the same records, so a swarm without a live coordinator converges
on the assignment a coordinator would have published.
"""

from __future__ import annotations

from typing import Iterable

from swarm.planner import Plan, PeerSpec, PlannerConfig, plan
from swarm.records import PeerRecord


def planner_inputs(records: Iterable[PeerRecord]) -> list[PeerSpec]:
    """PeerSpecs of the peers that take part in planning: joining and online ones (draining ones are leaving).

    A serving peer whose memory no longer fits its range is passed as joining, so the planner may
    shrink it rather than fail.
    """
    specs = []
    for r in records:
        if r.state not in ("joining", "online"):
            continue
        current = r.blocks if r.state == "online" else None
        if r.pinned:
            if current is not None:
                specs.append(PeerSpec(r.peer_id, max(r.capacity_blocks, current[1] - current[0]), r.throughput,
                                      current=current, pinned=True))
            continue
        if current is not None and current[1] - current[0] > r.capacity_blocks:
            current = None
        specs.append(PeerSpec(r.peer_id, r.capacity_blocks, r.throughput, current=current))
    return specs


def make_plan(records: Iterable[PeerRecord], num_blocks: int, config: PlannerConfig = PlannerConfig()) -> Plan:
    return plan(planner_inputs(records), num_blocks, config)
