"""Small models built from configs with fixed seeds and saved with safetensors (no hub access).

Each entry gives a config factory and whether the model is a causal LM (generate) or an encoder.
Sizes are tiny but keep the structure that matters: grouped-query attention, sliding windows,
soft-capping, tied embeddings, ALiBi, absolute positions, padding-aware encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

NUM_LAYERS = 6


@dataclass(frozen=True)
class TinyModel:
    name: str
    make_config: Callable[[], object]
    causal: bool  # a causal LM (generate works) or an encoder
    attn_implementation: str | None = None


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, sliding_window=None, pad_token_id=0,
    )


def _qwen2_sliding():
    from transformers import Qwen2Config

    # a window shorter than the test sequences, on the upper layers only: masks differ per layer
    return Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, use_sliding_window=True,
        sliding_window=8, max_window_layers=2, pad_token_id=0,
    )


def _qwen3():
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, sliding_window=8,
        pad_token_id=0,
    )


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=NUM_LAYERS, n_head=4, vocab_size=128, n_positions=256, pad_token_id=0)


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(hidden_size=64, n_layer=NUM_LAYERS, n_head=4, vocab_size=128, pad_token_id=0)


def _bert():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _opt():
    from transformers import OPTConfig

    return OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1,
    )


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _falcon():
    from transformers import FalconConfig

    return FalconConfig(hidden_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, vocab_size=128, pad_token_id=0)


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _gemma3():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, sliding_window=8,
        pad_token_id=0,
    )


def _mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, num_local_experts=4,
        num_experts_per_tok=2, pad_token_id=0,
    )


def _starcoder2():
    from transformers import Starcoder2Config

    return Starcoder2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _olmo2():
    from transformers import Olmo2Config

    return Olmo2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
    )


def _roberta():
    from transformers import RobertaConfig

    return RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=256, pad_token_id=1,
    )


def _distilbert():
    from transformers import DistilBertConfig

    return DistilBertConfig(dim=64, hidden_dim=128, n_layers=NUM_LAYERS, n_heads=4, vocab_size=128, pad_token_id=0)


TINY_MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in [
        TinyModel("llama", _llama, causal=True),
        TinyModel("mistral", _mistral, causal=True),
        TinyModel("qwen2-sliding", _qwen2_sliding, causal=True),
        TinyModel("qwen3", _qwen3, causal=True),
        TinyModel("gemma2", _gemma2, causal=True, attn_implementation="eager"),
        TinyModel("gpt2", _gpt2, causal=True),
        TinyModel("bloom", _bloom, causal=True),
        TinyModel("bert", _bert, causal=False),
        TinyModel("opt", _opt, causal=True),
        TinyModel("gpt-neox", _gpt_neox, causal=True),
        TinyModel("phi3", _phi3, causal=True),
        TinyModel("falcon", _falcon, causal=True),
        TinyModel("gemma", _gemma, causal=True),
        TinyModel("gemma3", _gemma3, causal=True, attn_implementation="eager"),
        TinyModel("mixtral", _mixtral, causal=True),
        TinyModel("starcoder2", _starcoder2, causal=True),
        TinyModel("olmo2", _olmo2, causal=True),
        TinyModel("roberta", _roberta, causal=False),
        TinyModel("distilbert", _distilbert, causal=False),
    ]
}


def save_tiny(name: str, directory: Path, seed: int = 0) -> Path:
    """Build model `name` with random weights from `seed` and save it (safetensors) under `directory`."""
    from transformers import AutoModel, AutoModelForCausalLM

    spec = TINY_MODELS[name]
    path = directory / name
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = spec.make_config()
    if spec.attn_implementation:
        config._attn_implementation = spec.attn_implementation
    auto = AutoModelForCausalLM if spec.causal else AutoModel
    model = auto.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_test_llama(directory: Path, num_layers: int) -> Path:
    """The small Llama the real-process tests serve (hidden 64, GQA 4/2 heads, vocab 128), seed 0, saved as
    `directory/llama{num_layers}`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    path = directory / f"llama{num_layers}"
    LlamaForCausalLM(config).save_pretrained(path)
    return path
