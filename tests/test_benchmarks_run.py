"""The in-process benchmark still runs against the current client (a transport wrapper there once fell
behind the `Transport` protocol and `make bench` failed unnoticed). Only that it runs and prints its
summary line is checked here: its figures are for docs/performance.md, never for a test."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import ROOT


def test_wire_size_benchmark_runs_and_prints_its_summary():
    result = subprocess.run([sys.executable, "benchmarks/wire_size.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "wire_size" and summary["decode 2x1"] > 1.0
