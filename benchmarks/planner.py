"""Planner benchmark: time to plan, balance, and churn on simulated heterogeneous swarms.

    .venv/bin/python benchmarks/planner.py [--quick] [--exact]

A 70B-class model: 80 blocks of ~1.6 GB at float16. Peers are drawn (seeded) from a mix of real devices
with 8 GB to 80 GB of memory; capacity = (free memory - 1.5 GB activation/KV reserve) / 1.62 GB per block,
so an 8 GB card holds 4 blocks and an 80 GB card 48. Per-block throughput is proportional to the device's
memory bandwidth (decode is bandwidth-bound), with +-15% (lognormal) jitter for host and driver
differences. The upper bound on the bottleneck is sum(throughput * min(capacity, blocks)) / blocks.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.planner import PeerSpec, plan, throughput_upper_bound  # noqa: E402

NUM_BLOCKS = 80
BLOCK_GB = 1.62  # GB per block at float16 incl. a small KV-cache share (70B params * 2 B / 80 blocks + KV)
RESERVE_GB = 1.5  # GB kept free for activations

# (name, memory GB, memory bandwidth GB/s, relative frequency in a volunteer swarm)
DEVICES = [
    ("RTX 4060 8GB", 8, 272, 10),
    ("RTX 3070 8GB", 8, 448, 8),
    ("RTX 3060 12GB", 12, 360, 10),
    ("RTX 4070 12GB", 12, 504, 8),
    ("T4 16GB", 16, 320, 6),
    ("RTX 4080 16GB", 16, 717, 6),
    ("RTX 3090 24GB", 24, 936, 10),
    ("RTX 4090 24GB", 24, 1008, 10),
    ("A10 24GB", 24, 600, 5),
    ("A100 40GB", 40, 1555, 4),
    ("RTX A6000 48GB", 48, 768, 4),
    ("L40S 48GB", 48, 864, 4),
    ("A100 80GB", 80, 2039, 6),
    ("H100 80GB", 80, 3350, 4),
]


def draw_peer(rng: random.Random, peer_id: str) -> PeerSpec:
    _, mem, bw, _ = rng.choices(DEVICES, weights=[d[3] for d in DEVICES])[0]
    free = mem * rng.uniform(0.92, 1.0)  # some memory is already taken by the desktop / other processes
    capacity = max(0, int((free - RESERVE_GB) / BLOCK_GB))
    # tokens/s through one block: bandwidth / block bytes, times an effective decode batch of 4, with jitter
    throughput = bw / BLOCK_GB * 4 * math.exp(rng.gauss(0.0, 0.15))
    return PeerSpec(peer_id, max(capacity, 1), round(throughput, 2))


def draw_swarm(n: int, seed: int) -> list[PeerSpec]:
    rng = random.Random(seed)
    return [draw_peer(rng, f"peer-{seed}-{i:05d}") for i in range(n)]


def pin_some(peers: list[PeerSpec], fraction: float, seed: int) -> list[PeerSpec]:
    """Pin a fraction of the peers, as operators starting them with --blocks on a range of their choice
    (random start, random length up to the capacity)."""
    rng = random.Random(seed)
    out = []
    for p in peers:
        if rng.random() < fraction:
            length = rng.randint(1, min(p.capacity_blocks, NUM_BLOCKS))
            s = rng.randint(0, NUM_BLOCKS - length)
            p = PeerSpec(p.peer_id, p.capacity_blocks, p.throughput, (s, s + length), pinned=True)
        out.append(p)
    return out


def pinned_coverage_vs_brute_force(cases: int, seed: int) -> tuple[int, int, int, int]:
    """Small swarms where 1-4 short pinned ranges leave gaps and the other peers have at least as many
    blocks as the gaps. Returns (cases, coverable by brute force, covered by the planner, cases meeting the
    documented sufficient condition that were not covered)."""
    import itertools

    rng = random.Random(seed)
    total = coverable = covered = violated = 0
    while total < cases:
        n = rng.randint(4, 18)
        peers = []
        for i in range(rng.randint(1, 4)):
            length = rng.randint(1, 3)
            s = rng.randint(0, n - length)
            peers.append(PeerSpec(f"pin{i}", 0, rng.choice([1.0, 3.0]), (s, s + length), pinned=True))
        held = {b for p in peers for b in range(*p.current)}
        gaps = sum(1 for b in range(n) if b not in held and (b == 0 or b - 1 in held))
        free = n - len(held)
        m = rng.randint(1, 5)
        lengths = [rng.randint(1, max(1, min(n, 2 * free // m + 1))) for _ in range(m)]
        if sum(lengths) < free:
            continue
        peers += [PeerSpec(f"p{i}", x, rng.choice([1.0, 2.0, 5.0])) for i, x in enumerate(lengths)]
        total += 1
        ok = not plan(peers, n).uncovered
        ls = sorted(lengths, reverse=True)
        if sum(ls) - sum(x - 1 for x in ls[: max(0, gaps - 1)]) >= free and not ok:
            violated += 1
        if ok:
            coverable += 1
            covered += 1
            continue
        for starts in itertools.product(*[range(n - x + 1) for x in lengths]):
            cover = set(held)
            for x, s in zip(lengths, starts):
                cover.update(range(s, s + x))
            if len(cover) == n:
                coverable += 1
                break
    return total, coverable, covered, violated


def time_plan(peers: list[PeerSpec], repeats: int) -> tuple[float, object]:
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = plan(peers, NUM_BLOCKS)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def with_current(peers: list[PeerSpec], assignments: dict) -> list[PeerSpec]:
    return [
        PeerSpec(p.peer_id, p.capacity_blocks, p.throughput, assignments.get(p.peer_id), pinned=p.pinned)
        for p in peers
    ]


def reloaded(before: dict, after) -> tuple[int, int]:
    """(serving peers moved, blocks they reload): a moved peer reloads the blocks of its new range it lacked."""
    moved = blocks = 0
    for pid in after.moved:
        s0, e0 = before[pid]
        s1, e1 = after.assignments[pid]
        moved += 1
        blocks += (e1 - s1) - max(0, min(e0, e1) - max(s0, s1))
    return moved, blocks


def exact_optimum(peers: list[PeerSpec], n: int, time_limit_s: float) -> tuple[float, bool]:
    """(best bottleneck found, proven optimal) by mixed-integer programming; needs scipy (HiGHS)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    lengths = [min(p.capacity_blocks, n) for p in peers]
    choices = [(i, s, lengths[i]) for i in range(len(peers)) for s in range(n - lengths[i] + 1)]
    nv = len(choices) + 1  # one binary per (peer, start), then the bottleneck z
    a = lil_matrix((n + len(peers), nv))
    for j, (i, s, length) in enumerate(choices):
        for b in range(s, s + length):
            a[b, j] = -peers[i].throughput  # z - sum(throughput covering b) <= 0
        a[n + i, j] = 1  # each peer gets exactly one start
    for b in range(n):
        a[b, nv - 1] = 1
    lo = np.r_[np.full(n, -np.inf), np.ones(len(peers))]
    hi = np.r_[np.zeros(n), np.ones(len(peers))]
    cost = np.zeros(nv)
    cost[-1] = -1  # maximise z
    res = milp(cost, constraints=LinearConstraint(a.tocsr(), lo, hi), integrality=np.r_[np.ones(nv - 1), 0],
               bounds=Bounds(0, np.r_[np.ones(nv - 1), np.inf]), options={"time_limit": time_limit_s})
    return -res.fun, res.status == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (for CI smoke runs)")
    ap.add_argument(
        "--exact", action="store_true",
        help="also compare 10-peer swarms with the exact optimum (scipy MILP, up to 30 s each), and coverage "
             "around pinned peers with brute force",
    )
    args = ap.parse_args()
    repeats = {10: 20, 100: 10, 1000: 5, 10000: 5} if not args.quick else {10: 3, 100: 3, 1000: 1, 10000: 1}

    print(f"model: {NUM_BLOCKS} blocks x {BLOCK_GB} GB; devices 8-80 GB -> capacities "
          f"{min(int((d[1] - RESERVE_GB) / BLOCK_GB) for d in DEVICES)}-"
          f"{max(int((d[1] - RESERVE_GB) / BLOCK_GB) for d in DEVICES)} blocks")
    print()
    print("| peers | plan time (median) | replan, nothing changed | bottleneck tok/s | upper bound tok/s "
          "| fraction | uncovered |")
    print("|------:|-------------------:|------------------------:|-----------------:|------------------:"
          "|---------:|----------:|")
    for n in (10, 100, 1000, 10000):
        peers = draw_swarm(n, seed=n)
        t_plan, result = time_plan(peers, repeats[n])
        serving = with_current(peers, result.assignments)
        t_replan, again = time_plan(serving, max(1, repeats[n] // 2))
        if again.moved:
            raise SystemExit(f"BUG: re-planning an unchanged swarm of {n} moved {len(again.moved)} peers")
        bound = throughput_upper_bound(peers, NUM_BLOCKS)
        unc = sum(e - s for s, e in result.uncovered)
        print(f"| {n:>5} | {t_plan * 1e3:>15.1f} ms | {t_replan * 1e3:>20.1f} ms | {result.bottleneck:>16.0f} "
              f"| {bound:>17.0f} | {result.bottleneck / bound:>8.3f} | {unc:>9} |")

    print()
    print("with 10% of the peers pinned (--blocks on a random range up to their capacity):")
    print("| peers | pinned | plan time (median) | replan, nothing changed | bottleneck tok/s | upper bound tok/s "
          "| fraction | uncovered |")
    print("|------:|-------:|-------------------:|------------------------:|-----------------:|------------------:"
          "|---------:|----------:|")
    for n in (100, 1000, 10000):
        peers = pin_some(draw_swarm(n, seed=n), 0.1, seed=n)
        t_plan, result = time_plan(peers, repeats[n])
        if any(result.assignments[p.peer_id] != p.current for p in peers if p.pinned):
            raise SystemExit(f"BUG: a pinned peer moved in a swarm of {n}")
        serving = with_current(peers, result.assignments)
        t_replan, again = time_plan(serving, max(1, repeats[n] // 2))
        if again.moved:
            raise SystemExit(f"BUG: re-planning an unchanged swarm of {n} moved {len(again.moved)} peers")
        bound = throughput_upper_bound(peers, NUM_BLOCKS)
        unc = sum(e - s for s, e in result.uncovered)
        print(f"| {n:>5} | {sum(p.pinned for p in peers):>6} | {t_plan * 1e3:>15.1f} ms | {t_replan * 1e3:>20.1f} ms "
              f"| {result.bottleneck:>16.0f} | {bound:>17.0f} | {result.bottleneck / bound:>8.3f} | {unc:>9} |")

    print()
    print("churn on a balanced swarm of 100 (blocks reloaded = blocks of a moved peer's new range it did not hold):")
    base_peers = draw_swarm(100, seed=100)
    base = plan(base_peers, NUM_BLOCKS)
    serving = with_current(base_peers, base.assignments)

    rng = random.Random(7)
    join_moved, join_blocks, join_load, join_gain = [], [], [], []
    for j in range(30):
        newcomer = draw_peer(rng, f"joiner-{j:03d}")
        after = plan(serving + [newcomer], NUM_BLOCKS)
        m, b = reloaded(base.assignments, after)
        join_moved.append(m)
        join_blocks.append(b)
        s, e = after.assignments[newcomer.peer_id]
        join_load.append(e - s)
        join_gain.append(after.bottleneck / base.bottleneck - 1)

    leave_moved, leave_blocks, leave_loss, leave_uncovered = [], [], [], 0
    for gone in base_peers:
        rest = [p for p in serving if p.peer_id != gone.peer_id]
        after = plan(rest, NUM_BLOCKS)
        m, b = reloaded(base.assignments, after)
        leave_moved.append(m)
        leave_blocks.append(b)
        leave_loss.append(1 - after.bottleneck / base.bottleneck)
        leave_uncovered += bool(after.uncovered)

    # a small swarm, where a departure often breaks coverage and forces repair moves
    small_peers = draw_swarm(10, seed=10)
    small = plan(small_peers, NUM_BLOCKS)
    small_serving = with_current(small_peers, small.assignments)
    small_moved, small_blocks, small_loss, small_broken = [], [], [], 0
    for gone in small_peers:
        rest = [p for p in small_serving if p.peer_id != gone.peer_id]
        kept_cover = {b for p in rest for b in range(*p.current)}
        small_broken += len(kept_cover) < NUM_BLOCKS
        after = plan(rest, NUM_BLOCKS)
        m, b = reloaded(small.assignments, after)
        small_moved.append(m)
        small_blocks.append(b)
        small_loss.append(1 - after.bottleneck / small.bottleneck)

    def stats(xs: list[float], fmt: str = "{:.2f}", worst=max) -> str:
        return f"mean {fmt.format(statistics.mean(xs))}, {'max' if worst is max else 'worst'} {fmt.format(worst(xs))}"

    print("| event | cases | serving peers moved | blocks reloaded by serving peers | newcomer loads "
          "| bottleneck change |")
    print("|-------|------:|--------------------:|---------------------------------:|---------------:"
          "|------------------:|")
    print(f"| one peer joins | {len(join_moved)} | {stats(join_moved)} | {stats(join_blocks)} | "
          f"{stats(join_load, '{:.1f}')} blocks | {stats([100 * g for g in join_gain], '{:+.1f}', min)} % |")
    print(f"| one peer leaves | {len(leave_moved)} | {stats(leave_moved)} | {stats(leave_blocks)} | - | "
          f"{stats([-100 * x for x in leave_loss], '{:+.1f}', min)} % |")
    print(f"| one peer leaves a swarm of 10 ({small_broken} of 10 departures break coverage) | {len(small_moved)} | "
          f"{stats(small_moved)} | {stats(small_blocks)} | - | "
          f"{stats([-100 * x for x in small_loss], '{:+.1f}', min)} % |")
    print(f"(after a departure, plans with uncovered blocks: {leave_uncovered})")

    # a long run of events: does hysteresis let the balance drift, and what do the rebalances cost?
    rng = random.Random(11)
    swarm_now = list(serving)
    last = base
    events = rebalancing_events = moved_blocks = 0
    worst_ratio = 1.0
    for e in range(200):
        if rng.random() < 0.5 and len(swarm_now) > 50:
            gone = rng.choice(swarm_now)
            swarm_now = [p for p in swarm_now if p.peer_id != gone.peer_id]
        else:
            swarm_now.append(draw_peer(rng, f"event-{e:03d}"))
        prev = {p.peer_id: p.current for p in swarm_now if p.current is not None}
        last = plan(swarm_now, NUM_BLOCKS)
        _, b = reloaded(prev, last)
        events += 1
        rebalancing_events += bool(last.moved)
        moved_blocks += b
        swarm_now = with_current(swarm_now, last.assignments)
        fresh_b = plan([PeerSpec(p.peer_id, p.capacity_blocks, p.throughput) for p in swarm_now], NUM_BLOCKS).bottleneck
        worst_ratio = min(worst_ratio, last.bottleneck / fresh_b)
    print(f"{events} random joins/leaves in sequence (swarm of 50-100+): {rebalancing_events} re-plans moved serving "
          f"peers, {moved_blocks} blocks reloaded by serving peers in all; the bottleneck never fell below "
          f"{worst_ratio:.3f} x that of a fresh plan of the same peers")

    if args.exact:
        print()
        cases, coverable, covered, violated = pinned_coverage_vs_brute_force(5000, seed=3)
        print(f"pinned gaps on small swarms with enough blocks in all: {cases} cases, {coverable} coverable "
              f"(brute force), {covered} covered by the planner; {violated} met the sufficient condition "
              f"but were not covered")
        print()
        print("10-peer swarms against the exact optimum (the upper bound is out of reach for few, large peers):")
        print("| seed | planner tok/s | optimum tok/s | planner / optimum | optimum / upper bound |")
        print("|-----:|--------------:|--------------:|------------------:|----------------------:|")
        for seed in (10, 1010, 2010, 3010, 4010, 5010):
            peers = draw_swarm(10, seed=seed)
            got = plan(peers, NUM_BLOCKS).bottleneck
            best, proven = exact_optimum(peers, NUM_BLOCKS, time_limit_s=30)
            best = max(best, got)
            mark = "" if proven else " (best found in 30 s)"
            print(f"| {seed} | {got:.0f} | {best:.0f}{mark} | {got / best:.3f} | "
                  f"{best / throughput_upper_bound(peers, NUM_BLOCKS):.3f} |")


if __name__ == "__main__":
    main()
