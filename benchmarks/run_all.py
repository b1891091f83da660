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
    ("pipeline.py", []),  # micro-batch pipelining vs the same route without
    ("sessions.py", []),  # 8 concurrent sessions vs one (peers merge their decode steps)
    ("wire_size.py", []),  # bytes per hop vs the hidden state
    ("peer_memory.py", []),  # a peer's load vs its blocks' bytes
    ("planner.py", []),  # planner speed, balance, churn
]


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
    print("\n== summary")
    for row in rows:
        name = row.pop("benchmark", "?")
        print(f"{name:<12} {json.dumps(row)[:300]}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
