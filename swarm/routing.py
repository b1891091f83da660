"""Route choice: a chain of peers whose block ranges cover blocks ``0..N-1``. A pure function.

The cost of a hop is the peer's round-trip time plus the compute time of the blocks it runs
(from its announced throughput), with a penalty for peers that are loaded or out of cache.
A hop may start in the middle of a peer's range (the peer runs a sub-range), so any chain of
overlapping ranges works. A little random jitter spreads clients over equally good replicas.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class MissingBlocksError(RuntimeError):
    """No (usable) peer serves some blocks. `missing` lists the uncovered ``[start, end)`` intervals."""

    def __init__(self, missing: list[tuple[int, int]], num_blocks: int, detail: str = "", served: bool = False):
        self.missing = missing
        self.num_blocks = num_blocks
        self.detail = detail  # what the client did before giving up, and the last peer failures
        self.served = served  # some peers do serve these blocks, but every one of them failed
        ranges = ", ".join(f"{s}..{e - 1}" if e - s > 1 else f"{s}" for s, e in missing)
        if served:
            message = f"no usable peer for block(s) {ranges} of {num_blocks}: {detail}"
        else:
            message = f"no peer serves block(s) {ranges} of {num_blocks}; start a peer with --blocks for them"
            message += f" ({detail})" if detail else ""
        super().__init__(message)


@dataclass(frozen=True)
class Span:
    """One peer's offer: it serves blocks ``[start, end)``."""

    peer_id: str
    start: int  # first block served (inclusive)
    end: int  # last block served (exclusive)
    rtt_s: float = 0.001  # measured (or assumed) round-trip time to the peer, seconds
    block_time_s: float = 0.0  # seconds per token per block, 1 / announced throughput; 0 if unknown
    penalty_s: float = 0.0  # extra cost for a loaded peer or one without free cache, seconds


@dataclass(frozen=True)
class Hop:
    """Run blocks ``[start, end)`` on one peer."""

    peer_id: str
    start: int
    end: int


def missing_blocks(spans: list[Span], num_blocks: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` intervals no span covers."""
    covered = [False] * num_blocks
    for s in spans:
        for i in range(max(0, s.start), min(num_blocks, s.end)):
            covered[i] = True
    missing, i = [], 0
    while i < num_blocks:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < num_blocks and not covered[j]:
            j += 1
        missing.append((i, j))
        i = j
    return missing


def choose_route(
    spans: list[Span],
    num_blocks: int,
    *,
    start: int = 0,
    end: int | None = None,
    rng: random.Random | None = None,
    jitter: float = 0.05,
    exclude: frozenset[str] = frozenset(),
) -> list[Hop]:
    """The cheapest chain of hops covering blocks ``[start, end)``.

    Dynamic programming over block positions: from every reachable position, a peer whose range
    covers it can take the chain to the end of its range. ``O(num_blocks x spans)``.
    `jitter` (a fraction of each hop's cost, drawn from `rng`) spreads load over equal replicas.
    """
    end = num_blocks if end is None else end
    usable = [s for s in spans if s.peer_id not in exclude and s.start < end and s.end > start]
    rng = rng or random.Random()
    costs = {
        id(s): (s.rtt_s + s.penalty_s + 1e-9) * (1.0 + jitter * rng.random()) for s in usable
    }
    inf = float("inf")
    best = {start: (0.0, None, None)}  # position -> (cost, previous position, span)
    positions = [start]
    by_start = sorted(usable, key=lambda s: (s.start, s.peer_id))
    seen = {start}
    k = 0
    while k < len(positions):
        positions.sort()
        p = positions[k]
        k += 1
        cost_p = best[p][0]
        if p >= end:
            continue
        for s in by_start:
            if s.start > p:
                break
            if s.end <= p:
                continue
            e = min(s.end, end)
            cost = cost_p + costs[id(s)] + (e - p) * s.block_time_s
            if cost < best.get(e, (inf,))[0]:
                best[e] = (cost, p, s)
                if e not in seen:
                    seen.add(e)
                    positions.append(e)
    if end not in best:
        sub = [Span(s.peer_id, s.start, s.end) for s in usable]
        missing = [(max(a, start), min(b, end)) for a, b in missing_blocks(sub, num_blocks) if b > start and a < end]
        if not missing:  # covered, yet unreachable cannot happen with contiguous ranges; be explicit anyway
            missing = [(start, end)]
        raise MissingBlocksError(missing, num_blocks)
    hops: list[Hop] = []
    p = end
    while p != start:
        _, prev, span = best[p]
        hops.append(Hop(span.peer_id, prev, p))
        p = prev
    hops.reverse()
    return hops
