"""Merging decode steps of several sessions into one batch through the blocks, and splitting it back.

A decode step of one session multiplies a single row by every weight matrix of the peer's blocks; on
a CPU or a GPU that is bound by reading the weights, so eight sessions' rows cost little more than
one. Steps that queue up at a peer together are therefore run as one batch when they fit together.

Model-agnostic rules (no per-architecture code), decided in docs/decisions.md:

- Steps merge only when they run the same blocks with the same layer-call layout, have hidden states
  of the same trailing shape and dtype, and their sessions' caches hold the same number of tokens.
  (Sessions at different positions would need padded caches and rebuilt masks, which depend on the
  attention implementation: not done.)
- Each layer argument merges value by value: a tensor of 2+ dims whose first dim is every step's own
  batch is concatenated (hidden-state-like, masks, position ids, rotary tables); any other value must
  be equal in all steps and is passed once (e.g. ``cache_position``, flags). Anything else: no merge.
- Cache layers merge attribute by attribute with the same rule, into a temporary cache of the same
  class; after the forward each session's layers get their rows back (and the shared attributes, such
  as a sliding window's token count). Sessions' own caches are only written after the whole merged
  forward succeeded, so a failure can fall back to running the steps one by one.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from swarm.wire import CacheRef


class CannotMerge(Exception):
    """These steps cannot run as one batch (they still run, one by one)."""


def merge_value(values: Sequence[Any], rows: Sequence[int]) -> Any:
    """One argument for the merged batch from each step's own (`rows[i]`: step i's batch size)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return _merge_tensor(values, rows, min_ndim=2)
    if isinstance(first, CacheRef):
        if not all(isinstance(v, CacheRef) for v in values):
            raise CannotMerge("a cache argument is not a cache in every step")
        return first
    if isinstance(first, (tuple, list)):
        if not all(type(v) is type(first) and len(v) == len(first) for v in values):
            raise CannotMerge("sequences of different types or lengths")
        merged = [merge_value([v[i] for v in values], rows) for i in range(len(first))]
        return type(first)(merged)
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise CannotMerge("maps with different keys")
        return {k: merge_value([v[k] for v in values], rows) for k in first}
    if not all(type(v) is type(first) and v == first for v in values[1:]):
        raise CannotMerge(f"argument {first!r:.40} differs between steps")
    return first


def signature(value: Any) -> Any:
    """The structure of a step's arguments (kinds, tensor ranks, dtypes and trailing shapes): steps
    merge only within one signature, so a step with a padding mask never spoils a group without one."""
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, tuple(value.shape[1:]) if value.ndim >= 2 else tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *map(signature, value))
    if isinstance(value, dict):
        return ("D", *((k, signature(v)) for k, v in value.items()))
    return type(value).__name__


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def merge_calls(calls_per_step: Sequence[list[tuple[tuple, dict]]], rows: Sequence[int]) -> list[tuple[tuple, dict]]:
    """The merged (args, kwargs) rows of steps that share one layer-call layout."""
    n = len(calls_per_step[0])
    if any(len(c) != n for c in calls_per_step):
        raise CannotMerge("steps have different numbers of distinct layer calls")
    merged = []
    for i in range(n):
        args = merge_value([tuple(c[i][0]) for c in calls_per_step], rows)
        kwargs = merge_value([c[i][1] for c in calls_per_step], rows)
        merged.append((tuple(args), kwargs))
    return merged


def merge_caches(caches: Sequence[Any], layers: range, rows: Sequence[int]) -> Any:
    """A temporary cache holding every session's rows of `layers`, stacked in the order given."""
    first = caches[0]
    if any(type(c) is not type(first) or len(c.layers) != len(first.layers) for c in caches):
        raise CannotMerge("sessions use different cache classes or layer counts")
    merged = copy.copy(first)
    merged.layers = list(first.layers)
    for i in layers:
        layer = copy.copy(first.layers[i])
        per_session = [c.layers[i] for c in caches]
        if any(type(l) is not type(layer) or vars(l).keys() != vars(layer).keys() for l in per_session):
            raise CannotMerge(f"cache layer {i} differs in kind between sessions")
        for name in vars(layer):
            vals = [getattr(l, name) for l in per_session]
            if isinstance(vals[0], torch.Tensor):
                setattr(layer, name, _merge_tensor(vals, rows, min_ndim=1))  # keys/values: (batch, heads, length, dim)
            elif not all(type(v) is type(vals[0]) and v == vals[0] for v in vals[1:]):
                raise CannotMerge(f"cache layer {i}: {name} differs between sessions")
        merged.layers[i] = layer
    return merged


def _merge_tensor(values: Sequence[Any], rows: Sequence[int], min_ndim: int) -> torch.Tensor:
    """Concatenate batch-major tensors (first dim = each step's rows, at least `min_ndim` dims); pass an
    equal one once; anything else cannot merge."""
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise CannotMerge("a tensor is not a tensor in every step")
    first = values[0]
    if first.ndim >= min_ndim and all(v.shape[0] == r for v, r in zip(values, rows)):
        if any(v.shape[1:] != first.shape[1:] or v.dtype != first.dtype for v in values):
            raise CannotMerge("batch-major tensors of different shapes (e.g. cache lengths) or dtypes")
        return torch.cat(list(values))
    if all(_same_tensor(first, v) for v in values[1:]):
        return first
    raise CannotMerge(f"a tensor of shape {tuple(first.shape)} differs between steps and is not batch-major")


def split_caches(merged: Any, caches: Sequence[Any], layers: range, rows: Sequence[int]) -> None:
    """Give each session its rows of the merged cache's `layers` back (and the shared attributes)."""
    total = sum(rows)
    offsets = [sum(rows[:k]) for k in range(len(rows))]
    for i in layers:
        source = merged.layers[i]
        for cache, offset, r in zip(caches, offsets, rows):
            target = cache.layers[i]
            for name, value in vars(source).items():
                if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == total and value.numel():
                    value = value[offset : offset + r]
                setattr(target, name, value)


def split_rows(hidden: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
    """Each step's rows of the merged output (contiguous copies: each reply is encoded on its own)."""
    return [part.contiguous() for part in torch.split(hidden, list(rows))]
