"""Time to first token and time per output token: the swarm (1, 2, 3 peers on loopback) vs local.

Both are measured in the same run, on the same machine, with the same checkpoint: the local model
runs in this process; the swarm's peers are real `swarm run-peer` processes on 127.0.0.1 and the
client is in this process. Greedy decoding, 16-token prompt, batch 1, fp32, seed 0.

- TTFT: `generate(max_new_tokens=1)` wall time (session opening, prefill, first token).
- TPOT: (time of `generate(max_new_tokens=N)` - TTFT) / (N - 1).
Medians of --runs rounds (default 5) after one warm-up. In each round the local model and the swarm
clients run one after the other (order rotating), and the ratios are medians of the per-round ratios
swarm / local: the machine's speed drifts, and pairing cancels that. The "local" row is the median of
all its rounds (it runs in every peer count's rounds). The local run and
every peer use the same number of torch threads (--threads, default 1): on a 2-core machine shared by
several peer processes, that is the fair comparison of the work each process does.

Models: "small" Llama (hidden 256, 4 layers, vocab 1000) and "medium" (hidden 1024, intermediate
2816, 16 heads, 12 layers, vocab 32000).

Push (`ClientConfig.push`: the client sends each step to the first peer, which forwards it along the
route): on by default; `--no-push` measures the client-driven path (one round trip per hop), and
`--compare-push` measures both against the same peers, one client after the other.

Tail delivery (`ClientConfig.tail_delivery`: the client collects a pushed step's reply from the last peer
instead of through every peer): on by default; `--no-tail` turns it off, `--compare-tail` measures both.
Loopback has no network latency, which is what tail delivery saves, and this kernel has no netem:
`--latency-ms` delays every frame of every direct connection by that much on arrival (client and peers,
`swarm.direct.EMULATED_LATENCY_S`), to emulate one. uvloop's timers tick in milliseconds, so a delay is
rounded up to the next millisecond or so.

Linear kernels (`--linear-kernel`, `swarm.fast_linear`): the peers, the client and the local model all
use the same setting, so that the ratios compare the swarm with the same computation run locally. The same holds
for where the weights live (`--huge-pages`, on by default, `swarm.huge_pages`): the local model's are moved into
huge pages too, so the ratios measure the swarm's own costs, not a faster memory layout.
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

from tests.processes import SwarmProcesses  # noqa: E402

MODELS = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=1000),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=32000),
}


def build(name: str, directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = directory / name
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **MODELS[name])).save_pretrained(path)
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_rounds(models: dict[str, object], prompt: torch.Tensor, new_tokens: int, runs: int) -> dict[str, list]:
    """`runs` rounds; in each, every model runs TTFT then a full generation, one model after the other (the
    order rotates). Returns label -> [(ttft, tpot) per round]: a round's samples were taken within a second
    or two of each other, so ratios between them cancel the machine's slow drifts (this shared 2-core
    machine's speed wanders by tens of percent over minutes)."""
    gen = dict(do_sample=False, pad_token_id=0)
    for model in models.values():
        model.generate(prompt, max_new_tokens=new_tokens, **gen)  # warm-up
    samples: dict[str, list] = {label: [] for label in models}
    labels = list(models)
    for r in range(runs):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            model = models[label]
            ttft = timed(lambda: model.generate(prompt, max_new_tokens=1, **gen))
            full = timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, **gen))
            samples[label].append((ttft, (full - ttft) / (new_tokens - 1)))
    return samples


def paired(samples: dict[str, list], label: str, base: str = "local") -> tuple[float, float, float, float]:
    """Medians of `label`'s TTFT and TPOT, and medians of its per-round ratios to `base`'s."""
    mine, ref = samples[label], samples[base]
    return (
        statistics.median(t for t, _ in mine), statistics.median(p for _, p in mine),
        statistics.median(a[0] / b[0] for a, b in zip(mine, ref)), statistics.median(a[1] / b[1] for a, b in zip(mine, ref)),
    )


def even_ranges(num_blocks: int, parts: int) -> list[str]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def main() -> None:
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM, ClientConfig
    from swarm.fast_linear import KERNELS, speed_up_linears
    from swarm.huge_pages import move_to_huge_pages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "medium"], choices=list(MODELS))
    parser.add_argument("--peers", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the local run and of every peer (equal, for a fair comparison)")
    parser.add_argument("--push", action=argparse.BooleanOptionalAction, default=True,
                        help="session steps pushed along the route by the peers (ClientConfig.push)")
    parser.add_argument("--compare-push", action="store_true", help="measure the swarm with push and without")
    parser.add_argument("--tail", action=argparse.BooleanOptionalAction, default=True,
                        help="pushed steps collect the last peer's reply from it (ClientConfig.tail_delivery)")
    parser.add_argument("--compare-tail", action="store_true", help="measure pushed steps with tail delivery and without")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="emulated one-way latency of every direct connection (client and peers), ms: loopback has "
                             "none and this kernel has no netem (swarm.direct.EMULATED_LATENCY_S)")
    parser.add_argument("--linear-kernel", choices=KERNELS, default="auto",
                        help="peers', client's and local model's fp32 linear kernel (swarm.fast_linear)")
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                        help="weights of the peers, the client and the local model in huge pages (swarm.huge_pages)")
    parser.add_argument("--inline-max-ms", type=float, default=None,
                        help="peers' --inline-max-ms (default: theirs; 0: every step goes to their compute thread)")
    args = parser.parse_args()
    peer_extra = [] if args.inline_max_ms is None else ["--inline-max-ms", str(args.inline_max_ms)]
    # (label suffix, push, tail delivery)
    if args.compare_tail:
        modes = [(" tail", True, True), (" nested", True, False)]
    elif args.compare_push:
        modes = [(" push", True, args.tail), (" no push", False, False)]
    else:
        modes = [("", args.push, args.tail)]
    env = {"SWARM_DIRECT_LATENCY_MS": str(args.latency_ms)} if args.latency_ms else None
    if args.latency_ms:
        import swarm.direct

        swarm.direct.EMULATED_LATENCY_S = args.latency_ms / 1e3
    torch.set_num_threads(args.threads)
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = build(name, Path(tmp))
            local = AutoModelForCausalLM.from_pretrained(path).eval()
            if args.huge_pages:  # as the peers and the client do by default (swarm.huge_pages)
                move_to_huge_pages(local)
            if args.linear_kernel == "auto":
                speed_up_linears(local)
            local_samples = []
            layers = MODELS[name]["num_hidden_layers"]
            for k in args.peers:
                with SwarmProcesses(env=env) as procs:
                    dht = procs.start_dht()
                    launched = [procs.start_peer(path, dht, r, "--num-threads", str(args.threads),
                                                 "--linear-kernel", args.linear_kernel,
                                                 *([] if args.huge_pages else ["--no-huge-pages"]), *peer_extra, wait=False)
                                for r in even_ranges(layers, k)]
                    for proc in launched:
                        procs.wait_ready(proc)
                    models = {"local": local}
                    for suffix, push, tail in modes:
                        setup = f"swarm {k} peer{'s' * (k > 1)}{suffix}"
                        models[setup] = AutoDistributedModelForCausalLM.from_pretrained(
                            path, initial_peers=[dht],
                            client_config=ClientConfig(push=push, tail_delivery=tail, linear_kernel=args.linear_kernel,
                                                       huge_pages=args.huge_pages))
                    samples = measure_rounds(models, prompt, args.new_tokens, args.runs)
                    for setup, model in models.items():
                        if setup != "local":
                            model.swarm_connection.close()
                            rows.append((name, setup, *paired(samples, setup)))
                    local_samples += samples["local"]
            rows.insert(len(rows) - len(args.peers) * len(modes), (
                name, "local", statistics.median(t for t, _ in local_samples),
                statistics.median(p for _, p in local_samples), 1.0, 1.0))
    print(f"{'model':<8}{'setup':<24}{'TTFT ms':>10}{'TPOT ms':>10}{'TTFT x':>9}{'TPOT x':>9}")
    for name, setup, ttft, tpot, r1, r2 in rows:
        print(f"{name:<8}{setup:<24}{ttft * 1e3:>10.1f}{tpot * 1e3:>10.2f}{r1:>9.2f}{r2:>9.2f}")
    hops = extra_hop(rows, args.peers)
    for (name, mode), ms in hops.items():
        print(f"extra hop, {name}{mode}: {ms:+.2f} ms per token (least-squares slope of TPOT over {args.peers} peers; "
              "the blocks and their compute are the same in every row)")
    print(json.dumps({"benchmark": "generate", "rows": [
        {"model": n, "setup": s, "ttft_ms": round(a * 1e3, 2), "tpot_ms": round(b * 1e3, 3),
         "ttft_ratio": round(c, 3), "tpot_ratio": round(d, 3)} for n, s, a, b, c, d in rows],
        "extra_hop_ms": {f"{n}{m}": round(v, 3) for (n, m), v in hops.items()}}))


def extra_hop(rows, peer_counts: list[int]) -> dict[tuple[str, str], float]:
    """Per model (and push mode): the slope over the number of peers of TPOT (ms), by least squares. Each
    row's TPOT is taken as its paired ratio x the local TPOT, so the drift between rounds cancels here too."""
    local = {name: tpot for name, setup, _, tpot, _, _ in rows if setup == "local"}
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name, setup, _, _, _, ratio in rows:
        if not setup.startswith("swarm "):
            continue
        k = int(setup.split()[1])
        mode = setup.split("peer", 1)[1].lstrip("s")  # "", " push", " no push", " tail", " nested"
        series.setdefault((name, mode), []).append((k, ratio * local[name] * 1e3))
    slopes = {}
    for key, points in series.items():
        if len({k for k, _ in points}) < 2:
            continue
        mean_k = sum(k for k, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        slopes[key] = sum((k - mean_k) * (t - mean_t) for k, t in points) / sum((k - mean_k) ** 2 for k, _ in points)
    return slopes


if __name__ == "__main__":
    main()
