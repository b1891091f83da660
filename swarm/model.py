"""Builds the client-side model: real weights for everything but the blocks, stubs for the blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from swarm.remote import BlockCapture, RemoteBlock, Router, refuse_block_outputs
from swarm.splitting import (
    BlockLayout,
    build_skeleton,
    find_block_layout,
    get_submodule,
    load_config,
    load_partial,
    replace_blocks,
    resolve_class,
)


def load_client_model(
    model_name_or_path: str | Path,
    make_router: Callable[[BlockLayout, object], Router],
    *,
    auto_class=None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    mixin: type | None = None,
) -> nn.Module:
    """A transformers model whose blocks run wherever `make_router(layout, config)` sends them.

    `auto_class` picks the head (e.g. `AutoModelForCausalLM`); None uses the checkpoint's own
    architecture. Block weights are never read: the stubs hold no parameters, so transformers skips
    those checkpoint tensors.
    """
    config = load_config(model_name_or_path)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model_class = resolve_class(config, auto_class)
    skeleton = build_skeleton(model_class, config)
    layout = find_block_layout(skeleton)
    meta_block = get_submodule(skeleton, layout.path)[0]
    del skeleton
    router = make_router(layout, config)
    capture = BlockCapture(layout.num_blocks, router, config, meta_block_factory=lambda: meta_block)

    def stub_blocks(model: nn.Module) -> None:
        replace_blocks(model, layout, lambda i, _block: RemoteBlock(i, capture))

    model = load_partial(
        model_name_or_path,
        model_class,
        stub_blocks,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        mixin=mixin,
    )
    capture.config = model.config
    model.register_forward_pre_hook(refuse_block_outputs, with_kwargs=True)
    model.swarm_layout = layout
    model.swarm_capture = capture
    return model
