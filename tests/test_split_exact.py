"""The split model equals the unsplit one, bit for bit in float32, for many architectures.

Each model is split over 3 in-process peers with uneven ranges; every call crosses the wire codec
and the peer's validation. Compared against the same checkpoint loaded whole, in one process.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from peer.inprocess import start_local_peers
from swarm.local import local_router
from swarm.model import load_client_model
from tests.tiny_models import NUM_LAYERS, TINY_MODELS, save_tiny

RANGES = [(0, 1), (1, 4), (4, NUM_LAYERS)]  # uneven on purpose
CAUSAL = [name for name, m in TINY_MODELS.items() if m.causal]
ENCODERS = [name for name, m in TINY_MODELS.items() if not m.causal]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def load_pair(name: str, directory):
    spec = TINY_MODELS[name]
    path = save_tiny(name, directory)
    auto = AutoModelForCausalLM if spec.causal else AutoModel
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    local = auto.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    peers = start_local_peers(path, RANGES, attn_implementation=spec.attn_implementation)
    split = load_client_model(
        path,
        lambda layout, config: local_router(peers, layout.num_blocks, seed=0),
        auto_class=auto,
        dtype=torch.float32,
        attn_implementation=spec.attn_implementation,
    )
    return local, split, peers


def padded_batch(vocab: int, pad: int):
    """A left-padded batch of 2: row 0 is 3 tokens shorter than row 1."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3] = pad
    mask[0, :3] = 0
    return ids, mask


def open_sessions(peers) -> int:
    return sum(p.handler.runner.num_sessions for p in peers)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_matches_local(name, model_dir):
    local, split, peers = load_pair(name, model_dir)
    vocab = local.config.vocab_size
    pad = local.config.pad_token_id if local.config.pad_token_id is not None else 0
    ids, mask = padded_batch(vocab, pad)

    with torch.no_grad():
        want = local(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = split(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=pad)
    one = ids[1:2]
    assert torch.equal(split.generate(one, **gen), local.generate(one, **gen))
    assert torch.equal(
        split.generate(ids, attention_mask=mask, **gen), local.generate(ids, attention_mask=mask, **gen)
    )
    beams = dict(max_new_tokens=12, num_beams=4, do_sample=False, pad_token_id=pad)
    assert torch.equal(split.generate(one, **beams), local.generate(one, **beams))

    import gc

    gc.collect()
    assert open_sessions(peers) == 0, "sessions must be closed when their cache is garbage-collected"


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_matches_local(name, model_dir):
    local, split, _ = load_pair(name, model_dir)
    ids, mask = padded_batch(local.config.vocab_size, local.config.pad_token_id or 0)
    with torch.no_grad():
        want = local(input_ids=ids, attention_mask=mask).last_hidden_state
        got = split(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
