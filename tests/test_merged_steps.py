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
# Sessions at different positions merge padded where a peer's cache layers are all plain DynamicLayers and
# its layers take their mask as `attention_mask` (peer/merge.py); elsewhere such steps run one by one.
# Merged decode steps per peer (0:2, 2:5, 5:6) where not all 11: sliding-window layers (Qwen2's after
# `max_window_layers`, Gemma 2/3's every other layer) never pad; BLOOM's ALiBi never merges. (GPT-2 passes
# its mask by position: found by its blocks' signature.)
PADDED_EXCEPT = {"qwen2-sliding": [11, 0, 0], "gemma2": [0, 0, 11], "gemma3": [0, 0, 11], "bloom": [0, 0, 0]}


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


def generate_together(name: str, tmp_path, shapes: list[tuple[int, int]], seed: int):
    """Three clients generate greedily at once through 3 lock-step in-process peers, one prompt of each
    (rows, tokens) shape; every client's tokens must equal the unsplit model's. Returns the peers and the
    transport, for their counters."""
    spec = TINY_MODELS[name]
    path = save_tiny(name, tmp_path)
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    peers = start_local_peers(path, RANGES, attn_implementation=spec.attn_implementation)
    transport = LockstepTransport(peers, parties=3)
    models = clients(path, peers, transport, 3, spec)
    vocab = local.config.vocab_size
    pad = local.config.pad_token_id if local.config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, shape, generator=g) for shape in shapes]
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)

    got = run_together([lambda m=m, p=p: m.generate(p, **gen) for m, p in zip(models, prompts)])
    for p, out in zip(prompts, got):
        assert torch.equal(out, local.generate(p, **gen))
    assert max(transport.batch_sizes) == 3  # the three sessions' steps did reach the peers together
    return peers, transport


@pytest.mark.parametrize("name", CAUSAL)
def test_merged_decode_steps_match_local(name, tmp_path):
    # two sessions of one row and a batch of 2 in one session (merges by rows), all at the same position
    peers, transport = generate_together(name, tmp_path, [(1, 10), (1, 10), (2, 10)], seed=7)
    merged = [p.handler.runner.merged_steps for p in peers]
    if name in NOT_MERGED:
        assert merged == [0, 0, 0]  # they ran one by one (the documented fallback), exactly
        return
    # 1 prefill (equal prompt lengths) + 11 decode steps per peer, each with all three sessions (4 rows)
    assert merged == [12, 12, 12], f"steps were not merged: {merged} (batches {transport.batch_sizes})"
    # every decode step found the caches as the step before had stacked them and used them in place (no copy);
    # not where the peer's first layer keeps a sliding window (the peers that cannot pad either)
    in_place = [p.handler.runner.merged_in_place for p in peers]
    assert in_place == [11 if m else 0 for m in PADDED_EXCEPT.get(name, [11, 11, 11])], in_place
    assert all(p.handler.runner.merged_rows == 12 * 4 for p in peers)


@pytest.mark.parametrize("name", CAUSAL)
def test_sessions_at_different_positions_match_local(name, tmp_path):
    """Prompts of 7, 10 and 13 tokens: the decode steps meet at different positions on every peer."""
    peers, transport = generate_together(name, tmp_path, [(1, 7), (1, 10), (1, 13)], seed=11)
    merged = [p.handler.runner.merged_steps for p in peers]
    # 11 decode steps per peer, each with all three sessions padded to the longest (prefills never pad)
    assert merged == PADDED_EXCEPT.get(name, [11, 11, 11]), f"merged steps {merged} (batches {transport.batch_sizes})"
    # padded too, each step after the first merged one used the caches in place (the padding stays in front)
    assert [p.handler.runner.merged_in_place for p in peers] == [max(m - 1, 0) for m in merged]


def test_sessions_that_cannot_merge_still_match(tmp_path):
    """A left-padded batch next to unpadded sessions at two other positions: the padded batch runs apart
    (its mask is a tensor, theirs none), the other two merge padded; all exactly."""
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
    runners = [p.handler.runner for p in peers]
    # 9 decode steps of the two unpadded sessions, merged; the padded batch's 2 rows never joined them
    assert [r.merged_steps for r in runners] == [9, 9, 9] and [r.merged_rows for r in runners] == [18, 18, 18]
    assert [r.merged_max_rows for r in runners] == [2, 2, 2]


def _cache(length: int, rows: int = 1, seed: int = 0):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g), layer)
    return cache


def test_padded_caches_round_trip_and_hide_nothing_real():
    from peer.merge import merge_caches, split_caches

    caches, rows, lengths = [_cache(3, seed=1), _cache(5, rows=2, seed=2)], [1, 2], [3, 5]
    before = [[(l.keys.clone(), l.values.clone()) for l in c.layers] for c in caches]
    merged = merge_caches(caches, range(2), rows, lengths)
    assert merged.layers[0].keys.shape == (3, 2, 5, 4)
    assert not merged.layers[0].keys[0, :, :2].any()  # the shorter session's padding: zeros in front
    assert torch.equal(merged.layers[0].keys[0, :, 2:], before[0][0][0][0])
    new = torch.randn(3, 2, 1, 4)
    for i in range(2):  # what a forward does: one new column for every row
        merged.update(new, new, i)
    split_caches(merged, caches, range(2), rows, lengths)
    for c, b, r, n in zip(caches, before, rows, lengths):
        for layer, (k, v) in zip(c.layers, b):
            assert layer.keys.shape == (r, 2, n + 1, 4)
            assert torch.equal(layer.keys[:, :, :n], k) and torch.equal(layer.values[:, :, :n], v)
    assert torch.equal(caches[0].layers[1].keys[:, :, -1:], new[:1])
    assert torch.equal(caches[1].layers[1].keys[:, :, -1:], new[1:])


@pytest.mark.parametrize("lengths", [[3, 5, 4], [4, 4, 4]], ids=["padded", "equal"])
def test_the_same_sessions_merged_again_reuse_the_merged_tensors(lengths):
    from peer.merge import merge_caches, split_caches

    rows = [1, 2, 1]
    caches = [_cache(n, rows=r, seed=k) for k, (n, r) in enumerate(zip(lengths, rows))]
    padded = lengths if len(set(lengths)) > 1 else None
    merged = merge_caches(caches, range(2), rows, padded)
    for step in range(3):
        new = torch.randn(4, 2, 1, 4, generator=torch.Generator().manual_seed(step))
        for i in range(2):
            merged.update(new, new + 1, i)
        split_caches(merged, caches, range(2), rows, padded)
        lengths = [n + 1 for n in lengths]
        padded = lengths if padded else None
        fresh = merge_caches([_copy(c) for c in caches], range(2), rows, padded)  # copied: nothing to reuse
        again = merge_caches(caches, range(2), rows, padded)
        for i in range(2):
            for name in ("keys", "values"):
                reused, built = getattr(again.layers[i], name), getattr(fresh.layers[i], name)
                assert same(reused, getattr(merged.layers[i], name))  # the last step's tensor itself, no copy
                assert torch.equal(reused, built)  # and what copying the sessions together gives
        merged = again

    # one session changed on its own (cropped, a lone step), or a group of other sessions: copied again
    split_caches(merged, caches, range(2), rows, padded)
    assert not same(merge_caches(caches[1:], range(2), rows[1:], padded[1:] if padded else None).layers[0].keys,
                    merged.layers[0].keys)
    assert not same(merge_caches(caches[::-1], range(2), rows[::-1], padded[::-1] if padded else None).layers[0].keys,
                    merged.layers[0].keys)
    caches[0].crop(-1)  # drop its last token: a view of the merged tensor, no longer right-aligned
    assert same(caches[0].layers[0].keys, merged.layers[0].keys)
    lengths[0] -= 1
    redone = merge_caches(caches, range(2), rows, lengths)
    assert not same(redone.layers[0].keys, merged.layers[0].keys)
    assert torch.equal(redone.layers[0].keys[0, :, -lengths[0]:], caches[0].layers[0].keys[0])
    assert not redone.layers[0].keys[0, :, : max(lengths) - lengths[0]].any()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share their memory (one was not copied from the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _copy(cache):
    from transformers import DynamicCache

    out = DynamicCache()
    for layer in cache.layers:
        out.update(layer.keys.clone(), layer.values.clone(), len(out.layers))
    return out


def test_padding_that_would_outweigh_the_tokens_is_refused():
    from peer.merge import CannotMerge, merge_caches

    with pytest.raises(CannotMerge, match="padded tokens would outnumber"):
        merge_caches([_cache(2), _cache(2), _cache(30)], range(2), [1, 1, 1], [2, 2, 30])  # 56 padded, 34 real


def test_padded_masks_per_kind():
    from peer.merge import CannotMerge, padded_masks

    rows, lengths = [1, 2], [3, 5]
    built = padded_masks([None, None], rows, lengths, "sdpa")  # sdpa's "attend to all": a boolean mask
    assert built[0].tolist() == [[[[False, False, True, True, True, True]]]] and built[1].shape == (2, 1, 1, 6)
    assert built[1].all()
    floats = padded_masks([torch.zeros(1, 1, 1, 4), torch.zeros(2, 1, 1, 6)], rows, lengths, "eager")
    assert floats[0][0, 0, 0, :2].eq(torch.finfo(torch.float32).min).all() and not floats[0][0, 0, 0, 2:].any()
    with pytest.raises(CannotMerge, match="no mask to extend"):
        padded_masks([None, None], rows, lengths, "eager")
    with pytest.raises(CannotMerge, match="take no 'attention_mask'"):
        from peer.merge import _MISSING
        padded_masks([_MISSING, _MISSING], rows, lengths, "sdpa")
    with pytest.raises(CannotMerge, match="no padding for 'flash_attention_2'"):
        padded_masks([None, None], rows, lengths, "flash_attention_2")
    with pytest.raises(CannotMerge, match="not \\(rows, 1, 1, keys\\)"):
        padded_masks([torch.zeros(1, 1, 1, 9), torch.zeros(2, 1, 1, 6)], rows, lengths, "eager")


def test_the_mask_is_found_by_position_where_a_block_takes_it_so():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peer.merge import mask_position

    assert mask_position(GPT2Block) == 1  # block(hidden, past_key_values, attention_mask, ...)
    assert mask_position(LlamaDecoderLayer) == 0  # by keyword in practice; its signature allows position 0
    assert mask_position(torch.nn.Linear) is None
