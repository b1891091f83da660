"""Forward of a batch 8 x 128 through 2 peers: pipelined micro-batches vs the same route without, and local.

Peers are real `swarm run-peer` processes on 127.0.0.1 serving the medium Llama (hidden 1024,
12 layers, fp32) as 0:6 and 6:12. Every process gets the same number of torch threads (--threads,
default 1) so the comparison is fair on a small machine. Throughput = tokens / wall time of one
forward (no KV cache), median of --runs rounds after a warm-up; in each round local, sequential and
pipelined run one after the other, and the speed-up is the median of the per-round ratios (the
machine's speed drifts over minutes; pairing cancels that).

The base model is measured (hidden states out, as an encoder or embedding job would use it): the
LM head runs on the client after every block, for the whole batch, in any case; with a 32000-token
vocabulary it is as much work as ~3 of the 12 blocks and would only dilute what pipelining changes.

Linear kernels (`--linear-kernel`, `swarm.fast_linear`): the peers, the client and the local model all use
the same setting, so that "x local" compares the swarm with the same computation run locally.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generate import MODELS, build  # noqa: E402
from tests.processes import SwarmProcesses  # noqa: E402


def rounds(models: dict[str, object], ids, runs: int) -> dict[str, list[float]]:
    """Seconds per forward, `runs` rounds; in each, every model runs once, one after the other (order rotating),
    so that ratios within a round cancel the machine's slow speed drifts."""
    labels = list(models)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with torch.no_grad():
        for model in models.values():
            model(ids, use_cache=False)  # warm-up
        for r in range(runs):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                t0 = time.perf_counter()
                models[label](ids, use_cache=False)
                times[label].append(time.perf_counter() - t0)
    return times


def main() -> None:
    from transformers import AutoModel

    from swarm import AutoDistributedModel
    from swarm.client import ClientConfig
    from swarm.fast_linear import KERNELS, speed_up_linears
    from swarm.huge_pages import move_to_huge_pages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", type=int, default=None, help="micro-batches (default: automatic)")
    parser.add_argument("--linear-kernel", choices=KERNELS, default="auto",
                        help="peers', client's and local model's fp32 linear kernel (swarm.fast_linear)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    layers = MODELS[args.model]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.model, Path(tmp))
        models = {"local": AutoModel.from_pretrained(path).eval()}
        move_to_huge_pages(models["local"])  # as the peers and the client do by default (swarm.huge_pages)
        if args.linear_kernel == "auto":
            speed_up_linears(models["local"])
        with SwarmProcesses() as procs:
            dht = procs.start_dht()
            half = layers // 2
            launched = [procs.start_peer(path, dht, r, "--num-threads", str(args.threads),
                                         "--linear-kernel", args.linear_kernel, wait=False)
                        for r in (f"0:{half}", f"{half}:{layers}")]
            for proc in launched:
                procs.wait_ready(proc)
            for name, parts in (("sequential", 1), ("pipelined", args.parts)):
                models[name] = AutoDistributedModel.from_pretrained(
                    path, initial_peers=[dht], client_config=ClientConfig(microbatches=parts, linear_kernel=args.linear_kernel))
            times = rounds(models, ids, args.runs)
            for name in ("sequential", "pipelined"):
                models[name].swarm_connection.close()
    local = ids.numel() / statistics.median(times["local"])
    results = {name: ids.numel() / statistics.median(times[name]) for name in ("sequential", "pipelined")}
    speedup = statistics.median(s / p for s, p in zip(times["sequential"], times["pipelined"]))
    print(f"forward {args.batch}x{args.seq}, {args.model}, 2 peers, {args.threads} torch thread(s) per process")
    print(f"  local       {local:10.0f} tokens/s")
    print(f"  sequential  {results['sequential']:10.0f} tokens/s  ({results['sequential'] / local:.2f}x local)")
    print(f"  pipelined   {results['pipelined']:10.0f} tokens/s  ({results['pipelined'] / local:.2f}x local)")
    print(f"  pipelining speed-up: {speedup:.2f}x (target >= 1.6x)")
    print(json.dumps({"benchmark": "pipeline", "local": round(local), **{k: round(v) for k, v in results.items()},
                      "speedup": round(speedup, 3)}))


if __name__ == "__main__":
    main()
