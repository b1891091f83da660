"""How many blocks fit on this peer: sized on the meta skeleton, before any weight is loaded.

capacity = (free memory - activation reserve) // (block bytes at the peer's dtype + KV bytes for the
cache budget), as DESIGN.md §4 sets out. Errors carry the numbers and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.splitting import block_bytes, build_skeleton, find_block_layout, get_submodule, resolve_class

GIB = 2**30


class InsufficientMemory(RuntimeError):
    """Not even one block (or not the requested range) fits in this peer's memory."""


@dataclass(frozen=True)
class BlockFootprint:
    """Memory one block takes on a peer, at the peer's dtype."""

    weight_bytes: int  # parameters and persistent buffers of one block
    kv_bytes_per_token: int  # keys + values one token adds to one block's cache
    num_blocks: int  # blocks in the model

    def per_block(self, cache_tokens: int) -> int:
        return self.weight_bytes + self.kv_bytes_per_token * cache_tokens


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys + values one token adds to one attention block's cache, from the config's usual fields."""
    text = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def block_footprint(config, dtype: torch.dtype) -> BlockFootprint:
    """Measured on the model skeleton on the meta device: no memory, no weights read."""
    skeleton = build_skeleton(resolve_class(config), config)
    layout = find_block_layout(skeleton)
    blocks = get_submodule(skeleton, layout.path)
    weight = max(block_bytes(b, dtype) for b in blocks)  # blocks can differ slightly (e.g. MoE layers)
    return BlockFootprint(weight, kv_bytes_per_token(config, dtype), layout.num_blocks)


def capacity_blocks(free_bytes: int, footprint: BlockFootprint, cache_tokens: int, activation_reserve: int) -> int:
    usable = free_bytes - activation_reserve
    if usable <= 0:
        return 0
    return min(footprint.num_blocks, usable // footprint.per_block(cache_tokens))


def shortage_message(
    blocks: int, free_bytes: int, footprint: BlockFootprint, cache_tokens: int, activation_reserve: int, dtype: str
) -> str:
    need = blocks * footprint.per_block(cache_tokens) + activation_reserve
    return (
        f"needs {need / GIB:.2f} GiB for {blocks} block{'s' * (blocks != 1)} at {dtype} "
        f"({blocks * footprint.weight_bytes / GIB:.2f} GiB weights + "
        f"{blocks * footprint.kv_bytes_per_token * cache_tokens / GIB:.2f} GiB KV cache for {cache_tokens} tokens + "
        f"{activation_reserve / GIB:.2f} GiB activation reserve), {free_bytes / GIB:.2f} GiB free. "
        "Serve fewer blocks, use a smaller --dtype, lower --cache-tokens, or free memory"
    )
