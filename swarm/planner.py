"""The block planner: which peer serves which contiguous range of the model's blocks.

A pure, deterministic function (DESIGN.md §4): plain records in, a :class:`Plan` out. No I/O, no clock,
no randomness, no torch. The coordinator calls it on the peer records it reads from the DHT; with no live
coordinator, every peer calls it on the same records and gets the same answer. That is why it lives in
``swarm/``: ``peer`` and ``coordinator`` both depend on ``swarm`` and never on each other.

Throughput model
----------------
``PeerSpec.throughput`` is the tokens/s a peer achieves through **one** block, and a peer contributes that
full amount to **every** block of its range (the model Petals uses: a peer's blocks run one after another
for a token, and a block's serving capacity is what its replicas together can push through it). So the
throughput of block ``b`` is the sum of ``throughput`` over the peers whose range contains ``b``, and the
swarm's *bottleneck* is the minimum of that over all blocks. Under this model a longer range never costs
throughput, so every peer gets a range as long as its capacity allows (capped at the number of blocks), and
the bottleneck can never exceed ``sum(throughput_i * min(capacity_i, num_blocks)) / num_blocks``
(:func:`throughput_upper_bound`).

Pinned peers
------------
A peer with ``pinned=True`` serves the range its operator fixed (``--blocks``). It keeps ``current`` in
every candidate plan, whatever its ``capacity_blocks`` says, counts its throughput on those blocks, and never
appears in ``Plan.moved``. The other peers are planned around it.

Algorithm
---------
1. *Sticky plan.* Serving (and pinned) peers keep their current ranges. Joining peers are placed one at a
   time (longest first, then fastest, then by peer id) on the window of their length that covers the most
   uncovered blocks, then contains the weakest block, then has the smallest summed throughput, then starts
   first.
   If blocks are still uncovered, *repair moves* relocate peers whose every block is also held by another
   peer onto the first uncovered block.
2. *Improved plan.* From the sticky plan, bounded local search: take the weakest block ``b``; among the
   peers not covering ``b`` whose removal keeps every block of their range above the current minimum,
   move the one with the best ``min(range minimum after removal, minimum + throughput)`` onto the weakest
   window containing ``b``. Each move strictly raises the lexicographic pair (minimum, -blocks at the
   minimum), so the search terminates; ``PlannerConfig.improvement_budget`` bounds it further.
3. *Fresh plan.* Pinned peers on their ranges, then step 1 and step 2 with every other peer treated as
   joining, for up to three placement orders (longest first; fastest first; most throughput x blocks first),
   keeping the best. While blocks are uncovered, a peer goes on the best window containing the *first*
   uncovered block (a left-to-right sweep). With no pinned peers each placement extends the covered prefix,
   so the fresh plan covers every block whenever total capacity allows. With pinned peers leaving ``G``
   blocks in ``k`` gaps, a placement covering a block already served ends the gap the sweep is in, so at
   most ``k - 1`` placements waste blocks before everything is covered, each fewer than its length: every
   block is covered whenever ``sum(L) - sum(L_j - 1 for the k - 1 longest L_j) >= G`` (``L``: the other
   peers' range lengths), which for ``k = 1`` is exactly "capacity allows". For ``k >= 2``, whether ranges
   of given lengths can fill the gaps at all is bin covering (NP-hard), so no fast planner promises more;
   when the sweep falls short, the same order is also placed on the most uncovered blocks anywhere, and the
   pass covering more is kept (it fits a long range into a long gap that the sweep spent on a short one).
4. *Hysteresis.* With no unpinned serving peers the result is the fresh plan. Otherwise the sticky plan stays unless
   (a) a candidate (improved or fresh) covers more blocks: the cheapest such plan is taken; or (b) some
   candidate raises the bottleneck by more than ``hysteresis_margin``: then, among the candidates reaching
   ``near_best_fraction`` of the best gain, the one reloading the fewest blocks is taken, if it beats the
   margin itself; if it does not, nothing moves yet (a replan that moves most of the swarm is not worth a
   few per cent over a plan that moves one peer). So a serving peer never moves for less than the margin.

Cost: one placement is O(num_blocks * range length) vectorised; one local-search move is O(peers) vectorised
(a sparse table answers range minima). See docs/planner.md for measured figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PeerSpec", "PlannerConfig", "Plan", "plan", "throughput_upper_bound"]


@dataclass(frozen=True)
class PeerSpec:
    """One peer as the planner sees it (built by the coordinator from the peer's DHT record)."""

    peer_id: str  # unique id of the peer (its DHT peer id); ties between equal peers are broken by it
    capacity_blocks: int  # blocks; how many blocks fit in the peer's memory (0: it can serve none)
    throughput: float  # tokens/s through ONE block; the peer adds this to every block of its range
    current: tuple[int, int] | None = None  # blocks, half-open [start, end) served now; None while joining
    # the operator fixed this peer's range with --blocks: it serves `current` (required) in every plan and is
    # never moved; any range inside the model is allowed and capacity_blocks is not checked against it
    pinned: bool = False


@dataclass(frozen=True)
class PlannerConfig:
    """Knobs of :func:`plan`. The defaults suit swarms from 2 to 10,000+ peers."""

    # fraction; a serving peer is moved for balance only if the bottleneck rises by more than this
    # (0.15: new bottleneck > 1.15 x the bottleneck of keeping everyone in place). Coverage repairs ignore it.
    hysteresis_margin: float = 0.15
    # peer-evaluations; bounds the local search at about budget / peers moves per search (a count, not a
    # clock, so the result stays deterministic). 2,000,000 ~ 0.1 s of search at 10,000 peers.
    improvement_budget: int = 2_000_000
    # fraction; once some plan beats the margin, the planner looks at the plans reaching at least this
    # fraction of the best plan's gain and takes the one reloading the fewest blocks, if it beats the margin
    # too; otherwise nothing moves yet (a costly replan is not worth a few % over a cheap one)
    near_best_fraction: float = 0.8
    # peers; with at most this many peers (capacity >= 1) a fresh plan tries three placement orders
    # (longest range first, fastest first, most throughput x blocks first) and keeps the best; above it,
    # only the first (each order costs one greedy pass, ~20 ms per 1,000 peers on an 80-block model)
    multi_order_max_peers: int = 2_000


@dataclass(frozen=True)
class Plan:
    """The planner's answer. Every pinned peer and every peer with capacity >= 1 gets a range; others are listed
    in `unassigned`."""

    num_blocks: int  # blocks; the model's block count the plan was made for
    assignments: dict[str, tuple[int, int]]  # peer_id -> blocks [start, end); sorted by peer_id
    uncovered: tuple[tuple[int, int], ...]  # blocks; maximal [start, end) intervals no peer serves
    bottleneck: float  # tokens/s; min over blocks of the summed throughput of their peers (0 if uncovered)
    total_capacity: int  # blocks; sum over peers of min(capacity, num_blocks) (pinned: their range length)
    block_throughput: tuple[float, ...]  # tokens/s per block; summed throughput of the peers serving it
    moved: tuple[str, ...]  # ids of serving peers whose range changed (each costs a reload); sorted; never pinned
    unassigned: tuple[str, ...]  # peer ids given no range (capacity 0, not pinned); sorted
    reason: str  # why the plan looks as it does: which candidate won, and why blocks are uncovered

    def explain(self) -> str:
        """A short human-readable summary (a few lines, whatever the swarm size)."""
        covered = self.num_blocks - sum(e - s for s, e in self.uncovered)
        lines = [
            f"{len(self.assignments)} peers serve {covered}/{self.num_blocks} blocks "
            f"(total capacity {self.total_capacity} blocks); bottleneck {self.bottleneck:.6g} tokens/s",
            self.reason,
        ]
        if self.moved:
            shown = ", ".join(self.moved[:10]) + (f" and {len(self.moved) - 10} more" if len(self.moved) > 10 else "")
            lines.append(f"moved {len(self.moved)} serving peer(s): {shown}")
        if self.unassigned:
            names = ", ".join(self.unassigned[:10])
            lines.append(f"{len(self.unassigned)} peer(s) with capacity 0 serve nothing: {names}")
        return "\n".join(lines)


def throughput_upper_bound(peers: Sequence[PeerSpec], num_blocks: int) -> float:
    """tokens/s; no plan's bottleneck can exceed sum(throughput * blocks) / num_blocks, where blocks is
    min(capacity, num_blocks), or the range length of a pinned peer."""
    _validate(peers, num_blocks, PlannerConfig())
    return sum(p.throughput * _length(p, num_blocks) for p in peers) / num_blocks


def _length(p: PeerSpec, num_blocks: int) -> int:
    """blocks; the length of the range the peer gets in any plan."""
    if p.pinned:
        return p.current[1] - p.current[0]  # type: ignore[index]
    return min(p.capacity_blocks, num_blocks)


# --------------------------------------------------------------------------------------------------------
# validation


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate(peers: Sequence[PeerSpec], num_blocks: int, config: PlannerConfig) -> None:
    if not _is_int(num_blocks) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    if not isinstance(config, PlannerConfig):
        raise ValueError(f"config must be a PlannerConfig, got {type(config).__name__}")
    margin = config.hysteresis_margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"hysteresis_margin must be a finite number >= 0 (0.15 = 15%), got {margin!r}")
    if not _is_int(config.improvement_budget) or config.improvement_budget < 0:
        raise ValueError(f"improvement_budget must be an integer >= 0, got {config.improvement_budget!r}")
    frac = config.near_best_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise ValueError(f"near_best_fraction must be a number in [0, 1], got {frac!r}")
    if not _is_int(config.multi_order_max_peers) or config.multi_order_max_peers < 0:
        raise ValueError(f"multi_order_max_peers must be an integer >= 0, got {config.multi_order_max_peers!r}")
    seen: set[str] = set()
    for p in peers:
        if not isinstance(p, PeerSpec):
            raise ValueError(f"peers must be PeerSpec records, got {type(p).__name__}")
        if not isinstance(p.peer_id, str) or not p.peer_id:
            raise ValueError(f"peer_id must be a non-empty string, got {p.peer_id!r}")
        if p.peer_id in seen:
            raise ValueError(f"duplicate peer_id {p.peer_id!r}: each peer must appear once")
        seen.add(p.peer_id)
        if not _is_int(p.capacity_blocks) or p.capacity_blocks < 0:
            raise ValueError(f"peer {p.peer_id!r}: capacity_blocks must be an integer >= 0, got {p.capacity_blocks!r}")
        t = p.throughput
        numeric = isinstance(t, (int, float, np.floating, np.integer)) and not isinstance(t, bool)
        if not numeric or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"peer {p.peer_id!r}: throughput must be a finite number > 0 tokens/s, got {t!r} "
                "(measure it before planning)"
            )
        if not isinstance(p.pinned, bool):
            raise ValueError(f"peer {p.peer_id!r}: pinned must be True or False, got {p.pinned!r}")
        if p.pinned and p.current is None:
            raise ValueError(
                f"peer {p.peer_id!r}: a pinned peer must have its current range set (the blocks its operator "
                "fixed with --blocks); pass it with current=(start, end), or unpinned to let the planner place it"
            )
        if p.current is not None:
            cur = p.current
            if not isinstance(cur, tuple) or len(cur) != 2 or not all(_is_int(x) for x in cur):
                raise ValueError(
                    f"peer {p.peer_id!r}: current must be None or a (start, end) pair of ints, got {cur!r}"
                )
            s, e = cur
            if not 0 <= s < e <= num_blocks:
                raise ValueError(
                    f"peer {p.peer_id!r}: current range [{s}, {e}) is not a non-empty range inside "
                    f"[0, {num_blocks}) (the model has {num_blocks} blocks)"
                )
            if not p.pinned and e - s > p.capacity_blocks:
                raise ValueError(
                    f"peer {p.peer_id!r}: current range [{s}, {e}) holds {e - s} blocks but capacity is "
                    f"{p.capacity_blocks} blocks; announce the capacity it really has"
                )


# --------------------------------------------------------------------------------------------------------
# state: the placement of every peer with capacity >= 1, indexed in peer_id order


class _State:
    """Mutable working placement. Index i is the i-th peer that gets a range (pinned, or capacity >= 1), by
    peer_id."""

    __slots__ = ("n", "t", "full", "movable", "start", "length", "T", "C", "missing", "tol")

    def __init__(self, n: int, t: np.ndarray, full: np.ndarray, movable: np.ndarray, tol: float) -> None:
        self.n = n  # blocks
        self.t = t  # (peers,) tokens/s per block
        self.full = full  # (peers,) blocks; min(capacity, n), or the range length of a pinned peer
        self.movable = movable  # (peers,) bool; False for pinned peers (never placed, moved or removed)
        self.start = np.full(len(t), -1, dtype=np.int64)  # (peers,) -1 = not placed
        self.length = full.copy()  # (peers,) blocks; length of the placed range
        self.T = np.zeros(n)  # (blocks,) tokens/s
        self.C = np.zeros(n, dtype=np.int64)  # (blocks,) peers covering each block
        self.missing = n  # blocks with C == 0
        self.tol = tol  # tokens/s; float comparisons below this are ties

    def copy(self) -> "_State":
        other = _State.__new__(_State)
        other.n, other.t, other.full, other.movable, other.tol = self.n, self.t, self.full, self.movable, self.tol
        other.start, other.length = self.start.copy(), self.length.copy()
        other.T, other.C, other.missing = self.T.copy(), self.C.copy(), self.missing
        return other

    def add(self, i: int, s: int, length: int) -> None:
        self.start[i] = s
        self.length[i] = length
        if self.missing:
            self.missing -= int(np.count_nonzero(self.C[s : s + length] == 0))
        self.T[s : s + length] += self.t[i]
        self.C[s : s + length] += 1

    def remove(self, i: int) -> None:
        s, length = int(self.start[i]), int(self.length[i])
        self.T[s : s + length] -= self.t[i]
        self.C[s : s + length] -= 1
        self.missing += int(np.count_nonzero(self.C[s : s + length] == 0))
        self.start[i] = -1

    def best_window(self, length: int, lo: int, hi: int) -> int:
        """Start in [lo, hi] of the window of `length` blocks to fill next.

        Key: most uncovered blocks, then weakest block, then smallest summed throughput, then first.
        """
        if lo == hi:
            return lo
        win = _windows(self.T, length, lo, hi)  # (windows, length)
        wmin = win.min(axis=1)  # (windows,)
        if self.missing:
            unc = _windows((self.C == 0).astype(np.int64), length, lo, hi).sum(axis=1)  # (windows,)
            cand = np.flatnonzero(unc == unc.max())
            wmin = wmin[cand]
            cand = cand[wmin <= wmin.min() + self.tol]
        else:
            cand = np.flatnonzero(wmin <= wmin.min() + self.tol)
        if len(cand) == 1:
            return lo + int(cand[0])
        wsum = win[cand].sum(axis=1)  # (candidates,)
        return lo + int(cand[int(np.argmax(wsum <= wsum.min() + self.tol * length))])

    def place(self, i: int, sweep: bool = False) -> None:
        """Put peer i on the best window of its full length; with `sweep`, while blocks are uncovered, only
        windows containing the first uncovered block qualify (fills gaps left to right, see the docstring)."""
        length = int(self.full[i])
        lo, hi = 0, self.n - length
        if sweep and self.missing:
            b0 = int(np.argmax(self.C == 0))
            lo, hi = max(0, b0 - length + 1), min(b0, hi)
        self.add(i, self.best_window(length, lo, hi), length)


def _windows(values: np.ndarray, length: int, lo: int, hi: int) -> np.ndarray:
    """Read-only view (hi - lo + 1, length) of the windows values[s : s + length] for s in [lo, hi]."""
    return np.ndarray(
        (hi - lo + 1, length), dtype=values.dtype, buffer=values, offset=lo * values.itemsize,
        strides=(values.itemsize, values.itemsize),
    )


def _range_min_table(values: np.ndarray) -> np.ndarray:
    """Sparse table: row k holds min(values[i : i + 2**k]) (inf where the window runs past the end)."""
    n = len(values)
    rows = [values.astype(np.float64)]
    k = 1
    while (1 << k) <= n:
        prev = rows[-1]
        half = 1 << (k - 1)
        row = np.full(n, np.inf)
        row[: n - half] = np.minimum(prev[: n - half], prev[half:])
        rows.append(row)
        k += 1
    return np.stack(rows)  # (levels, blocks)


def _improve(st: _State, max_moves: int, repair_only: bool) -> int:
    """Local search in place (see module docstring). Returns the number of moves made."""
    n = st.n
    log2 = np.zeros(n + 1, dtype=np.int64)
    for length in range(2, n + 1):
        log2[length] = log2[length // 2] + 1
    moves = 0
    while moves < max_moves:
        uncovered = st.missing > 0
        if repair_only and not uncovered:
            break
        placed = st.start >= 0
        s, length = st.start, st.length
        k = log2[length]
        hi = np.where(placed, s + length - (1 << k), 0)
        lo = np.where(placed, s, 0)
        table_t = _range_min_table(st.T)
        rmin_t = np.minimum(table_t[k, lo], table_t[k, hi])  # (peers,) weakest block of each range
        slack = rmin_t - st.t  # (peers,) that block's throughput once the peer leaves
        if uncovered:
            b = int(np.argmax(st.C == 0))
            m = 0.0
            table_c = _range_min_table(st.C)
            ok = np.minimum(table_c[k, lo], table_c[k, hi]) >= 2  # leaving uncovers nothing
        else:
            m = float(st.T.min())
            b = int(np.argmax(st.T <= m + st.tol))
            ok = slack > m + st.tol  # leaving keeps its blocks above the minimum
        ok &= placed & st.movable & ~((s <= b) & (b < s + length))
        if not ok.any():
            break
        score = np.where(ok, np.minimum(slack, m + st.t), -np.inf)
        i = int(np.argmax(score))
        st.remove(i)
        new_len = int(st.full[i])
        st.add(i, st.best_window(new_len, max(0, b - new_len + 1), min(b, n - new_len)), new_len)
        moves += 1
    return moves


# --------------------------------------------------------------------------------------------------------
# the planner


def _intervals(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Maximal [start, end) runs of True in a boolean (blocks,) array."""
    out = []
    start = None
    for b, v in enumerate(mask.tolist()):
        if v and start is None:
            start = b
        elif not v and start is not None:
            out.append((start, b))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return tuple(out)


def _fmt(intervals: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"[{s}, {e})" for s, e in intervals)


def _covered(st: _State) -> int:
    return st.n - st.missing


def _bottleneck(st: _State) -> float:
    return float(st.T.min()) if st.missing == 0 else 0.0


def plan(peers: Sequence[PeerSpec], num_blocks: int, config: PlannerConfig = PlannerConfig()) -> Plan:
    """Assign each peer a contiguous block range [start, end) of a `num_blocks`-block model.

    Pinned peers keep their current range in every plan (see :class:`PeerSpec`).

    Raises ValueError (with the offending numbers) on nonsensical input: num_blocks <= 0, negative
    capacity, non-positive or non-finite throughput, duplicate peer ids, a current range outside
    [0, num_blocks) or (unless pinned) longer than the peer's capacity, a pinned peer without a current range.
    """
    _validate(peers, num_blocks, config)
    n = num_blocks
    ordered = sorted(peers, key=lambda p: p.peer_id)
    capable = [p for p in ordered if p.pinned or p.capacity_blocks > 0]  # the peers that get a range
    unassigned = tuple(p.peer_id for p in ordered if not p.pinned and p.capacity_blocks == 0)

    t = np.array([float(p.throughput) for p in capable], dtype=np.float64)
    full = np.array([_length(p, n) for p in capable], dtype=np.int64)
    movable = np.array([not p.pinned for p in capable], dtype=bool)
    pinned = [i for i, p in enumerate(capable) if p.pinned]
    total_capacity = int(full.sum())
    tol = 1e-9 * float(t.sum()) if len(t) else 0.0
    max_moves = config.improvement_budget // max(1, len(capable))
    # placement orders of the unpinned peers; the first also orders joining peers in a sticky plan.
    # Ties go to peer_id.
    idx = np.flatnonzero(movable)
    tm, fm = t[idx], full[idx]
    orders = [idx[np.lexsort((idx, -tm, -fm))]]  # longest range first, then fastest
    if len(idx) <= config.multi_order_max_peers:
        orders.append(idx[np.lexsort((idx, -fm, -tm))])  # fastest first, then longest
        orders.append(idx[np.lexsort((idx, -tm, -tm * fm))])  # most throughput x blocks first
    order = orders[0]

    def empty() -> _State:
        """A placement holding only the pinned peers, on their ranges."""
        st = _State(n, t, full, movable, tol)
        for i in pinned:
            s, e = capable[i].current  # type: ignore[misc]
            st.add(i, s, e - s)
        return st

    def greedy(o: np.ndarray, sweep: bool) -> _State:
        st = empty()
        for i in o.tolist():
            st.place(i, sweep=sweep)
        _improve(st, max_moves, repair_only=False)
        return st

    def fresh() -> _State:
        best = None
        for o in orders:
            st = greedy(o, sweep=True)
            if st.missing and pinned:
                # the sweep is what guarantees coverage (module docstring), but it can waste a long range on
                # a short gap; placing on the most uncovered blocks anywhere sometimes fits where it did not
                other = greedy(o, sweep=False)
                if _covered(other) > _covered(st):
                    st = other
            # keep the first order that reaches the best (coverage, bottleneck): deterministic
            if best is None or (_covered(st), _bottleneck(st)) > (_covered(best), _bottleneck(best) + tol):
                best = st
        return best  # type: ignore[return-value]

    serving = [i for i, p in enumerate(capable) if p.current is not None and not p.pinned]
    joining = [i for i in order.tolist() if capable[i].current is None]

    if not serving:
        st = fresh()
        reason = f"no serving peers: fresh plan for {len(joining)} joining peer(s)"
    else:
        sticky = empty()
        for i in serving:
            s, e = capable[i].current  # type: ignore[misc]
            sticky.add(i, s, e - s)
        for i in joining:
            sticky.place(i)
        repairs = _improve(sticky, max_moves, repair_only=True)
        base_cov, base_b = _covered(sticky), _bottleneck(sticky)
        reason = (
            "kept serving peers in place"
            + (f", placed {len(joining)} joining peer(s) on the weakest blocks" if joining else "")
            + (f", {repairs} repair move(s) to re-cover blocks" if repairs else "")
        )
        st = sticky

        def reload_cost(other: _State) -> int:
            """blocks; what peers must load beyond the sticky plan: the part of each new range they would not
            hold there. Measured against the sticky plan (not `current`) so that re-planning its own output
            reaches the same decision."""
            s0, e0 = sticky.start, sticky.start + sticky.length
            s1, e1 = other.start, other.start + other.length
            overlap = np.maximum(0, np.minimum(e1, e0) - np.maximum(s1, s0))
            return int((e1 - s1 - overlap).sum())

        cands = []
        improved = sticky.copy()
        if _improve(improved, max_moves, repair_only=False):
            cands.append(("rebalanced with local moves", improved))
        cands.append(("replanned from scratch", fresh()))
        # (reload cost, -bottleneck, position): the cheapest first, then the best, then the first listed
        ranked = sorted((reload_cost(c), -_bottleneck(c), j) for j, (_, c) in enumerate(cands))
        best_cov = max(_covered(c) for _, c in cands)
        margin = config.hysteresis_margin
        if best_cov > base_cov:
            # coverage broke: take the cheapest plan that covers the most blocks
            j = next(j for _, _, j in ranked if _covered(cands[j][1]) == best_cov)
            how, st = cands[j]
            reason = (
                f"{how}: keeping serving peers leaves {n - base_cov} block(s) uncovered, this plan leaves "
                f"{n - best_cov} (moves {reload_cost(st)} block(s))"
            )
        elif base_cov == n:
            best_gain = max(_bottleneck(c) for _, c in cands) - base_b
            if best_gain > margin * base_b + tol:
                # worth moving for; among the plans near the best (most of its gain, and within the margin
                # of it, so that re-planning the result finds nothing worth moving for) the cheapest decides
                near = config.near_best_fraction * best_gain - tol
                top = base_b + best_gain
                j = next(
                    j for _, _, j in ranked
                    if _bottleneck(cands[j][1]) - base_b >= near
                    and _bottleneck(cands[j][1]) * (1.0 + margin) + tol >= top
                )
                how, c = cands[j]
                gain = _bottleneck(c) / base_b - 1.0
                if _bottleneck(c) > base_b * (1.0 + margin) + tol:
                    st = c
                    reason = (
                        f"{how}: the bottleneck rises from {base_b:.6g} to {_bottleneck(c):.6g} tokens/s "
                        f"(+{gain:.1%} > {margin:.0%} margin; moves {reload_cost(c)} block(s))"
                    )
                else:
                    reason += (
                        f"; kept: a plan moving {reload_cost(c)} block(s) would gain only +{gain:.1%} "
                        f"(<= {margin:.0%} margin), and the best found (+{best_gain / base_b:.1%}) is not "
                        f"worth its extra moves"
                    )

    if pinned:
        reason += f"; {len(pinned)} pinned peer(s) kept on their fixed ranges"
    assignments: dict[str, tuple[int, int]] = {}
    moved = []
    for i, p in enumerate(capable):
        s = int(st.start[i])
        rng = (s, s + int(st.length[i]))
        assignments[p.peer_id] = rng
        if p.pinned:
            if rng != tuple(p.current):  # type: ignore[arg-type]
                raise RuntimeError(f"planner bug: pinned peer {p.peer_id!r} moved from {p.current} to {rng}")
        elif p.current is not None and tuple(p.current) != rng:
            moved.append(p.peer_id)
    uncovered = _intervals(st.C == 0)
    if uncovered:
        missing = sum(e - s for s, e in uncovered)
        reason += f"; blocks {_fmt(uncovered)} uncovered ({missing} block(s)): "
        if not pinned:
            reason += (
                f"total capacity is {total_capacity} blocks for {n} blocks; add peers with at least "
                f"{n - total_capacity} more blocks of capacity"
            )
        else:
            pinned_only = empty()
            gaps = _intervals(pinned_only.C == 0)
            free = sum(e - s for s, e in gaps)
            other = int(full[movable].sum())
            reason += (
                f"pinned peers leave {free} block(s) in {len(gaps)} gap(s) and the other peers can hold "
                f"{other} blocks; "
            )
            if other < free:
                reason += f"add peers with at least {free - other} more blocks of capacity"
            else:
                reason += (
                    "their contiguous ranges do not fit into the gaps; add peers able to hold each uncovered "
                    "run, or restart a pinned peer without --blocks"
                )
    return Plan(
        num_blocks=n,
        assignments=assignments,
        uncovered=uncovered,
        bottleneck=_bottleneck(st),
        block_throughput=tuple(float(x) for x in st.T),
        moved=tuple(moved),
        unassigned=unassigned,
        reason=reason,
        total_capacity=total_capacity,
    )
