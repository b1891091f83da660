"""The client's length-only caches (`swarm.remote.advance_lengths`) against the same cache type updated the usual way.

The client never holds keys or values, only zero-byte meta tensors whose lengths drive the masks and positions that
transformers computes on the client. Its fast path writes plain `DynamicLayer`s' new shapes directly (first step
included), so this compares every layer's length and mask sizes with a cache fed real tensors through `update`, for
plain, sliding-window and mixed models, over a prefill and the decode steps after it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from swarm.remote import advance_lengths
from tests.tiny_models import TINY_MODELS

STEPS = [16, 1, 1, 3, 1]


@pytest.mark.parametrize("name", ["llama", "qwen2-sliding", "gemma2", "gemma3", "gpt2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_lengths_and_mask_sizes_match_a_real_cache(name, batch):
    config = TINY_MODELS[name].make_config()
    num_layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layer
    meta, real = DynamicCache(config=config), DynamicCache(config=config)
    for seq in STEPS:
        advance_lengths([(i, meta) for i in range(num_layers)], torch.empty(batch, seq, 8))
        for i in range(num_layers):
            kv = torch.randn(batch, 2, seq, 4)
            real.update(kv, kv, i)
        for i in range(num_layers):
            assert meta.layers[i].is_initialized
            assert type(meta.layers[i]) is type(real.layers[i])
            assert meta.get_seq_length(i) == real.get_seq_length(i), (name, seq, i)
            for query in (1, seq):
                assert meta.layers[i].get_mask_sizes(query) == real.layers[i].get_mask_sizes(query), (name, seq, i)
            assert meta.layers[i].keys.device.type == "meta" and meta.layers[i].keys.shape[0] == batch
