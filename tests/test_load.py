"""Load: 16 concurrent client sessions of 64 tokens each against 3 real peer processes.

An 8-block Llama served as 0:3, 3:6, 6:8; one client process runs 16 `generate` calls in 16 threads
(each its own session on every peer), with prompts of 8 to 11 tokens. All must finish within the bound and equal the local model's
tokens. Prints p50/p99 time per token (the gaps between a session's decoded tokens) and each peer's
peak memory (the peer process's VmHWM; and the PSS of its process tree: peer, DHT process, p2p daemon).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.fast_linear import MEASURED_ROWS
from tests.processes import SwarmProcesses
from tests.tiny_models import save_test_llama

SESSIONS = 16
NEW_TOKENS = 64
BOUND_S = 150  # all sessions together, generously above what a loaded 2-core machine needs


class Clock:
    """A `generate` streamer that timestamps every token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def memory_kib(pid: int) -> tuple[int, int, list[str]]:
    """(peak RSS of the peer process, PSS of its whole process tree now, the tree's names), in KiB.

    The tree is the peer, its DHT process (forked: mostly pages shared with the peer, which PSS
    splits instead of counting twice) and its p2p daemon."""
    def pss(p: int) -> int:
        with open(f"/proc/{p}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))

    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    with open(f"/proc/{pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    total, names = 0, []
    for p in tree:
        try:
            total += pss(p)
            names.append(Path(f"/proc/{p}/comm").read_text().strip())
        except (OSError, StopIteration):
            pass
    return peak, total, names


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_test_llama(tmp_path_factory.mktemp("load"), 8)


def test_16_concurrent_sessions_of_64_tokens_on_3_peers(model):
    from swarm import AutoDistributedModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model).eval()
    # prompts of 8 to 11 tokens: the sessions' steps meet at different positions (merged padded, peer/merge.py)
    prompts = [torch.randint(3, 128, (1, 8 + i % 4), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)]
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    want = [local.generate(p, **greedy) for p in prompts]

    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        launched = [procs.start_peer(model, dht, blocks, wait=False) for blocks in ("0:3", "3:6", "6:8")]
        peers = [SwarmProcesses.wait_ready(p) for p in launched]
        client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[dht])
        try:
            client.generate(prompts[0], max_new_tokens=2, do_sample=False)  # warm up routes and connections
            idle = [rss_kib(p.popen.pid) for p in peers]
            clocks = [Clock() for _ in range(SESSIONS)]
            results: dict[int, object] = {}

            def run(i: int) -> None:
                try:
                    results[i] = client.generate(prompts[i], streamer=clocks[i], **greedy)
                except Exception as exc:  # noqa: BLE001 - reported below
                    results[i] = exc

            threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, BOUND_S - (time.monotonic() - began)))
            wall = time.monotonic() - began
            memory = [memory_kib(p.popen.pid) for p in peers]
            transport = client.swarm_connection.transport
            infos = {span.peer_id: transport.info(span.peer_id) for span in client.swarm_capture.router.spans()}
            merged = {peer: info["merged_steps"] for peer, info in infos.items()}
            rows = {peer: info["merged_max_rows"] for peer, info in infos.items()}
            kernels = [info["linear_kernel_rows"] for info in infos.values()]
            in_place = {peer: info["merged_in_place"] for peer, info in infos.items()}
        finally:
            client.swarm_connection.close()

    assert all(not t.is_alive() for t in threads), f"sessions still running after {BOUND_S} s"
    failed = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not failed, failed
    wrong = [i for i in range(SESSIONS) if not torch.equal(results[i], want[i])]
    assert not wrong, f"sessions {wrong} differ from the local model"
    # the peers ran some of the sessions' decode steps merged into one batch (peer/merge.py), and exactly
    assert len(merged) == 3 and all(m > 0 for m in merged.values()), merged
    # only 4 sessions share each prompt length: a merge of more rows spanned positions (padded)
    assert all(rows[p] > 4 for p in merged), (rows, merged)
    # some merges found the caches as the last merge had stacked them and used them without a copy (peer/merge.py)
    assert all(n > 0 for n in in_place.values()), in_place
    # every peer measured its linear layers' kernels (swarm.fast_linear): the Llama's four weight shapes
    assert all(len(k) == 4 and all(r is None or r in MEASURED_ROWS for r in k.values()) for k in kernels), kernels

    # clock.times[0]: the prompt; [1]: the first new token (after the prefill); then one per decode step
    ttft = [c.times[1] - c.times[0] for c in clocks]
    gaps = [b - a for c in clocks for a, b in zip(c.times[1:], c.times[2:])]
    assert len(gaps) == SESSIONS * (NEW_TOKENS - 1)
    tokens = SESSIONS * NEW_TOKENS
    print(
        f"\nload: {SESSIONS} sessions x {NEW_TOKENS} tokens on 3 peers in {wall:.1f} s ({tokens / wall:.0f} tokens/s in all); merged steps per peer: {sorted(merged.values())}\n"
        f"  time per token: p50 {percentile(gaps, 50) * 1e3:.1f} ms, p99 {percentile(gaps, 99) * 1e3:.1f} ms, "
        f"max {max(gaps) * 1e3:.1f} ms; time to first token: p50 {percentile(ttft, 50) * 1e3:.0f} ms, "
        f"max {max(ttft) * 1e3:.0f} ms\n"
        + "".join(
            f"  peer {p.info['blocks']}: peak RSS {hwm / 1024:.0f} MiB (idle before the load: {rest / 1024:.0f} MiB); "
            f"whole process tree ({', '.join(names)}) PSS {tree / 1024:.0f} MiB\n"
            for p, (hwm, tree, names), rest in zip(peers, memory, idle)
        )
    )
