"""Splitting one stateless step into micro-batches, so several can be in flight along a route.

Rows of a batch are independent in every transformer block, so a batch can be cut along its first
dimension. The hidden state's first dimension is the batch; each recorded argument of 2 or more
dimensions is cut the same way when its first dimension is the batch (masks, rotary tables per row),
kept whole when it is 1 (broadcast), and cut in equal blocks when it is a multiple of the batch laid
out batch-major (e.g. BLOOM's ALiBi bias, ``batch x heads`` rows); 1-D tensors (cache positions) are
per token, not per row, and stay whole. Anything else makes the step unsplittable, and it runs whole.
The exactness tests run every tested architecture through this path.
"""

from __future__ import annotations

from typing import Any

import torch


def microbatch_bounds(batch: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges of near-equal size covering ``[0, batch)`` (fewer if batch < parts)."""
    parts = max(1, min(parts, batch))
    edges = [round(i * batch / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _can_split(value: Any, batch: int) -> bool:
    if isinstance(value, torch.Tensor):
        if value.ndim < 2:  # scalars and 1-D tensors (e.g. cache positions, one per token) are not per row
            return True
        n = value.shape[0]
        return n == 1 or n % batch == 0
    if isinstance(value, (tuple, list)):
        return all(_can_split(v, batch) for v in value)
    if isinstance(value, dict):
        return all(_can_split(v, batch) for v in value.values())
    return True


def splittable(hidden: torch.Tensor, layer_calls: list[tuple[tuple, dict]]) -> bool:
    """Whether every argument of every layer can be cut along the batch of `hidden`."""
    batch = hidden.shape[0]
    if hidden.ndim < 2 or batch < 2:
        return False
    return all(_can_split(args, batch) and _can_split(kwargs, batch) for args, kwargs in layer_calls)


def _cut(value: Any, batch: int, start: int, end: int, memo: dict) -> Any:
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key in memo:  # keep shared tensors shared, so the wire still sends them once
            return memo[key]
        if value.ndim < 2 or value.shape[0] == 1:
            out = value
        else:
            per_row = value.shape[0] // batch
            out = value[start * per_row : end * per_row]
        memo[key] = out
        return out
    if isinstance(value, tuple):
        return tuple(_cut(v, batch, start, end, memo) for v in value)
    if isinstance(value, list):
        return [_cut(v, batch, start, end, memo) for v in value]
    if isinstance(value, dict):
        return {k: _cut(v, batch, start, end, memo) for k, v in value.items()}
    return value


def cut(hidden: torch.Tensor, layer_calls: list[tuple[tuple, dict]], start: int, end: int):
    """Rows ``[start, end)`` of the hidden state and of every layer's arguments.

    Layers that shared argument objects still share them after the cut (routers deduplicate by identity).
    """
    batch = hidden.shape[0]
    memo: dict = {}
    calls = [(_cut(args, batch, start, end, memo), _cut(kwargs, batch, start, end, memo)) for args, kwargs in layer_calls]
    return hidden[start:end], calls


def auto_parts(batch: int, hops: int, tokens_per_row: int, min_tokens: int = 64) -> int:
    """How many micro-batches to use: 4 per hop (with m parts over k stages the pipeline is busy
    m / (m + k - 1) of the time: 80% for 4 parts per hop on 2 hops), but none smaller than
    `min_tokens` tokens, where per-message overhead would outweigh the overlap."""
    if hops < 2 or batch < 2:
        return 1
    by_size = max(1, (batch * tokens_per_row) // max(1, min_tokens))
    return max(1, min(batch, 4 * hops, by_size))
