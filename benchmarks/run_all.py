"""`make bench`: run every benchmark, each in its own process, and print one table of their figures.

Each benchmark prints its own table and, last, one JSON line; this script collects those lines.
Figures are ratios against a baseline measured in the same run (see each script's docstring).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("generate.py", ["--compare-push"]),  # TTFT / TPOT, swarm with 1-3 peers (push and not) vs local
    # the same TPOT through bare relays, what this machine allows at best, and the swarm in the same rounds
    ("hop_floor.py", ["--generate", "--swarm", "--peers", "1", "2"]),
    ("pipeline.py", []),  # micro-batch pipelining vs the same route without
    ("sessions.py", []),  # 8 concurrent sessions vs one (peers merge their decode steps)
    ("sessions.py", ["--mixed-lengths"]),  # the same, prompts of different lengths (merged padded)
    ("wire_size.py", []),  # bytes per hop vs the hidden state
    ("peer_memory.py", []),  # a peer's load vs its blocks' bytes
    ("planner.py", []),  # planner speed, balance, churn
]


def headlines(results: list[dict]) -> list[tuple[str, str, str]]:
    """(figure, measured, target) rows from the benchmarks' JSON lines, for the figures the targets name."""
    out = []
    by_name = {r.get("benchmark"): r for r in results}
    gen = by_name.get("generate")
    if gen:
        ratios = {(r["model"], r["setup"]): r for r in gen["rows"]}
        two_peers = {m: ratios.get((m, "swarm 2 peers push")) or ratios.get((m, "swarm 2 peers")) for m in ("medium", "small")}
        for model, target in (("medium", "<= 1.10x"), ("small", "<= 2.0x")):
            row = two_peers[model]
            if row:
                out.append((f"{model} decode time per token, 2 peers vs local", f"{row['tpot_ratio']:.2f}x", target))
        row = two_peers["medium"]
        if row:
            out.append(("medium time to first token, 2 peers vs local", f"{row['ttft_ratio']:.2f}x", "<= 1.15x"))
        for key, ms in gen.get("extra_hop_ms", {}).items():
            out.append((f"extra hop per token, {key}", f"{ms:.2f} ms", "<= 1.0 ms"))
    floor = next((r for r in results if r.get("benchmark") == "hop_floor" and r.get("generate")), None)
    if floor:
        if "2" in floor["tpot_ratio"]:
            out.append(("  floor: small, 2 bare relays under generate() vs local", f"{floor['tpot_ratio']['2']:.2f}x", "-"))
        if "2" in floor.get("swarm_over_floor", {}):
            out.append(("  small, 2 peers vs that floor, in the same rounds", f"{floor['swarm_over_floor']['2']:.2f}x", "-"))
        out.append(("  floor: extra hop per token, bare relays", f"{floor['extra_hop_ms']:.2f} ms", "-"))
    pipe = by_name.get("pipeline")
    if pipe:
        out.append(("forward 8x128, pipelined vs the same route without", f"{pipe['speedup']:.2f}x", ">= 1.6x"))
        out.append(("forward 8x128, pipelined vs local", f"{pipe['pipelined'] / pipe['local']:.2f}x", "-"))
    for sessions in (r for r in results if r.get("benchmark") == "sessions"):
        mixed = ", prompts of mixed lengths" if sessions.get("mixed_lengths") else ""
        out.append((f"{sessions['sessions']} concurrent sessions vs one, tokens/s{mixed}", f"{sessions['ratio']:.2f}x", ">= 3x"))
    wire = by_name.get("wire_size")
    if wire:
        for key, ratio in wire.items():
            if key != "benchmark":
                out.append((f"bytes per hop / hidden state bytes, {key}", f"{ratio:.2f}x", "-"))
    memory = by_name.get("peer_memory")
    if memory:
        out.append(("peer's peak memory added / its blocks' bytes", f"{memory['ratio']:.2f}x", "<= 1.3x"))
    return out


def main() -> int:
    rows, failed = [], []
    for script, args in BENCHMARKS:
        print(f"== {script}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if "Loading" not in l and "Writing" not in l]
        print("\n".join(lines), flush=True)
        if proc.returncode:
            failed.append(script)
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        for line in reversed(lines):
            if line.startswith("{"):
                rows.append(json.loads(line))
                break
    print("\n== summary (issue 7's targets; each ratio against a baseline measured in the same run)")
    print(f"{'figure':<64}{'measured':>12}  target")
    for figure, value, target in headlines(rows):
        print(f"{figure:<64}{value:>12}  {target}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
