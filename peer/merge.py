"""Merging decode steps of several sessions into one batch through the blocks, and splitting it back.

A decode step of one session multiplies a single row by every weight matrix of the peer's blocks; on
a CPU or a GPU that is bound by reading the weights, so eight sessions' rows cost little more than
one. Steps that queue up at a peer together are therefore run as one batch when they fit together.

Model-agnostic rules (no per-architecture code), decided in docs/decisions.md:

- Steps merge only when they run the same blocks with the same layer-call layout and have hidden states
  of the same trailing shape and dtype. Their sessions' caches hold the same number of tokens, or the
  steps are one-token decode steps that can be padded (below).
- **Sessions at different positions** (`lengths`): each session's keys and values get zero columns in
  front up to the longest cache, and its attention mask hides them. Only where both are well defined
  for any model: plain `DynamicLayer` caches (a sliding window's layer counts its tokens, so it never
  pads), and a mask the layer takes as `attention_mask` (by keyword, or by position where its forward's
  signature names it there, as GPT-2's does): a 4-d boolean or additive float mask is extended with
  "masked" columns; none at all (sdpa's "attend to everything" at one query token) becomes a boolean
  mask, for sdpa only. Anything else cannot pad: those steps merge with the steps at their own position
  only. Rotary tables and position ids are each
  session's own and merge by rows; cached keys already carry their rotation.
- Each layer argument merges value by value: a tensor of 2+ dims whose first dim is every step's own
  batch is concatenated (hidden-state-like, masks, position ids, rotary tables); any other value must
  be equal in all steps and is passed once (e.g. ``cache_position``, flags). Anything else: no merge.
- Cache layers merge attribute by attribute with the same rule, into a temporary cache of the same
  class; after the forward each session's layers get their rows back (and the shared attributes, such
  as a sliding window's token count). Sessions' own caches are only written after the whole merged
  forward succeeded, so a failure can fall back to running the steps one by one.
- **The same sessions merged again** need no copy: after a merged step each session's keys and values
  are its rows of the step's merged tensors (views). When the next merge finds every session's tensor
  still exactly its rows of one such tensor (right-aligned, in this order, covering all of it), that
  tensor is the merged one already and is used as it is. Only for plain `DynamicLayer`s, whose update
  concatenates (never writes into the tensor it had). Copying the sessions' caches together is otherwise
  the one cost a merged step adds: 8 sessions' 500-token caches take ~16 ms per step for 6 medium layers.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicLayer

from swarm.wire import CacheRef


MASK_KWARG = "attention_mask"  # the keyword transformers' decoder layers take their mask by
PADDED_IMPLEMENTATIONS = ("sdpa", "eager")  # attention whose masks padding knows how to extend or build


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


def signature(value: Any, key: str | None = None) -> Any:
    """The structure of a step's arguments (kinds, tensor ranks, dtypes and trailing shapes): steps
    merge only within one signature, so a step with a padding mask never spoils a group without one.
    The mask's key length is left out: sessions at different positions may pad (`merge_calls`)."""
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape[1:]) if value.ndim >= 2 else tuple(value.shape)
        return ("T", value.dtype, shape[:-1] if key == MASK_KWARG and value.ndim == 4 else shape)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *map(signature, value))
    if isinstance(value, dict):
        return ("D", *((k, signature(v, k)) for k, v in value.items()))
    return type(value).__name__


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


def merge_calls(calls_per_step: Sequence[list[tuple[tuple, dict]]], rows: Sequence[int],
                lengths: Sequence[int] | None = None, attn_implementation: str | None = None,
                mask_index: int | None = None) -> list[tuple[tuple, dict]]:
    """The merged (args, kwargs) rows of steps that share one layer-call layout. `lengths`: each session's
    cache length where they differ (one-token decode steps, padded in front up to the longest; None: all
    equal); the mask is the `attention_mask` keyword, or positional argument `mask_index` (`mask_position`)."""
    n = len(calls_per_step[0])
    if any(len(c) != n for c in calls_per_step):
        raise CannotMerge("steps have different numbers of distinct layer calls")
    merged = []
    for i in range(n):
        args_per_step = [tuple(c[i][0]) for c in calls_per_step]
        kwargs_per_step = [c[i][1] for c in calls_per_step]
        if lengths is not None:
            by_position = mask_index is not None and all(
                MASK_KWARG not in kw and len(a) > mask_index for a, kw in zip(args_per_step, kwargs_per_step))
            found = ([a[mask_index] for a in args_per_step] if by_position  # type: ignore[index]
                     else [kw.get(MASK_KWARG, _MISSING) for kw in kwargs_per_step])
            masks = padded_masks(found, rows, lengths, attn_implementation)
            if by_position:
                args_per_step = [a[:mask_index] + (m,) + a[mask_index + 1 :] for a, m in zip(args_per_step, masks)]  # type: ignore[operator]
            else:
                kwargs_per_step = [{**kw, MASK_KWARG: m} for kw, m in zip(kwargs_per_step, masks)]
        args = merge_value(args_per_step, rows)
        kwargs = merge_value(kwargs_per_step, rows)
        merged.append((tuple(args), kwargs))
    return merged


@functools.lru_cache(maxsize=64)
def mask_position(block_class: type) -> int | None:
    """Where `block(hidden, *args)` takes `attention_mask` among `args`, from its class's forward signature
    (self, hidden, then args; None: not positionally). GPT-2's blocks are called with their mask by position."""
    try:
        names = list(inspect.signature(block_class.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        return None
    return names.index(MASK_KWARG) - 2 if MASK_KWARG in names[2:] else None


_MISSING = object()


def padded_masks(masks: Sequence[Any], rows: Sequence[int], lengths: Sequence[int],
                 attn_implementation: str | None) -> list[torch.Tensor]:
    """Each one-token step's attention mask over the longest cache plus its token, hiding its padding."""
    if attn_implementation not in PADDED_IMPLEMENTATIONS:
        raise CannotMerge(f"sessions at different positions: no padding for {attn_implementation!r} attention")
    if any(m is _MISSING for m in masks):
        raise CannotMerge(f"sessions at different positions: the layers take no {MASK_KWARG!r} keyword to hide padding")
    keys = max(lengths) + 1
    if all(m is None for m in masks):
        if attn_implementation != "sdpa":
            raise CannotMerge("sessions at different positions: no mask to extend")
        out = []
        for r, n in zip(rows, lengths):
            mask = torch.ones(r, 1, 1, keys, dtype=torch.bool)
            mask[..., : keys - n - 1] = False
            out.append(mask)
        return out
    out = []
    for m, r, n in zip(masks, rows, lengths):
        if not isinstance(m, torch.Tensor) or m.ndim != 4 or m.shape[0] != r or m.shape[-2] != 1 or m.shape[-1] != n + 1:
            raise CannotMerge(f"sessions at different positions: a {MASK_KWARG} that is not (rows, 1, 1, keys)")
        if m.dtype == torch.bool:
            fill = False
        elif m.is_floating_point():
            fill = torch.finfo(m.dtype).min
        else:
            raise CannotMerge(f"sessions at different positions: a {m.dtype} mask")
        front = torch.full((*m.shape[:-1], keys - n - 1), fill, dtype=m.dtype, device=m.device)
        out.append(torch.cat([front, m], dim=-1))
    return out


def merge_caches(caches: Sequence[Any], layers: range, rows: Sequence[int], lengths: Sequence[int] | None = None) -> Any:
    """A temporary cache holding every session's rows of `layers`, stacked in the order given. `lengths`:
    each session's token count where they differ (None: all equal); its keys and values are then
    zero-padded in front."""
    first = caches[0]
    if any(type(c) is not type(first) or len(c.layers) != len(first.layers) for c in caches):
        raise CannotMerge("sessions use different cache classes or layer counts")
    if lengths is not None:
        _check_padding(caches, layers, rows, lengths)
    merged = copy.copy(first)
    merged.layers = list(first.layers)
    for i in layers:
        layer = copy.copy(first.layers[i])
        per_session = [c.layers[i] for c in caches]
        if any(type(l) is not type(layer) or vars(l).keys() != vars(layer).keys() for l in per_session):
            raise CannotMerge(f"cache layer {i} differs in kind between sessions")
        if lengths is not None:
            _pad_layer(layer, per_session, rows, lengths, i)
        for name in vars(layer):
            if lengths is not None and name in _PADDED:
                continue
            vals = [getattr(l, name) for l in per_session]
            stacked = _stacked(vals, rows) if name in _PADDED and type(layer) is DynamicLayer else None
            if stacked is not None:
                setattr(layer, name, stacked)
            elif isinstance(vals[0], torch.Tensor):
                setattr(layer, name, _merge_tensor(vals, rows, min_ndim=1))  # keys/values: (batch, heads, length, dim)
            elif not all(type(v) is type(vals[0]) and v == vals[0] for v in vals[1:]):
                raise CannotMerge(f"cache layer {i}: {name} differs between sessions")
        merged.layers[i] = layer
    return merged


_PADDED = ("keys", "values")  # a DynamicLayer's tensors: (batch, heads, tokens, head dim)


def _check_padding(caches: Sequence[Any], layers: range, rows: Sequence[int], lengths: Sequence[int]) -> None:
    """Refuse, before anything is copied, what padding does not cover or would not pay for."""
    for i in layers:
        kinds = {type(c.layers[i]) for c in caches}
        if kinds != {DynamicLayer}:
            raise CannotMerge(f"sessions at different positions: cache layer {i} is a "
                              f"{'/'.join(sorted(k.__name__ for k in kinds))}, not padded")
    longest = max(lengths)
    waste = sum(r * (longest - n) for r, n in zip(rows, lengths))
    if waste > sum(r * n for r, n in zip(rows, lengths)):  # more padding than tokens: the merge costs more than it saves
        raise CannotMerge(f"sessions at different positions: {waste} padded tokens would outnumber the cached ones")


def _pad_layer(layer, per_session: list, rows: Sequence[int], lengths: Sequence[int], i: int) -> None:
    """Set `layer`'s keys and values to every session's, stacked, each padded in front to the longest."""
    longest = max(lengths)
    offsets = [sum(rows[:k]) for k in range(len(rows))]
    for name in _PADDED:
        vals = [getattr(l, name) for l in per_session]
        if any(not isinstance(v, torch.Tensor) or v.ndim != 4 or v.shape[-2] != n for v, n in zip(vals, lengths)):
            raise CannotMerge(f"sessions at different positions: cache layer {i} holds other lengths than its sessions")
        if any(v.shape[1] != vals[0].shape[1] or v.shape[3] != vals[0].shape[3] or v.dtype != vals[0].dtype for v in vals):
            raise CannotMerge(f"cache layer {i}: {name} of different shapes or dtypes")
        out = _stacked(vals, rows)
        if out is None:
            out = vals[0].new_zeros(sum(rows), vals[0].shape[1], longest, vals[0].shape[3])
            for v, o, r, n in zip(vals, offsets, rows, lengths):
                out[o : o + r, :, longest - n :] = v
        setattr(layer, name, out)


def stacking_key(cache: Any, layer: int) -> tuple[int, int]:
    """Where a session's keys sit in the merged tensor of its last merged step (its storage and offset;
    (0, 0): no keys). A group sorted by it is stacked as it was then, so that `merge_caches` can use that
    tensor again (steps arrive in any order)."""
    keys = getattr(cache.layers[layer], "keys", None) if layer < len(cache.layers) else None
    if not isinstance(keys, torch.Tensor) or not keys.numel():
        return (0, 0)
    return (keys.untyped_storage().data_ptr(), keys.storage_offset())


def _stacked(values: Sequence[Any], rows: Sequence[int]) -> torch.Tensor | None:
    """The tensor a previous merged step left these (batch, heads, tokens, dim) keys or values in, if each is
    still exactly its rows of it, right-aligned (padding in front), in this order, covering all of it and
    padded to the longest only: it is then this merge's tensor already. None: anything else (copy them).

    Found by storage, not by `Tensor._base`: the peer computes in inference mode, whose views keep no base."""
    first = values[0]
    if not all(isinstance(v, torch.Tensor) and v.ndim == 4 and v.numel() for v in values):
        return None
    batch, heads, dim = sum(rows), first.shape[1], first.shape[3]
    tokens = max(v.shape[2] for v in values)
    shape, stride = (batch, heads, tokens, dim), (heads * tokens * dim, tokens * dim, dim, 1)
    storage = first.untyped_storage()
    if storage.nbytes() != batch * stride[0] * first.element_size():  # the merged tensor and nothing else
        return None
    offset = 0
    for v, r in zip(values, rows):
        n = v.shape[2]
        if (v.shape != (r, heads, n, dim) or v.stride() != stride or v.dtype != first.dtype
                or v.untyped_storage().data_ptr() != storage.data_ptr()
                or v.storage_offset() != offset * stride[0] + (tokens - n) * stride[2]):
            return None
        offset += r
    return torch.as_strided(first, shape, stride, 0)


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


def split_caches(merged: Any, caches: Sequence[Any], layers: range, rows: Sequence[int],
                 lengths: Sequence[int] | None = None) -> None:
    """Give each session its rows of the merged cache's `layers` back (and the shared attributes); with
    `lengths` (they differed), without the padding `merge_caches` put in front."""
    total = sum(rows)
    offsets = [sum(rows[:k]) for k in range(len(rows))]
    longest = max(lengths) if lengths is not None else 0
    for i in layers:
        source = merged.layers[i]
        for k, (cache, offset, r) in enumerate(zip(caches, offsets, rows)):
            target = cache.layers[i]
            for name, value in vars(source).items():
                if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == total and value.numel():
                    value = value[offset : offset + r]
                    if lengths is not None and name in _PADDED:
                        value = value[:, :, longest - lengths[k] :]
                setattr(target, name, value)


def split_rows(hidden: torch.Tensor, rows: Sequence[int]) -> list[torch.Tensor]:
    """Each step's rows of the merged output (contiguous copies: each reply is encoded on its own)."""
    return [part.contiguous() for part in torch.split(hidden, list(rows))]
