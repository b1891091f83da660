"""Decode steps of concurrent sessions merged into one batch on a peer still give exactly the local output.

Several clients generate at once through the same 3 in-process peers. A lock-step transport hands
each peer the requests of all clients together (as the peer's compute queue does when they arrive
while it is busy), so every decode step of every architecture runs merged; each client's tokens must
equal the unsplit model's. Sessions that cannot merge (a left-padded batch next to unpadded ones,
different positions) run one by one, also exactly.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.inprocess import start_local_peers
from swarm.model import load_client_model
from swarm.router import SwarmRouter
from swarm.routing import Span
from tests.tiny_models import NUM_LAYERS, TINY_MODELS, save_tiny

RANGES = [(0, 2), (2, 5), (5, NUM_LAYERS)]
CAUSAL = [name for name, m in TINY_MODELS.items() if m.causal]
# BLOOM's ALiBi tensor has batch x heads rows, folded into one dim: not recognisably batch-major, so its
# steps never merge (docs/performance.md); they still run, one by one.
NOT_MERGED = {"bloom"}


class LockstepTransport:
    """Holds each peer's requests until `parties` are waiting (or `patience_s` passed), then runs them together."""

    def __init__(self, peers, parties: int, patience_s: float = 0.5):
        self.handlers = {p.peer_id: p.handler for p in peers}
        self.parties, self.patience_s = parties, patience_s
        self.cond = threading.Condition()
        self.pending: dict[str, list] = {pid: [] for pid in self.handlers}
        self.batch_sizes: list[int] = []

    def step(self, peer_id: str, request: bytes) -> bytes:
        entry = [request, None]
        deadline = time.monotonic() + self.patience_s
        with self.cond:
            queue = self.pending[peer_id]
            queue.append(entry)
            self.cond.notify_all()
            while entry[1] is None:
                if len(queue) >= self.parties or (time.monotonic() >= deadline and entry in queue):
                    items, self.pending[peer_id] = list(queue), []
                    replies = self.handlers[peer_id].step_many([(e[0], "client") for e in items])
                    self.batch_sizes.append(len(items))
                    for e, reply in zip(items, replies):
                        e[1] = reply
                    self.cond.notify_all()
                    break
                self.cond.wait(0.02)
                queue = self.pending[peer_id]
        return entry[1]

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None:
        self.handlers[peer_id].close_session(session_id, "client")


def clients(path, peers, transport, n: int, spec):
    spans = [Span(p.peer_id, p.start, p.end) for p in peers]
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    return [
        load_client_model(
            path, lambda layout, config: SwarmRouter(layout.num_blocks, lambda: spans, transport, rng=random.Random(0)),
            auto_class=AutoModelForCausalLM, dtype=torch.float32, **kwargs,
        )
        for _ in range(n)
    ]


def run_together(jobs):
    results: list = [None] * len(jobs)
    errors: list = []

    def work(i, job):
        try:
            results[i] = job()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("name", CAUSAL)
def test_merged_decode_steps_match_local(name, tmp_path):
    spec = TINY_MODELS[name]
    path = save_tiny(name, tmp_path)
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    peers = start_local_peers(path, RANGES, attn_implementation=spec.attn_implementation)
    transport = LockstepTransport(peers, parties=3)
    models = clients(path, peers, transport, 3, spec)
    vocab = local.config.vocab_size
    pad = local.config.pad_token_id if local.config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (1, 10), generator=g) for _ in range(2)]
    prompts.append(torch.randint(3, vocab, (2, 10), generator=g))  # a batch of 2 in one session: merges by rows
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)

    got = run_together([lambda m=m, p=p: m.generate(p, **gen) for m, p in zip(models, prompts)])
    for p, out in zip(prompts, got):
        assert torch.equal(out, local.generate(p, **gen))
    merged = [p.handler.runner.merged_steps for p in peers]
    assert max(transport.batch_sizes) == 3  # the three sessions' steps did reach the peers together
    if name in NOT_MERGED:
        assert merged == [0, 0, 0]  # they ran one by one (the documented fallback), exactly
        return
    # 1 prefill (equal prompt lengths) + 11 decode steps per peer, each with all three sessions (4 rows)
    assert merged == [12, 12, 12], f"steps were not merged: {merged} (batches {transport.batch_sizes})"
    assert all(p.handler.runner.merged_rows == 12 * 4 for p in peers)


def test_sessions_that_cannot_merge_still_match(tmp_path):
    """A left-padded batch next to an unpadded session, and sessions at different positions: run apart, exactly."""
    spec = TINY_MODELS["llama"]
    path = save_tiny("llama", tmp_path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peers = start_local_peers(path, RANGES)
    transport = LockstepTransport(peers, parties=3, patience_s=0.2)
    models = clients(path, peers, transport, 3, spec)
    g = torch.Generator().manual_seed(3)
    padded = torch.randint(3, 128, (2, 10), generator=g)
    mask = torch.ones_like(padded)
    padded[0, :4], mask[0, :4] = 0, 0
    short, other = torch.randint(3, 128, (1, 7), generator=g), torch.randint(3, 128, (1, 10), generator=g)
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    jobs = [
        lambda: models[0].generate(padded, attention_mask=mask, **gen),
        lambda: models[1].generate(short, **gen),
        lambda: models[2].generate(other, **gen),
    ]
    got = run_together(jobs)
    assert torch.equal(got[0], local.generate(padded, attention_mask=mask, **gen))
    assert torch.equal(got[1], local.generate(short, **gen))
    assert torch.equal(got[2], local.generate(other, **gen))
    assert max(transport.batch_sizes) == 3  # they did reach the peers together
    assert [p.handler.runner.merged_steps for p in peers] == [0, 0, 0]  # but never ran as one batch
