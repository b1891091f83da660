"""Paired A/B of two checkouts (or two peer settings): time per token of each, alternating, on one machine.

A change worth a few percent cannot be seen in two `generate.py` runs minutes apart: this machine's speed
drifts by more than that (docs/performance.md). Here each side is a worker process that starts its own
DHT and peers (`swarm run-peer` of its own checkout, the same checkpoint, built with the same seed) and a
client, once; then the driver asks the two workers in turn to generate `--tokens` tokens greedily,
flipping the order every round, and prints the median of the per-round ratios B / A (below 1: B is
faster), how many rounds B was faster, and each process's CPU per token (`psutil`: client, then peers
in route order). Both swarms stay up the whole time; only one generates at a time.

    git worktree add /tmp/before HEAD
    python benchmarks/ab.py --a /tmp/before --b . --model small --peers 2 --rounds 12
    python benchmarks/ab.py --a . --b . --b-peer-args="--inline-max-ms 0"    # two settings of one checkout

The two swarms are not quite equal either: an A/A run (the same checkout on both sides) measured 0.973, B
faster in 9 of 12 rounds. So run each comparison in both orders (`--a old --b new`, then `--a new --b old`)
and read the effect from the two together; a gain smaller than that spread is not shown by this tool.

Each side's worker runs this file's `worker` with that checkout first on `sys.path`, so the old side needs
none of this script, only what `worker` uses (`tests.processes`, `benchmarks.generate`, `swarm`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(checkout: str, model: str, peers: int, tokens: int, peer_args: list[str]) -> None:
    """One side: a swarm of `checkout`'s code; each "run" line on stdin answers one JSON line on stdout."""
    sys.path.insert(0, checkout)
    sys.path.insert(1, str(Path(checkout, "benchmarks")))
    import tempfile

    import psutil
    import torch

    from generate import MODELS, build, even_ranges
    from swarm import AutoDistributedModelForCausalLM, ClientConfig
    from tests.processes import SwarmProcesses

    torch.set_num_threads(1)
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    gen = dict(do_sample=False, pad_token_id=0, max_new_tokens=tokens, min_new_tokens=tokens)
    with tempfile.TemporaryDirectory() as tmp, SwarmProcesses() as procs:
        path = build(model, Path(tmp))
        dht = procs.start_dht()
        started = [procs.start_peer(path, dht, r, "--num-threads", "1", *peer_args, wait=False)
                   for r in even_ranges(MODELS[model]["num_hidden_layers"], peers)]
        for proc in started:
            procs.wait_ready(proc)
        client = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[dht], client_config=ClientConfig())
        client.generate(prompt, **gen)  # warm-up: sessions, connections, routes
        watched = [psutil.Process()] + [psutil.Process(proc.popen.pid) for proc in started]
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            cpu = [sum(p.cpu_times()[:2]) for p in watched]
            wall = time.perf_counter()
            client.generate(prompt, **gen)
            wall = (time.perf_counter() - wall) / tokens
            cpu = [(sum(p.cpu_times()[:2]) - c) / tokens for p, c in zip(watched, cpu)]
            print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
        client.swarm_connection.close()


class Side:
    def __init__(self, name: str, checkout: str, args: argparse.Namespace, peer_args: str):
        self.name = name
        code = (f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); import ab; "
                f"ab.worker({str(Path(checkout).resolve())!r}, {args.model!r}, {args.peers}, {args.tokens}, "
                f"{shlex.split(peer_args)!r})")
        self.popen = subprocess.Popen([sys.executable, "-c", code], cwd=checkout, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        while True:
            line = self.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"side {self.name} exited with {self.popen.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self) -> dict:
        self.popen.stdin.write("run\n")
        self.popen.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.stdin.write("stop\n")
            self.popen.stdin.flush()
            self.popen.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", required=True, help="checkout B")
    parser.add_argument("--a-peer-args", default="", help="extra `swarm run-peer` arguments of side A's peers")
    parser.add_argument("--b-peer-args", default="", help="extra `swarm run-peer` arguments of side B's peers")
    parser.add_argument("--model", default="small", choices=["small", "medium"])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    sides = {"A": Side("A", args.a, args, args.a_peer_args), "B": Side("B", args.b, args, args.b_peer_args)}
    try:
        for side in sides.values():
            side.read()  # ready
        samples: dict[str, list[dict]] = {"A": [], "B": []}
        for r in range(args.rounds):
            for name in ("AB" if r % 2 == 0 else "BA"):
                samples[name].append(sides[name].run())
            a, b = samples["A"][-1]["wall"], samples["B"][-1]["wall"]
            print(f"round {r + 1}: A {a * 1e3:.2f} ms, B {b * 1e3:.2f} ms per token, B / A {b / a:.3f}", flush=True)
    finally:
        for side in sides.values():
            side.close()
    ratios = [b["wall"] / a["wall"] for a, b in zip(samples["A"], samples["B"])]
    cpu = {name: [statistics.median(s["cpu"][i] for s in runs) * 1e3 for i in range(len(runs[0]["cpu"]))]
           for name, runs in samples.items()}
    print(f"{args.model}, {args.peers} peers, {args.rounds} rounds of {args.tokens} tokens: B / A wall per token "
          f"{statistics.median(ratios):.3f} (median of the per-round ratios), B faster in "
          f"{sum(x < 1 for x in ratios)} of {len(ratios)}; A {statistics.median(s['wall'] for s in samples['A']) * 1e3:.2f} ms, "
          f"B {statistics.median(s['wall'] for s in samples['B']) * 1e3:.2f} ms")
    for name in "AB":
        print(f"  CPU ms per token, side {name} (client, peers in route order): "
              + " / ".join(f"{c:.2f}" for c in cpu[name]))
    print(json.dumps({"benchmark": "ab", "model": args.model, "peers": args.peers, "rounds": args.rounds,
                      "ratio": round(statistics.median(ratios), 4), "b_faster": sum(x < 1 for x in ratios),
                      "cpu_ms": {k: [round(c, 3) for c in v] for k, v in cpu.items()}}))


if __name__ == "__main__":
    main()
