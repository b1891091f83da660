"""Client-side stand-ins for the blocks, and the sessions that tie a model's cache to peers.

The model's own forward runs unchanged on the client; only its block list is replaced by
`RemoteBlock` stubs. Each stub records the arguments the model passes to its layer (they can differ
per layer: sliding-window vs full masks, local vs global rotary). Stubs before the last return the
hidden state untouched; the last one sends the hidden state and every layer's arguments along a
route of peers and returns the result, in the block's own return format.

A transformers `Cache` found among the arguments is bound to a `ClientSession`: peers hold the real
keys and values, the client's cache only tracks lengths (it is advanced with zero-byte meta
tensors), so the model's own mask and position logic stays right. Cache operations that
`generate()` performs on it are queued and forwarded to the peers with the next step.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from swarm.protocol import CACHE_OPS
from swarm.routing import Hop
from swarm.wire import CacheRef

logger = logging.getLogger(__name__)


class SplitForwardError(RuntimeError):
    """The model's forward does not loop over its blocks the way splitting requires."""


class UnsupportedOutputError(SplitForwardError):
    """The caller asked for outputs a split model does not return (per-block hidden states, attentions)."""


# Outputs transformers collects from the blocks themselves (hooks on the block classes): the blocks run on
# the peers, so a split model would return them empty. Asking for one is refused up front instead.
BLOCK_OUTPUTS = ("output_hidden_states", "output_attentions")


def refuse_block_outputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """A forward pre-hook (with kwargs) for the client model: a clear error instead of empty outputs."""
    config = getattr(model, "config", None)
    for flag in BLOCK_OUTPUTS:
        value = kwargs.get(flag)
        if value is None:
            value = getattr(config, flag, False)
        if value:
            raise UnsupportedOutputError(
                f"{flag}={value!r}: a split model does not return per-block outputs (the blocks run on the peers, "
                "which send back only the last block's hidden state); see docs/splitting.md, Known limits"
            )


@dataclass
class ClientSession:
    """A KV-cache session on the peers of one route."""

    session_id: str
    cache_class: str | None  # class name of the client's cache object; peers build the same
    max_length: int | None = None  # tokens the session may reach, if the user said
    hops: list[Hop] | None = None  # chosen at the first step; the router replaces a hop whose peer fails
    pending_ops: list[tuple[str, Any]] = field(default_factory=list)  # forwarded with the next step
    opened_on: set[str] = field(default_factory=set)  # peers that hold this session already
    closed: bool = False


class Router(Protocol):
    """What the stubs need from the network (or from in-process peers in tests)."""

    def run(
        self,
        session: ClientSession | None,
        hidden: torch.Tensor,
        layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None,
    ) -> torch.Tensor: ...

    def close_session(self, session: ClientSession, wait: bool = True) -> None: ...


def bind_session(cache, router: Router, max_length: int | None = None) -> ClientSession:
    """Attach a session to a transformers cache object (once), wrapping its batch/beam operations.

    The wrappers apply each operation to the client's length-only cache as before and queue it for
    the peers. When the cache object is garbage-collected, the peers are told to close the session.
    """
    session = getattr(cache, "_swarm_session", None)
    if session is not None:
        return session
    session = ClientSession(session_id=uuid.uuid4().hex, cache_class=type(cache).__name__, max_length=max_length)
    for name in CACHE_OPS:
        original = getattr(type(cache), name, None)
        if original is None:
            continue
        # the wrapper holds the cache weakly: a cycle (cache -> wrapper -> cache) would leave the cache, and so
        # the session on the peers, to the garbage collector's next full pass instead of closing it when
        # `generate` drops the cache
        setattr(cache, name, _forwarding_op(name, original, weakref.ref(cache), session))
    cache._swarm_session = session
    weakref.finalize(cache, _close_quietly, router, session)
    return session


def _forwarding_op(name: str, original: Callable, cache_ref: weakref.ref, session: ClientSession) -> Callable:
    def op(*args):
        arg = args[0] if args else None
        if isinstance(arg, torch.Tensor):
            arg = arg.detach().to("cpu", copy=True)
        session.pending_ops.append((name, arg))
        return original(cache_ref(), *args)

    op.__name__ = name
    return op


def _close_quietly(router: Router, session: ClientSession) -> None:
    if session.closed or not session.opened_on:
        return
    try:
        router.close_session(session, wait=False)
    except Exception as exc:  # noqa: BLE001 - a finaliser must never raise; the peer's TTL cleans up anyway
        logger.debug("closing session %s failed: %s", session.session_id, exc)


def advance_lengths(caches: list[tuple[int, Any]], hidden: torch.Tensor) -> None:
    """Grow the client's caches by the step's tokens, layer by layer (`(layer, cache)` pairs), with meta tensors
    (zero bytes).

    The cache's own `update` keeps every layer type right (sliding windows crop, lengths accumulate).
    For the plain `DynamicLayer`, whose update is a concatenation, the result is written directly:
    concatenating meta tensors runs torch's Python reference implementation (~0.1 ms a call), which
    on the per-token path costs more than a whole small block. That holds for the first step too (the
    layer initialised as its `update` would, then given the step's length): 12 layers took 1.2 ms of a medium
    model's time to first token through `update`. Layers of one step whose new length is the same
    share one such tensor: it holds no data, and each is one torch op fewer. One call per step, not per layer:
    this runs on every token's path.
    """
    from transformers.cache_utils import DynamicLayer

    batch, seq = hidden.shape[0], hidden.shape[1] if hidden.ndim > 2 else 1
    made: dict[tuple, torch.Tensor] = {}
    for layer_idx, cache in caches:
        layers = getattr(cache, "layers", None)
        layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
        if type(layer) is DynamicLayer and not getattr(cache, "offloading", False) and (
            not layer.is_initialized or (layer.keys.device.type == "meta" and layer.keys.ndim == 4)
        ):
            shape = (batch, 1, (layer.keys.shape[-2] if layer.is_initialized else 0) + seq, 1)
            kv = made.get(shape)
            if kv is None:
                kv = made[shape] = torch.empty(shape, device="meta")
            if not layer.is_initialized:  # what its `update` does first; the concatenation onto the empty
                layer.lazy_initialization(kv, kv)  # tensors it makes would give `kv`'s shape
            layer.keys = layer.values = kv
            continue
        kv = torch.empty((batch, 1, seq, 1), device="meta")
        cache.update(kv, kv, layer_idx)


class _Pass:
    """State of one forward pass through the stubs."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden  # the block-0 input; passed through untouched until the last stub
        self.calls: list[tuple[tuple, dict]] = []  # per layer: (args after hidden, kwargs)
        self.caches: list[tuple[int, Any]] = []  # (layer, cache object) pairs to advance after the step
        # one reference per session for every layer: layers whose other arguments are shared then have equal
        # argument sets, which the router sends once (`dedupe_calls` compares by identity)
        self.refs: dict[str, CacheRef] = {}


class BlockCapture:
    """Collects one forward pass over the stubs and ships it to the route on the last block."""

    def __init__(self, num_blocks: int, router: Router, config, meta_block_factory: Callable[[], nn.Module] | None):
        self.num_blocks = num_blocks
        self.router = router
        self.config = config
        self._meta_block_factory = meta_block_factory
        self._output_arity: int | None = None  # None: blocks return a tensor; n: a tuple of n
        self._format_known = False
        self._local = threading.local()
        self.default_max_length: int | None = None  # max_length for sessions bound by the stubs themselves
        self.active_cache = None  # the cache of an open `inference_session`, reused by `generate`

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.config, "_attn_implementation", None)

    def __call__(self, index: int, args: tuple, kwargs: dict):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise SplitForwardError(f"block {index} was called without a hidden state")
        if not isinstance(hidden, torch.Tensor):
            raise SplitForwardError(f"block {index} got a {type(hidden).__name__} as hidden state, expected a tensor")
        state: _Pass | None = getattr(self._local, "state", None)
        if index == 0:
            state = self._local.state = _Pass(hidden)
            if not self._format_known:
                self._learn_output_format(hidden, rest, kwargs)
        elif state is None or len(state.calls) != index:
            raise SplitForwardError(
                f"block {index} was called out of order (expected block {0 if state is None else len(state.calls)}); "
                "swarm needs a forward that runs every block once, in order"
            )
        elif hidden is not state.hidden:
            raise SplitForwardError(
                f"the model changed the hidden state between blocks {index - 1} and {index}; "
                "swarm can only split models whose forward passes each block's output straight to the next"
            )
        rest, kwargs = self._bind_caches(index, rest, kwargs, state)
        state.calls.append((rest, kwargs))
        if index < self.num_blocks - 1:
            return self._format(hidden)
        self._local.state = None
        sessions = {id(c._swarm_session): c._swarm_session for _, c in state.caches}
        if len(sessions) > 1:
            raise SplitForwardError("blocks of one forward pass received different cache objects")
        session = next(iter(sessions.values()), None)
        out = self.router.run(session, state.hidden, state.calls, self.attn_implementation)
        advance_lengths(state.caches, state.hidden)
        return self._format(out.to(device=hidden.device, dtype=hidden.dtype))

    def _bind_caches(self, index: int, args: tuple, kwargs: dict, state: _Pass):
        """The layer's arguments with each cache object replaced by its session's `CacheRef` (one per session per
        pass). Arguments without a cache are returned as they are: this runs for every layer of every token."""
        from transformers.cache_utils import Cache

        if any(isinstance(a, Cache) for a in args):
            args = tuple(self._cache_ref(index, a, state) if isinstance(a, Cache) else a for a in args)
        for value in kwargs.values():
            if isinstance(value, Cache):
                kwargs = {k: self._cache_ref(index, v, state) if isinstance(v, Cache) else v for k, v in kwargs.items()}
                break
        return args, kwargs

    def _cache_ref(self, index: int, cache, state: _Pass) -> CacheRef:
        session = bind_session(cache, self.router, self.default_max_length)
        state.caches.append((index, cache))
        ref = state.refs.get(session.session_id)
        if ref is None:
            ref = state.refs[session.session_id] = CacheRef(session.session_id)
        return ref

    def _format(self, hidden: torch.Tensor):
        if self._output_arity is None:
            return hidden
        return (hidden,) + (None,) * (self._output_arity - 1)

    def _learn_output_format(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Run one real block on meta tensors to see whether blocks return a tensor or a tuple."""
        self._format_known = True
        if self._meta_block_factory is None:
            return
        from transformers.cache_utils import Cache

        def to_meta(value):
            if isinstance(value, torch.Tensor):
                return torch.empty_like(value, device="meta")
            if isinstance(value, Cache):
                return None
            if isinstance(value, tuple):
                return tuple(to_meta(v) for v in value)
            if isinstance(value, list):
                return [to_meta(v) for v in value]
            if isinstance(value, dict):
                return {k: to_meta(v) for k, v in value.items()}
            return value

        try:
            block = self._meta_block_factory()
            with torch.no_grad():
                out = block(to_meta(hidden), *to_meta(args), **to_meta(kwargs))
        except Exception as exc:  # noqa: BLE001 - a block that cannot run on meta: assume the common tensor format
            logger.debug("could not run a block on meta tensors (%s); assuming blocks return a tensor", exc)
            return
        if isinstance(out, (tuple, list)):
            self._output_arity = len(out)


class RemoteBlock(nn.Module):
    """Stand-in for block `index`: no parameters, records its call, the last one runs the route."""

    def __init__(self, index: int, capture: BlockCapture):
        super().__init__()
        self.index = index
        # a plain attribute would register nothing, but keep it out of state_dict/children explicitly
        object.__setattr__(self, "_capture", capture)

    def forward(self, *args, **kwargs):
        return self._capture(self.index, args, kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}"
