"""Loads blocks ``[start, end)`` of a model, and nothing else.

The model class is subclassed so that every block outside the range and every non-block module
(embeddings, heads, final norms) is a parameter-free placeholder; `from_pretrained` then reads only
the tensors of the kept blocks from the safetensors files (sharded or not) and applies
transformers' own key conversions and buffer initialisation. The whole model is never
materialised: the skeleton lives on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarm.splitting import (
    BlockLayout,
    Placeholder,
    SplittingError,
    build_skeleton,
    find_block_layout,
    get_submodule,
    load_config,
    load_partial,
    replace_blocks,
    resolve_class,
    strip_non_block_modules,
)


@dataclass
class LoadedBlocks:
    """Blocks ``[start, end)`` of one model, ready to run."""

    config: object  # the model's transformers config
    layout: BlockLayout  # where the blocks live in the full model
    start: int  # first block held (inclusive)
    end: int  # last block held (exclusive)
    blocks: nn.ModuleList  # blocks[start..end), index 0 is block `start`
    dtype: torch.dtype  # dtype of the weights
    device: torch.device  # where the weights live


def load_blocks(
    model_name_or_path: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedBlocks:
    """Load only blocks ``[start, end)`` of a model directory or hub id."""
    config = load_config(model_name_or_path)
    model_class = resolve_class(config)
    layout = find_block_layout(build_skeleton(model_class, config))
    if not 0 <= start < end <= layout.num_blocks:
        raise SplittingError(
            f"block range {start}:{end} is outside the model's {layout.num_blocks} blocks (valid: 0 <= start < end <= "
            f"{layout.num_blocks})"
        )

    def keep_only_range(model: nn.Module) -> None:
        replace_blocks(model, layout, lambda i, block: block if start <= i < end else Placeholder(f"block {i}"))
        strip_non_block_modules(model, layout)

    model = load_partial(
        model_name_or_path,
        model_class,
        keep_only_range,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    all_blocks = get_submodule(model, layout.path)
    blocks = nn.ModuleList([all_blocks[i] for i in range(start, end)]).to(device)
    blocks.eval()
    for p in blocks.parameters():
        p.requires_grad_(False)
    return LoadedBlocks(
        config=model.config,
        layout=layout,
        start=start,
        end=end,
        blocks=blocks,
        dtype=dtype,
        device=torch.device(device),
    )
