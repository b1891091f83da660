"""A model's health from its peer records: coverage per block and a verdict. A pure function.

- healthy: every block is served by at least two online peers;
- degraded: every block is served, but some by a single peer (one failure away from broken);
- broken: some block is served by no online peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from swarm.records import PeerRecord
from swarm.routing import Span, missing_blocks


@dataclass(frozen=True)
class ModelHealth:
    num_blocks: int
    coverage: list[int]  # online peers serving each block
    missing: list[tuple[int, int]]  # [start, end) ranges no online peer serves
    verdict: str  # "healthy" | "degraded" | "broken"


def model_health(records: Iterable[PeerRecord], num_blocks: int) -> ModelHealth:
    coverage = [0] * num_blocks
    spans = []
    for r in records:
        if r.state != "online" or r.blocks is None:
            continue
        spans.append(Span(r.peer_id, r.start_block, r.end_block))
        for i in range(r.start_block, min(r.end_block, num_blocks)):
            coverage[i] += 1
    missing = missing_blocks(spans, num_blocks)
    if missing:
        verdict = "broken"
    elif min(coverage, default=0) < 2:
        verdict = "degraded"
    else:
        verdict = "healthy"
    return ModelHealth(num_blocks, coverage, missing, verdict)
