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


def test_make_bench_summary_reads_every_benchmarks_line():
    """`make bench` ends with one table of the figures issue 7 names, read from each script's JSON line."""
    from benchmarks.run_all import headlines

    rows = [
        {"benchmark": "generate", "rows": [
            {"model": "medium", "setup": "swarm 2 peers push", "ttft_ratio": 1.02, "tpot_ratio": 1.083},
            {"model": "small", "setup": "swarm 2 peers push", "ttft_ratio": 1.5, "tpot_ratio": 2.07}],
         "extra_hop_ms": {"small push": 1.45}},
        {"benchmark": "pipeline", "local": 276, "sequential": 281, "pipelined": 440, "speedup": 1.565},
        {"benchmark": "sessions", "sessions": 8, "ratio": 2.222},
        {"benchmark": "sessions", "sessions": 8, "ratio": 2.614, "mixed_lengths": True},
        {"benchmark": "wire_size", "decode 2x1": 1.2765},
        {"benchmark": "peer_memory", "ratio": 1.011},
        {"benchmark": "hop_floor", "generate": True, "tpot_ratio": {"1": 1.12, "2": 1.494}, "extra_hop_ms": 0.43,
         "swarm_over_floor": {"1": 1.4, "2": 1.587}},
    ]
    table = {figure: (value, target) for figure, value, target in headlines(rows)}
    assert table["medium decode time per token, 2 peers vs local"] == ("1.08x", "<= 1.10x")
    assert table["small decode time per token, 2 peers vs local"] == ("2.07x", "<= 2.0x")
    assert table["medium time to first token, 2 peers vs local"] == ("1.02x", "<= 1.15x")
    assert table["extra hop per token, small push"] == ("1.45 ms", "<= 1.0 ms")
    assert table["forward 8x128, pipelined vs the same route without"] == ("1.56x", ">= 1.6x")
    assert table["8 concurrent sessions vs one, tokens/s"] == ("2.22x", ">= 3x")
    assert table["8 concurrent sessions vs one, tokens/s, prompts of mixed lengths"] == ("2.61x", ">= 3x")
    assert table["bytes per hop / hidden state bytes, decode 2x1"] == ("1.28x", "-")
    assert table["peer's peak memory added / its blocks' bytes"] == ("1.01x", "<= 1.3x")
    assert table["  floor: small, 2 bare relays under generate() vs local"] == ("1.49x", "-")
    assert table["  floor: extra hop per token, bare relays"] == ("0.43 ms", "-")
    assert table["  small, 2 peers vs that floor, in the same rounds"] == ("1.59x", "-")


def test_hop_trace_still_finds_every_stage_of_a_pushed_step():
    """benchmarks/hop_trace.py wraps product functions by name in real peer processes: a rename must show
    here, not as a silently thinner table in docs/performance.md."""
    # 24 tokens: 22 refilled steps, so the usual order is theirs even when a few of them end in another order
    # (which of the first peer's events fall before the client's reply races); with 6 it was one CI run's coin toss
    result = subprocess.run([sys.executable, "benchmarks/hop_trace.py", "--peers", "2", "--tokens", "24"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    stages = summary["stages_us"]
    assert 0 < summary["local_without_blocks_us"] and 0 < summary["client_between_steps_us"] < 1e3 * summary["ms_per_token"]
    # decode steps after the first are refilled (peer.steady): what they send on is assembled, not built
    for needle in ("client sends -> peer0 step start", "peer0 blocks start -> peer0 blocks end",
                   "peer0 next request assembled start -> peer0 next request assembled end",
                   "peer1 decode start -> peer1 decode end",
                   "peer1 reply assembled for the client start -> peer1 reply assembled for the client end",  # tail
                   "peer1 reply assembled for the client end -> peer1 reply handed to the client start"):  # delivery
        assert needle in stages, sorted(stages)
    # the client's wait ends after the last peer handed it the reply; the first peer's handling of the chain's
    # DELIVERED answer runs at the same time and may come in between (its "step end" just before the client's)
    order = [stage.split(" -> ")[0] for stage in stages]
    assert list(stages)[-1].endswith(" -> client has the reply"), list(stages)[-1]
    handed = order.index("peer1 reply handed to the client start")
    assert all(event.startswith(("peer1 ", "peer0 forward round trip end", "peer0 reply nested", "peer0 step end"))
               for event in order[handed:]), order[handed:]


def test_ab_compares_two_checkouts_round_by_round():
    """benchmarks/ab.py runs a function of its own inside each checkout's process: that it still starts both
    swarms, alternates, and reports every process's CPU must show here."""
    result = subprocess.run([sys.executable, "benchmarks/ab.py", "--a", ".", "--b", ".", "--peers", "1", "--rounds", "2",
                             "--tokens", "4", "--b-peer-args=--inline-max-ms 0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == 2
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "ab" and summary["rounds"] == 2 and 0 < summary["ratio"] < 10
    assert [len(summary["cpu_ms"][side]) for side in "AB"] == [2, 2]  # the client and its one peer, each side
    assert all(c > 0 for side in "AB" for c in summary["cpu_ms"][side])


def test_hop_floor_runs_its_relays_and_checks_their_tokens():
    """benchmarks/hop_floor.py's bare relays must still produce the local model's greedy tokens (it exits with an
    error otherwise) and print the floor of an extra hop."""
    result = subprocess.run([sys.executable, "benchmarks/hop_floor.py", "--peers", "1", "2", "--rounds", "2",
                             "--tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "hop_floor" and set(summary["tpot_ms"]) == {"local", "1", "2"}
    assert all(ms > 0 for ms in summary["tpot_ms"].values())


def test_hop_floor_under_generate_matches_the_local_model():
    """`hop_floor.py --generate --swarm` (as `make bench` runs it): transformers' generate() over stub layers and bare
    relays, and over the real swarm of the same split, must each give the local model's greedy tokens (the prefill
    travels through the relays too; it exits with an error otherwise)."""
    result = subprocess.run([sys.executable, "benchmarks/hop_floor.py", "--generate", "--swarm", "--peers", "1", "2",
                             "--rounds", "2", "--tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "hop_floor" and summary["generate"] is True
    assert set(summary["tpot_ms"]) == {"local", "1", "2", "swarm 1", "swarm 2"}
    assert all(ms > 0 for ms in summary["tpot_ms"].values()) and set(summary["swarm_over_floor"]) == {"1", "2"}
