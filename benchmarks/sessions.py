"""Aggregate decode throughput of concurrent sessions against 2 peers, vs one session alone.

Peers are real `swarm run-peer` processes on 127.0.0.1 (one torch thread each); the client is this
process, one distributed model used from several threads at once, one inference session per thread.
Greedy, batch 1 per session, 16-token prompts (different per session; --prompt-tokens N: N tokens;
--mixed-lengths: N, N+3, N+6, ... tokens, so that the sessions' steps meet at different positions), fp32,
medium Llama by default.

- single: tokens/s of one `generate(max_new_tokens=N)` (session opening and prefill included);
- concurrent: total new tokens / wall time of --sessions such calls started together.
Medians of --runs runs after one warm-up. The ratio concurrent / single is what batching the sessions'
decode steps on each peer (peer/merge.py) buys; the peers report how many steps they merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.generate import MODELS, build, even_ranges  # noqa: E402
from tests.processes import SwarmProcesses  # noqa: E402


def run_sessions(model, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Wall time of one greedy generation per prompt, all started together (one thread each)."""
    gen = dict(do_sample=False, pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts) + 1)

    def work(prompt):
        start.wait()
        try:
            model.generate(prompt, **gen)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time used so far by each named process and its children (p2p daemons), in seconds."""
    import psutil

    out = {}
    named = set(pids.values())
    for name, pid in pids.items():
        main = psutil.Process(pid)
        # children: p2p daemons, DHT processes (not the peers this script started: they have their own rows)
        below = main.children(recursive=True)
        others = {c.pid for c in below if c.pid in named}
        for c in below:
            if c.pid in others:
                others |= {d.pid for d in c.children(recursive=True)}
        children = [c for c in below if c.pid not in others]
        for label, procs in ((name, [main]), (f"{name} children", children)):
            total = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                except psutil.Error:
                    continue
                total += t.user + t.system
            out[label] = total
    return out


def cpu_per_token(pids: dict[str, int], fn, tokens: int) -> dict[str, float]:
    """Milliseconds of CPU each process spent per generated token while `fn` ran."""
    before = cpu_seconds(pids)
    fn()
    after = cpu_seconds(pids)
    return {name: round((after[name] - before.get(name, 0.0)) * 1e3 / tokens, 1) for name in after}


def merged(model) -> dict[str, dict]:
    """Each peer's counters of merged steps (from its rpc_info)."""
    transport = model.swarm_connection.transport
    out = {}
    for span in model.swarm_capture.router.spans():
        info = transport.info(span.peer_id)
        out[f"{info['start']}:{info['end']}"] = {"merged_steps": info.get("merged_steps"), "merged_rows": info.get("merged_rows"),
                                            "merged_in_place": info.get("merged_in_place")}
    return out


def main() -> None:
    from swarm import AutoDistributedModelForCausalLM, ClientConfig
    from swarm.fast_linear import KERNELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", choices=list(MODELS))
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client and of every peer")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="peers' --batch-wait-ms (default: theirs)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (the shortest, with --mixed-lengths)")
    parser.add_argument("--mixed-lengths", action="store_true",
                        help="prompts of N, N+3, N+6, ... tokens: the sessions' steps meet at different positions")
    parser.add_argument("--share-head", action=argparse.BooleanOptionalAction, default=True,
                        help="the client's sessions share one product of the output layer (ClientConfig.share_head)")
    parser.add_argument("--linear-kernel", choices=KERNELS, default="auto",
                        help="peers' and client's fp32 linear kernel (swarm.fast_linear)")
    parser.add_argument("--tail", action=argparse.BooleanOptionalAction, default=True,
                        help="pushed steps collect the last peer's reply from it (ClientConfig.tail_delivery)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    # equal prompts start the sessions at one position; --mixed-lengths gives them N, N+3, N+6, ... tokens
    lengths = [args.prompt_tokens + 3 * i * args.mixed_lengths for i in range(args.sessions)]
    prompts = [torch.randint(3, 1000, (1, n), generator=g) for n in lengths]
    with tempfile.TemporaryDirectory() as tmp, SwarmProcesses() as procs:
        path = build(args.model, Path(tmp))
        dht = procs.start_dht()
        extra = ["--linear-kernel", args.linear_kernel]
        extra += ["--batch-wait-ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else []
        launched = [procs.start_peer(path, dht, r, "--num-threads", str(args.threads), *extra, wait=False)
                    for r in even_ranges(MODELS[args.model]["num_hidden_layers"], args.peers)]
        for proc in launched:
            procs.wait_ready(proc)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=[dht], client_config=ClientConfig(share_head=args.share_head, linear_kernel=args.linear_kernel,
                                                     tail_delivery=args.tail))
        run_sessions(model, prompts[:1], args.new_tokens)  # warm-up
        run_sessions(model, prompts, args.new_tokens)
        single = [args.new_tokens / run_sessions(model, prompts[:1], args.new_tokens) for _ in range(args.runs)]
        many = [args.sessions * args.new_tokens / run_sessions(model, prompts, args.new_tokens) for _ in range(args.runs)]
        counters = merged(model)
        head = model.swarm_head
        heads = {"merges": head.merges, "calls_merged": head.merged_calls} if head is not None else None
        import os

        pids = {"client": os.getpid(), **{f"peer {r}": proc.popen.pid for r, proc in zip(
            even_ranges(MODELS[args.model]["num_hidden_layers"], args.peers), launched)}}
        cpu_single = cpu_per_token(pids, lambda: run_sessions(model, prompts[:1], args.new_tokens), args.new_tokens)
        cpu_many = cpu_per_token(pids, lambda: run_sessions(model, prompts, args.new_tokens), args.sessions * args.new_tokens)
        model.swarm_connection.close()
    s, m = statistics.median(single), statistics.median(many)
    print(f"{args.model} model, {args.peers} peers, {args.new_tokens} new tokens per session, medians of {args.runs}, "
          f"prompts of {', '.join(map(str, lengths[:3])) + ', ...' if args.mixed_lengths else lengths[0]} tokens")
    print(f"{'setup':<24}{'tokens/s':>10}{'x single':>10}")
    print(f"{'1 session':<24}{s:>10.1f}{1.0:>10.2f}")
    print(f"{f'{args.sessions} concurrent sessions':<24}{m:>10.1f}{m / s:>10.2f}")
    print("peers' merged steps:", counters)
    print("client's merged output-layer products:", heads)
    print("CPU ms per token, 1 session:", cpu_single)
    print(f"CPU ms per token, {args.sessions} sessions:", cpu_many)
    print(json.dumps({"benchmark": "sessions", "model": args.model, "peers": args.peers, "sessions": args.sessions,
                      "prompt_tokens": args.prompt_tokens, "mixed_lengths": args.mixed_lengths,
                      "single_tokens_s": round(s, 2), "concurrent_tokens_s": round(m, 2), "ratio": round(m / s, 3),
                      "merged": counters, "share_head": args.share_head, "head_merges": heads,
                      "cpu_ms_per_token_single": cpu_single, "cpu_ms_per_token_concurrent": cpu_many}))


if __name__ == "__main__":
    main()
