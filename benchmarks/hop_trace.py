"""Where a pushed decode step's time goes, stage by stage, across the client and every peer.

Starts a DHT and N real `swarm run-peer` processes on 127.0.0.1 (one of benchmarks/generate.py's Llamas,
`--model`, small by default, split evenly), with a
tracer loaded into every process (a `sitecustomize` on PYTHONPATH, active only under
SWARM_HOP_TRACE): it wraps a few functions of the step path and records `time.monotonic_ns()` (one
clock for all processes) when each starts and ends. The client in this process generates greedily;
each step's events are put in time order and the median gap between consecutive events is printed,
e.g. ``peer0 decode start -> peer0 decode end``. Steps whose events do not follow the most common
order (a garbage collection, a DHT announcement in between) are left out and counted.

It also prints the client's own share of a token (from one step's reply to the next step's send) next to the
same model run locally with its blocks taken out, back to back: the same work, run warm.

Then it shows why the same code costs more inside the chain than in a loop: the first request the
client sent is decoded back to back, and after 3 ms of other work (a loop reading the clock, as a
waiting peer would not even do). On this machine the second takes several times longer
(docs/performance.md, "Where a hop's time goes").

The tracer wraps functions by name: a renamed function makes this script fail loudly, not lie.
Timings include the tracer's own cost (~1 us per event).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENTS: list[tuple[str, int]] = []
SENT: list[bytes] = []

# (module, class or None, function, label): each call records "<label> start" and "<label> end"
WRAPPED = [
    ("swarm.direct", "_BlockingConnection", "call", "client round trip"),
    ("swarm.direct", "BlockingDirectClient", "push", "client push"),  # tail delivery: sends the step and the collect
    ("swarm.direct", "PushedStep", "first", "client wait"),  # ...and waits for the last peer's reply
    ("swarm.direct", "_Connection", "call", "forward round trip"),
    ("swarm.rpc", "BlockService", "admitted_step", "step"),
    ("peer.steady", "SteadySteps", "decode", "decode"),  # refilled from the session's last request, or decoded in full
    ("swarm.protocol", "StepRequest", "from_wire", "request checks"),
    ("peer.runner", "BlockRunner", "_begin", "session and cache checks"),
    ("peer.runner", "BlockRunner", "_compute", "blocks"),
    ("peer.steady", "SteadySteps", "forward", "next request assembled"),  # a refilled step's (None otherwise, then:)
    ("peer.handler", None, "plan_forward", "next request built"),
    ("peer.steady", "SteadySteps", "deliver", "reply assembled for the client"),  # tail delivery, refilled
    ("peer.steady", "SteadySteps", "reply", "own reply assembled"),  # a refilled step's reply (no push, one peer)
    ("peer.handler", None, "encode_message", "reply encoded"),
    ("peer.handler", None, "deliver", "reply kept for the client"),
    ("peer.tails", "Tails", "put", "reply handed to the client"),
    ("swarm.chain", "Forward", "reply", "reply nested"),
]


def _wrap(module: str, owner: str | None, name: str, label: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    target = getattr(mod, owner) if owner else mod
    fn = inspect.getattr_static(target, name)
    is_classmethod = isinstance(fn, classmethod)
    func = fn.__func__ if is_classmethod else fn
    clock, events = time.monotonic_ns, EVENTS
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            events.append((f"{label} start", clock()))
            try:
                return await func(*args, **kwargs)
            finally:
                events.append((f"{label} end", clock()))
    else:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            events.append((f"{label} start", clock()))
            try:
                return func(*args, **kwargs)
            finally:
                events.append((f"{label} end", clock()))
    setattr(target, name, classmethod(wrapper) if is_classmethod else wrapper)


def install() -> None:
    """Wrap the step path of this process (client or peer) and dump the events at exit."""
    for entry in WRAPPED:
        _wrap(*entry)
    import swarm.direct

    call, push = swarm.direct._BlockingConnection.call, swarm.direct.BlockingDirectClient.push

    def keep(self, data, timeout):
        SENT.append(data)
        return call(self, data, timeout)

    def keep_pushed(self, first, data, *args):
        SENT.append(data)
        return push(self, first, data, *args)

    swarm.direct._BlockingConnection.call = keep
    swarm.direct.BlockingDirectClient.push = keep_pushed
    out = os.environ.get("SWARM_HOP_TRACE")
    if out:
        atexit.register(lambda: Path(out, f"{os.getpid()}.json").write_text(json.dumps(EVENTS)))


SITECUSTOMIZE = f"""
import os, sys
if os.environ.get("SWARM_HOP_TRACE"):
    sys.path.insert(0, {str(ROOT)!r})
    from benchmarks import hop_trace
    hop_trace.install()
"""


def stages(client: list, peers: list[list], window: tuple[int, int]) -> tuple[list[tuple[str, float]], int, int]:
    """Median gap between consecutive events of a step, for the steps in the most common event order."""
    starts = [t for e, t in client if e in ("client round trip start", "client push start") and window[0] <= t <= window[1]]
    ends = [t for e, t in client if e in ("client round trip end", "client wait end") and window[0] <= t <= window[1]]
    steps = []
    for s, r in zip(starts, ends):
        marks = [("client sends", s)]
        for k, events in enumerate(peers):
            marks += [(f"peer{k} {e}", t) for e, t in events if s < t < r]
        marks.append(("client has the reply", r))
        marks.sort(key=lambda m: m[1])
        steps.append(marks)
    order = collections.Counter(tuple(m[0] for m in step) for step in steps).most_common(1)[0][0]
    kept = [step for step in steps if tuple(m[0] for m in step) == order]
    gaps = [(f"{order[i - 1]} -> {order[i]}", statistics.median((st[i][1] - st[i - 1][1]) / 1e3 for st in kept))
            for i in range(1, len(order))]
    return gaps, len(kept), len(steps)


def client_between(client: list, window: tuple[int, int]) -> float:
    """Median µs from the client having a step's reply to its sending the next one: its own share of a token (the
    model's embedding, head and `generate` bookkeeping, the stubs, encoding the request, decoding the reply)."""
    sends, replies = ("client round trip start", "client push start"), ("client round trip end", "client wait end")
    marks = sorted((t, e) for e, t in client if window[0] <= t <= window[1] and e in sends + replies)
    gaps = [(b - a) / 1e3 for (a, ea), (b, eb) in zip(marks, marks[1:]) if ea in replies and eb in sends]
    return statistics.median(gaps)


def without_blocks(model, prompt, gen: dict) -> float:
    """Seconds per token of `model` generating with its blocks taken out (each returns its input): what a client
    does besides the blocks, run back to back in one process."""
    import torch

    from swarm.splitting import find_block_layout, replace_blocks

    class Skip(torch.nn.Module):
        def forward(self, hidden, *args, **kwargs):
            return hidden

    layout = find_block_layout(model)
    blocks: list = []
    replace_blocks(model, layout, lambda i, block: blocks.append(block) or Skip())
    try:
        model.generate(prompt, **gen)
        wall = time.perf_counter()
        model.generate(prompt, **gen)
        return (time.perf_counter() - wall) / gen["max_new_tokens"]
    finally:
        replace_blocks(model, layout, lambda i, _: blocks[i])


def cold_factor(data: bytes, before: bytes | None = None, rounds: int = 300) -> tuple[float, float]:
    """Median µs to decode and check `data` back to back, and right after 3 ms of other work: in full, or (with
    `before`, the same session's previous request) refilled from that one (`peer.steady`)."""
    from peer.steady import SteadySteps
    from swarm.chain import FORWARDED_KEYS
    from swarm.protocol import StepRequest
    from swarm.wire import decode_message

    def once() -> float:
        if before is None:
            t0 = time.perf_counter()
            StepRequest.from_wire(decode_message(data, raw_keys=FORWARDED_KEYS))
            return time.perf_counter() - t0
        steady = SteadySteps()
        steady.settle(steady.decode(before, "client"))
        t0 = time.perf_counter()
        steady.decode(data, "client")
        took = time.perf_counter() - t0
        if not steady.hits:
            raise RuntimeError("the last two requests sent are not one session's consecutive steps")
        return took

    hot = statistics.median(once() for _ in range(rounds))
    after = []
    for _ in range(rounds):
        until = time.perf_counter() + 0.003
        while time.perf_counter() < until:
            pass
        after.append(once())
    return hot * 1e6, statistics.median(after) * 1e6


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.generate import MODELS, build, even_ranges
    from swarm.fast_linear import speed_up_linears
    from swarm.huge_pages import move_to_huge_pages
    from swarm import AutoDistributedModelForCausalLM, ClientConfig
    from tests.processes import SwarmProcesses

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--model", choices=list(MODELS), default="small", help="benchmarks/generate.py's models")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--tail", action=argparse.BooleanOptionalAction, default=True,
                        help="tail delivery (ClientConfig.tail_delivery): the client collects the last peer's reply")
    args = parser.parse_args()
    torch.set_num_threads(1)
    install()
    with tempfile.TemporaryDirectory() as tmp:
        site, out = Path(tmp, "site"), Path(tmp, "events")
        site.mkdir()
        out.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path = build(args.model, Path(tmp))
        env = {"SWARM_HOP_TRACE": str(out), "PYTHONPATH": str(site)}
        with SwarmProcesses(env=env) as procs:
            dht = procs.start_dht()
            peers = [procs.start_peer(path, dht, r, wait=False) for r in even_ranges(MODELS[args.model]["num_hidden_layers"], args.peers)]
            for proc in peers:
                procs.wait_ready(proc)
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[dht], client_config=ClientConfig(tail_delivery=args.tail))
            prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
            gen = dict(do_sample=False, pad_token_id=0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
            model.generate(prompt, **gen)  # warm-up
            local = AutoModelForCausalLM.from_pretrained(path).eval()
            move_to_huge_pages(local)  # as generate.py's baseline: the peers' and the client's default
            speed_up_linears(local)  # as generate.py's baseline: the peers' default kernel choice
            local.generate(prompt, **gen)
            local_wall = time.perf_counter()
            local.generate(prompt, **gen)
            local_wall = (time.perf_counter() - local_wall) / args.tokens
            hollow_wall = without_blocks(local, prompt, gen)
            t0 = time.monotonic_ns()
            wall = time.perf_counter()
            model.generate(prompt, **gen)
            wall = (time.perf_counter() - wall) / args.tokens
            window = (t0, time.monotonic_ns())
            pids = [proc.popen.pid for proc in peers]
            model.swarm_connection.close()
        peer_events = [json.loads(Path(out, f"{pid}.json").read_text()) for pid in pids]
    gaps, kept, total = stages(EVENTS, peer_events, window)
    print(f"{args.model} model, {args.peers} peers, push{' with tail delivery' * args.tail}: {wall * 1e3:.2f} ms per token (the same model locally, just before: "
          f"{local_wall * 1e3:.2f} ms); {kept} of {total} steps in the usual order")
    width = max(len(name) for name, _ in gaps)
    for name, us in gaps:
        print(f"  {name:<{width}}  {us:8.1f} us")
    between = client_between(EVENTS, window)
    print(f"client, from a reply to the next send: {between:.1f} us (the same model without its blocks, locally, back to "
          f"back: {hollow_wall * 1e6:.1f} us per token)")
    hot, after = cold_factor(SENT[-1])
    print(f"decoding and checking the first hop's request ({len(SENT[-1])} bytes): {hot:.1f} us back to back, "
          f"{after:.1f} us after 3 ms of other work ({after / hot:.1f}x)")
    steady_hot, steady_after = cold_factor(SENT[-1], SENT[-2])
    print(f"the same, refilled from the step before (peer.steady): {steady_hot:.1f} us back to back, "
          f"{steady_after:.1f} us after 3 ms of other work")
    print(json.dumps({"benchmark": "hop_trace", "model": args.model, "peers": args.peers, "ms_per_token": round(wall * 1e3, 3),
                      "local_ms_per_token": round(local_wall * 1e3, 3),
                      "stages_us": {name: round(us, 1) for name, us in gaps}, "client_between_steps_us": round(between, 1),
                      "local_without_blocks_us": round(hollow_wall * 1e6, 1), "decode_hot_us": round(hot, 1), "steady_hot_us": round(steady_hot, 1), "steady_after_other_work_us": round(steady_after, 1),
                      "decode_after_other_work_us": round(after, 1)}))


if __name__ == "__main__":
    main()
