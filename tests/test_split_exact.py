"""The split model equals the unsplit one, bit for bit in float32, for many architectures.

Each model is split over 3 in-process peers with uneven ranges; every call crosses the wire codec
and the peer's validation. Compared against the same checkpoint loaded whole, in one process.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from peer.inprocess import start_local_peers
from swarm.chain import unlinked
from swarm.local import LocalTransport, local_router
from swarm.protocol import StepRequest
from swarm.model import load_client_model
from swarm.remote import UnsupportedOutputError
from swarm.wire import decode_message
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


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_per_block_outputs_are_refused_not_returned_empty(name, model_dir):
    """transformers collects hidden states and attentions with hooks on the block classes; the blocks run on
    the peers, so a split model would return those outputs empty. It says so instead, before any peer is
    called, and the next ordinary call works."""
    local, split, peers = load_pair(name, model_dir)
    ids = torch.randint(3, local.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for flag in ("output_hidden_states", "output_attentions"):
            with pytest.raises(UnsupportedOutputError, match=f"{flag}=True: a split model does not return per-block"):
                split(ids, **{flag: True})
        split.config.output_hidden_states = True  # the config's default counts too
        with pytest.raises(UnsupportedOutputError, match="output_hidden_states=True"):
            split(ids)
        split.config.output_hidden_states = False
        if TINY_MODELS[name].causal:
            with pytest.raises(UnsupportedOutputError):
                split.generate(ids, max_new_tokens=2, output_hidden_states=True, return_dict_in_generate=True)
            want, got = local(ids).logits, split(ids, output_hidden_states=False).logits
        else:
            want, got = local(ids).last_hidden_state, split(ids, output_attentions=False).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert open_sessions(peers) == 0


def test_layers_with_the_same_arguments_send_them_once(model_dir):
    """Every Llama layer gets the same rotary tables, positions, mask and cache: each hop's request carries
    one argument set for all its layers (the stubs give every layer the same cache reference)."""
    path = save_tiny("llama", model_dir)
    peers = start_local_peers(path, RANGES)
    sent: list[bytes] = []

    class Recording(LocalTransport):
        def step(self, peer_id, request, timeout=None):
            sent.append(request)
            return super().step(peer_id, request, timeout)

        def push(self, first, request, last, collect, timeout):
            sent.append(request)
            return super().push(first, request, last, collect, timeout)

    split = load_client_model(
        path, lambda layout, config: local_router(peers, layout.num_blocks, seed=0, transport=Recording(peers)),
        auto_class=AutoModelForCausalLM, dtype=torch.float32,
    )
    split.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    requests = [StepRequest.from_wire(decode_message(data)) for data in sent]  # pushed: one per step, the hops after
    hops = [hop for r in requests for hop in [r] + [nested for _, nested in unlinked(r)]]  # ...it nested in `next`
    assert len(requests) == 3 and sorted({(h.start, h.end) for h in hops}) == RANGES
    for hop in hops:
        assert len(hop.calls) == 1 and hop.layer_calls == [0] * (hop.end - hop.start)


def test_vision_transformer_matches_local(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        image_size=32, patch_size=8,
    )
    ViTModel(config).save_pretrained(tmp_path / "vit")
    local = ViTModel.from_pretrained(tmp_path / "vit").eval()
    peers = start_local_peers(tmp_path / "vit", RANGES)
    split = load_client_model(tmp_path / "vit", lambda layout, cfg: local_router(peers, layout.num_blocks))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(split(pixel_values=pixels).pooler_output, local(pixel_values=pixels).pooler_output)


def test_cache_crop_and_sampling_are_forwarded(model_dir):
    """Prompt-lookup decoding crops the cache after rejected drafts; seeded sampling must match too."""
    local, split, peers = load_pair("llama", model_dir)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])  # repetitive, so drafts get proposed and some rejected
    lookup = dict(max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3, pad_token_id=0)
    applied = []
    for peer in peers:  # a spy that still runs the real operation
        runner, real = peer.handler.runner, peer.handler.runner._apply_op
        runner._apply_op = lambda cache, name, arg, real=real: (applied.append(name), real(cache, name, arg))
    assert torch.equal(split.generate(prompt, **lookup), local.generate(prompt, **lookup))
    assert "crop" in applied, "prompt-lookup decoding should have cropped the peers' caches"

    sample = dict(max_new_tokens=16, do_sample=True, top_k=20, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(123)
    want = local.generate(prompt, **sample)
    torch.manual_seed(123)
    got = split.generate(prompt, **sample)
    assert torch.equal(got, want)


def test_client_holds_no_block_weights_and_peers_only_theirs(model_dir):
    local, split, peers = load_pair("llama", model_dir)
    block_params = sum(p.numel() for p in local.model.layers.parameters())
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in local.parameters()) - block_params
    for peer, (start, end) in zip(peers, RANGES):
        held = sum(p.numel() for p in peer.handler.runner.loaded.blocks.parameters())
        assert held == sum(p.numel() for p in local.model.layers[start:end].parameters())


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_pipelined_microbatches_match_local(name, model_dir):
    """A stateless batch cut into micro-batches in flight together gives the unsplit model's output."""
    spec = TINY_MODELS[name]
    path = save_tiny(name, model_dir)
    auto = AutoModelForCausalLM if spec.causal else AutoModel
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    local = auto.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    peers = start_local_peers(path, RANGES, attn_implementation=spec.attn_implementation)
    routers = []

    def make_router(layout, config):
        routers.append(local_router(peers, layout.num_blocks, seed=0, microbatches=2))
        return routers[-1]

    split = load_client_model(path, make_router, auto_class=auto, dtype=torch.float32,
                              attn_implementation=spec.attn_implementation)
    ids, mask = padded_batch(local.config.vocab_size, local.config.pad_token_id or 0)
    ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])  # 4 rows, padding in 2 of them
    with torch.no_grad():
        out_local, out_split = local(input_ids=ids, attention_mask=mask, use_cache=False), split(
            input_ids=ids, attention_mask=mask, use_cache=False)
    field = "logits" if spec.causal else "last_hidden_state"
    torch.testing.assert_close(getattr(out_split, field), getattr(out_local, field), rtol=1e-5, atol=1e-5)
    assert routers[0]._pool is not None, "the batch should have been cut into micro-batches"


def test_generate_closes_its_sessions_without_waiting_for_the_garbage_collector(model_dir):
    """A `generate` call's cache is freed when the call returns, and its peers' sessions close then (a
    reference cycle once left every session open until the collector's next full pass: peers filled up)."""
    import gc

    local, split, peers = load_pair("llama", model_dir)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    gc.disable()
    try:
        for _ in range(3):
            split.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert open_sessions(peers) == 0
        split.generate(prompt, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
        assert open_sessions(peers) == 0
    finally:
        gc.enable()
