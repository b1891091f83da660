"""Runs a peer's blocks on validated steps. Knows nothing about the network.

Each session owns a full-length cache object of the model's own cache class (only layers
``[start, end)`` ever fill), so the blocks' attention code updates it exactly as in the unsplit
model. Sessions belong to the client that opened them and expire when unused. A step forwarded by
another peer (a pushed step, docs/wire.md) may use a session when it carries the session's key.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from peer.loader import LoadedBlocks
from peer.merge import (mask_position, merge_caches, merge_calls, signature, split_caches, split_rows,
                        stacking_key)
from swarm.protocol import ProtocolError, RequestRefused, StepRequest, StepResponse
from swarm.wire import CacheRef

# Cache classes a session may ask for: built empty from the model config, growing with what is stored.
# (StaticCache and friends preallocate their full length up front: not a thing to build on request.)
CACHE_CLASSES = ("DynamicCache",)


logger = logging.getLogger(__name__)


class SessionError(RequestRefused):
    """Unknown, foreign or over-budget session, or a step that does not fit the state this peer holds for it
    (out of order, batch or cache operation at odds with its cache): the client rebuilds it elsewhere."""


@dataclass(frozen=True)
class RunnerLimits:
    """What one peer accepts. Every limit is checked before any compute."""

    max_batch: int = 256  # rows per step
    max_tokens_per_step: int = 16384  # batch x sequence length of one step
    max_sessions: int = 256  # open sessions, all clients together
    max_sessions_per_client: int = 32  # open sessions of one client
    session_ttl_s: float = 300.0  # a session unused this long is dropped (its client vanished)
    max_session_length: int = 8192  # tokens one session may hold (per sequence of its batch)
    max_cache_tokens: int = 262144  # KV budget: sequences x tokens held by all sessions together
    max_kept_reply_bytes: int = 1 << 20  # a session's last reply is kept (to answer a retry) up to this size
    max_merged_step_tokens: int = 16  # session steps of up to this many tokens per row may run merged (decode)


@dataclass
class Session:
    session_id: str
    owner: str  # who opened it (peer id of the client); only they may use it
    cache: object  # a transformers Cache of the model's own class
    last_used: float = field(default_factory=time.monotonic)
    tokens: int = 0  # batch x length this session's cache holds, counted against the KV budget
    reserved: int = 0  # batch x max_length the client announced at opening, held against the KV budget
    steps: int = 0  # steps run in this session
    last_reply: torch.Tensor | None = None  # the reply to step `steps - 1`, kept to answer a retry of it
    key: str | None = None  # the client's secret for it: a step forwarded by another peer must carry it

    @property
    def charged(self) -> int:
        """Token slots this session counts against the KV budget."""
        return max(self.tokens, self.reserved)


class BlockRunner:
    """Blocks ``[start, end)`` plus the sessions that use them."""

    def __init__(self, loaded: LoadedBlocks, limits: RunnerLimits = RunnerLimits()):
        self.loaded = loaded
        self.limits = limits
        self.start, self.end = loaded.start, loaded.end
        self.config = loaded.config
        self.hidden_size: int | None = getattr(loaded.config, "hidden_size", None)
        self.attn_implementation: str | None = getattr(loaded.config, "_attn_implementation", None)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.merged_steps = 0  # forwards that ran several sessions' steps as one batch
        self.merged_rows = 0  # rows those forwards carried
        self.merged_max_rows = 0  # rows of the largest of them
        self.merged_in_place = 0  # of those forwards, the ones whose sessions' caches were the last merge's tensors (no copy)

    # ---- sessions -------------------------------------------------------------------------------------

    def _session(self, req: StepRequest, owner: str) -> Session | None:
        if req.session_id is None:
            return None
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(req.session_id)
            if session is not None:
                if session.owner != owner:
                    _check_key(session, req)
                if req.new_session and not (req.step == 0 and session.steps == 1):  # else: a retried first step
                    raise SessionError(f"session {req.session_id!r} is already open on this peer")
                session.last_used = now
                return session
            if not req.new_session:
                raise SessionError(
                    f"unknown session {req.session_id!r}: never opened here, closed, or expired after "
                    f"{self.limits.session_ttl_s:.0f} s without use"
                )
            if len(self._sessions) >= self.limits.max_sessions:
                raise SessionError(f"peer is full: {len(self._sessions)} open sessions (limit {self.limits.max_sessions})")
            # a forwarded step opens the session for the client it names (the key vouches for the claim), so that
            # client may close it and use it directly
            owner = req.owner or owner
            mine = sum(1 for s in self._sessions.values() if s.owner == owner)
            if mine >= self.limits.max_sessions_per_client:
                raise SessionError(
                    f"client has {mine} open sessions on this peer (limit {self.limits.max_sessions_per_client}); "
                    "close finished sessions"
                )
            reserved = req.hidden.shape[0] * req.max_length if req.max_length is not None else 0
            used = sum(s.charged for s in self._sessions.values())
            if used + reserved > self.limits.max_cache_tokens:
                raise SessionError(
                    f"KV cache budget exhausted: a session of {req.hidden.shape[0]} x {req.max_length} tokens needs "
                    f"{reserved} token slots, {max(0, self.limits.max_cache_tokens - used)} of "
                    f"{self.limits.max_cache_tokens} are free; retry later, use another peer or a smaller max_length"
                )
            session = Session(req.session_id, owner, self._new_cache(req.cache_class), now, reserved=reserved, key=req.session_key)
            self._sessions[req.session_id] = session
            return session

    def _new_cache(self, cache_class: str | None):
        import transformers
        from transformers.cache_utils import Cache

        name = cache_class or "DynamicCache"
        if name not in CACHE_CLASSES:
            raise ProtocolError(f"cache class {name!r} is not supported by peers (supported: {', '.join(CACHE_CLASSES)})")
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Cache)):
            raise ProtocolError(f"cache class {name!r} is not a transformers Cache")
        try:
            return cls(config=self.config)
        except TypeError as exc:
            raise ProtocolError(f"cache class {name!r} cannot be built from the model config: {exc}") from exc

    def _expire(self, now: float) -> None:
        ttl = self.limits.session_ttl_s
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > ttl]:
            del self._sessions[sid]

    def close_session(self, session_id: str, owner: str) -> bool:
        """Forget a session. Returns whether it existed; closing another client's session is refused."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            if session.owner != owner:
                raise SessionError(f"session {session_id!r} belongs to another client")
            del self._sessions[session_id]
            return True

    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def free_cache_tokens(self) -> int:
        with self._lock:
            return max(0, self.limits.max_cache_tokens - sum(s.charged for s in self._sessions.values()))

    def active_sessions(self, within_s: float = 1.0) -> int:
        """Sessions that ran a step in the last `within_s` seconds: the steps a batch may expect soon."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in self._sessions.values() if now - s.last_used <= within_s)

    def expire_sessions(self) -> None:
        with self._lock:
            self._expire(time.monotonic())

    # ---- compute -------------------------------------------------------------------------------------

    def validate(self, req: StepRequest) -> None:
        """Reject anything this peer cannot or will not run, before any compute.

        `ProtocolError`: the request is wrong for this model (any peer would refuse it).
        `RequestRefused`: this peer's range or limits do not fit it (another peer may take it).
        """
        if not (self.start <= req.start < req.end <= self.end):
            raise RequestRefused(f"blocks {req.start}:{req.end} requested, this peer serves {self.start}:{self.end}")
        h = req.hidden
        if not 2 <= h.ndim <= 4 or not h.is_floating_point():
            raise ProtocolError(f"hidden state must be a floating tensor of 2..4 dims, got {h.dtype} {tuple(h.shape)}")
        if self.hidden_size is not None and h.shape[-1] != self.hidden_size:
            raise ProtocolError(f"hidden state has size {h.shape[-1]} in its last dim, the model has {self.hidden_size}")
        if h.shape[0] == 0 or (h.ndim > 2 and h.shape[1] == 0):
            raise ProtocolError(f"hidden state of shape {tuple(h.shape)} is empty")
        if h.shape[0] > self.limits.max_batch:
            raise RequestRefused(f"batch of {h.shape[0]} rows exceeds the limit of {self.limits.max_batch}")
        seq = h.shape[1] if h.ndim > 2 else 1
        if seq > self.limits.max_session_length:
            raise RequestRefused(f"step of {seq} tokens per sequence exceeds the limit of {self.limits.max_session_length}")
        tokens = h.shape[0] * seq
        if tokens > self.limits.max_tokens_per_step:
            raise RequestRefused(f"step of {tokens} tokens exceeds the limit of {self.limits.max_tokens_per_step}")
        if req.attn_implementation is not None and self.attn_implementation is not None:
            if req.attn_implementation != self.attn_implementation:
                raise RequestRefused(
                    f"client builds masks for attn_implementation={req.attn_implementation!r}, this peer runs "
                    f"{self.attn_implementation!r}; load the client with the same attn_implementation"
                )
        if req.max_length is not None and req.max_length > self.limits.max_session_length:
            raise RequestRefused(f"max_length {req.max_length} exceeds this peer's limit of {self.limits.max_session_length}")

    def step(self, req: StepRequest, owner: str = "local") -> StepResponse:
        result = self.step_many([(req, owner)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def step_many(
        self, items: list[tuple[StepRequest, str]], done: Callable[[int, StepResponse | BaseException], None] | None = None
    ) -> list[StepResponse | BaseException]:
        """Run several requests that arrived together; each gets its reply or its own error.

        Decode steps of different sessions that fit together (`peer.merge`) run as one batch through the
        blocks; everything else runs one by one, in arrival order. One request's failure is its own.
        """
        results: list[StepResponse | BaseException] = []
        batch: list[tuple[StepRequest, str]] = []
        seen: set[str] = set()
        for req, owner in items:
            # two requests of one session (a retry next to its original) run in separate rounds, in order
            if req.session_id is not None and req.session_id in seen:
                results += self._step_round(batch, len(results), done)
                batch, seen = [], set()
            batch.append((req, owner))
            if req.session_id is not None:
                seen.add(req.session_id)
        return results + self._step_round(batch, len(results), done)

    def _step_round(self, items: list[tuple[StepRequest, str]], offset: int, done) -> list[StepResponse | BaseException]:
        results: list[StepResponse | BaseException | None] = [None] * len(items)

        def put(k: int, result: StepResponse | BaseException) -> None:
            results[k] = result
            if done is not None:
                done(offset + k, result)
        ready: list[tuple[int, StepRequest, Session | None]] = []
        for k, (req, owner) in enumerate(items):
            try:
                reply, session = self._begin(req, owner)
            except BaseException as exc:  # noqa: BLE001 - the request's own error, answered to it alone
                put(k, exc)
                continue
            if reply is not None:
                put(k, reply)
            else:
                ready.append((k, req, session))
        for group in self._groups(ready) if len(ready) > 1 else [ready]:  # a lone step has nothing to merge with
            if len(group) > 1:
                group = self._merge(group, put)  # what could not run merged runs one by one, in arrival order
            for k, req, session in group:
                try:
                    hidden = self._compute(req, session.cache if session else None)
                except BaseException as exc:  # noqa: BLE001
                    if session is not None:  # its cache may hold part of this step: the client rebuilds it elsewhere
                        self._drop(session)
                    put(k, exc)
                    continue
                put(k, self._finish(session, hidden))
        return results  # type: ignore[return-value]

    def _merge(self, group: list[tuple[int, StepRequest, Session | None]], put) -> list:
        """Run a group as one batch if it can; failing that (sessions at different positions that cannot
        pad), each position's steps as one batch. Returns the steps left to run one by one."""
        if self._run_merged(group, put):
            return []
        by_length: dict[int, list] = {}
        for entry in group:
            by_length.setdefault(self._length(entry[1], entry[2]), []).append(entry)
        if len(by_length) == 1:
            return group
        left = []
        for part in by_length.values():
            if len(part) < 2 or not self._run_merged(part, put):
                left += part
        return sorted(left, key=lambda entry: entry[0])

    def _run_merged(self, group: list[tuple[int, StepRequest, Session | None]], put) -> bool:
        group = sorted(group, key=lambda e: stacking_key(e[2].cache, self._first_attention_layer(e[2].cache, e[1].start)))
        try:
            outs = self._compute_merged([(req, session) for _, req, session in group])
        except Exception as exc:  # noqa: BLE001 - sessions' caches are untouched: they run otherwise
            logger.debug("merged step of %d sessions did not run: %s", len(group), exc)
            return False
        self.merged_steps += 1
        rows = sum(req.hidden.shape[0] for _, req, _ in group)
        self.merged_rows += rows
        self.merged_max_rows = max(self.merged_max_rows, rows)
        for (k, req, session), hidden in zip(group, outs):
            put(k, self._finish(session, hidden))
        return True

    def _begin(self, req: StepRequest, owner: str) -> tuple[StepResponse | None, Session | None]:
        """Checks and cache operations before compute: (the kept reply of a repeated step, or None; the session)."""
        self.validate(req)
        session = self._session(req, owner)
        if session is None:
            return None, None
        if req.step is not None and req.step != session.steps:
            if req.step == session.steps - 1 and session.last_reply is not None:
                logger.debug("step %d of session %s repeated (its reply was lost)", req.step, req.session_id)
                return StepResponse(hidden=session.last_reply), session  # a retry: its reply was lost on the way
            raise SessionError(
                f"step {req.step} of session {req.session_id!r} is out of order: this peer has run {session.steps} "
                "step(s) of it" + (" and kept no reply to repeat" if req.step == session.steps - 1 else "")
            )
        try:
            self._admit(session, req)
        except BaseException:
            # the cache may hold part of this step now: the session cannot go on, the client rebuilds it elsewhere
            self._drop(session)
            raise
        return None, session

    def _finish(self, session: Session | None, hidden: torch.Tensor) -> StepResponse:
        if session is not None:
            session.steps += 1
            keep = hidden.numel() * hidden.element_size() <= self.limits.max_kept_reply_bytes
            session.last_reply = hidden if keep else None
        return StepResponse(hidden=hidden)

    def _groups(self, ready: list[tuple[int, StepRequest, Session | None]]) -> list[list]:
        """Arrival-ordered groups: session steps that may merge share a group, every other step is alone."""
        groups: list[list] = []
        by_key: dict[tuple, list] = {}
        for entry in ready:
            _, req, session = entry
            key = self._merge_key(req, session)
            if key is None:
                groups.append([entry])
                continue
            group = by_key.get(key)
            rows = sum(r.hidden.shape[0] for _, r, _ in group) if group else 0
            if group is None or rows + req.hidden.shape[0] > self.limits.max_batch:
                group = by_key[key] = []
                groups.append(group)
            group.append(entry)
        return groups

    def _merge_key(self, req: StepRequest, session: Session | None) -> tuple | None:
        """Steps with equal keys may run as one batch (`peer.merge` checks the rest); None: never merged."""
        h = req.hidden
        if session is None or h.ndim < 3 or h.shape[1] > self.limits.max_merged_step_tokens:
            return None
        # one-token steps of sessions at different positions may merge padded (peer.merge); others need equal lengths
        length = None if h.shape[1] == 1 else self._length(req, session)
        return (req.start, req.end, tuple(req.layer_calls), tuple(h.shape[1:]), h.dtype, length, signature(req.calls))

    def _length(self, req: StepRequest, session: Session | None) -> int:
        """Tokens the session's cache holds in this request's first attention layer."""
        return session.cache.get_seq_length(self._first_attention_layer(session.cache, req.start)) if session else 0

    def _compute_merged(self, group: list[tuple[StepRequest, Session]]) -> list[torch.Tensor]:
        """One forward for several sessions' steps; each session's cache gets its rows back only if it all worked."""
        rows = [req.hidden.shape[0] for req, _ in group]
        caches = [session.cache for _, session in group]
        layers = range(group[0][0].start, group[0][0].end)
        first = group[0][0]
        lengths = [self._length(req, session) for req, session in group]
        padded = lengths if len(set(lengths)) > 1 else None  # None: nothing to pad
        merged_req = StepRequest(
            start=first.start,
            end=first.end,
            hidden=torch.cat([req.hidden for req, _ in group]),
            calls=merge_calls([req.calls for req, _ in group], rows, padded, self.attn_implementation,
                              mask_position(type(self.loaded.blocks[first.start - self.start]))),
            layer_calls=first.layer_calls,
        )
        merged_cache = merge_caches(caches, layers, rows, padded)
        layer = self._first_attention_layer(caches[0], first.start)
        where = stacking_key(caches[0], layer)[0]  # the storage of the session's keys (0: none)
        in_place = where != 0 and where == stacking_key(merged_cache, layer)[0]  # the last merge's tensor, used again
        hidden = self._compute(merged_req, merged_cache)
        self.merged_in_place += in_place
        split_caches(merged_cache, caches, layers, rows, padded)
        return split_rows(hidden, rows)

    def _compute(self, req: StepRequest, cache) -> torch.Tensor:
        device, dtype = self.loaded.device, self.loaded.dtype
        kept = req.prepared
        if kept is not None and kept[0] is cache:  # a refilled request (peer.steady): its tensors are the same objects
            hidden, calls = req.hidden, kept[1]
        else:
            hidden = req.hidden.to(device=device, dtype=dtype)
            calls = [
                (tuple(_prepare(a, cache, device, dtype) for a in args), {k: _prepare(v, cache, device, dtype) for k, v in kwargs.items()})
                for args, kwargs in req.calls
            ]
            if hidden is req.hidden and _unconverted(req.calls, calls):  # nothing copied: valid for its next refills too
                req.prepared = (cache, calls)
        with torch.inference_mode():
            for offset, i in enumerate(range(req.start, req.end)):
                args, kwargs = calls[req.layer_calls[offset]]
                block: nn.Module = self.loaded.blocks[i - self.start]
                out = block(hidden, *args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
        if hidden.is_cpu and hidden.dtype is req.hidden.dtype:
            return hidden
        return hidden.to(device="cpu", dtype=req.hidden.dtype)

    def _drop(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.session_id) is session:
                del self._sessions[session.session_id]

    def _admit(self, session: Session, req: StepRequest) -> None:
        """Apply the step's cache operations and charge the KV budget, refusing what would not fit."""
        cache = session.cache
        layer = self._first_attention_layer(cache, req.start)
        batch = _cache_batch(cache, layer)
        length = cache.get_seq_length(layer)
        for name, arg in req.cache_ops:
            batch = self._check_op(session, name, arg, batch, length)
            self._apply_op(cache, name, arg)
            length = cache.get_seq_length(layer)
            batch = _cache_batch(cache, layer) if length else batch
        rows = req.hidden.shape[0]
        if length and batch and rows != batch:
            raise SessionError(f"hidden state has {rows} rows, the session's cache holds {batch}")
        length += req.hidden.shape[1] if req.hidden.ndim > 2 else 1
        if length > self.limits.max_session_length:
            raise SessionError(
                f"session would hold {length} tokens, more than this peer's limit of {self.limits.max_session_length}"
            )
        self._charge(session, rows * length, "this step")

    def _check_op(self, session: Session, name: str, arg, batch: int, length: int) -> int:
        """The cache's batch after operation `name`; refuses one that would blow past the limits."""
        if name == "batch_repeat_interleave":
            new_batch = max(batch, 1) * arg
        elif name in ("reorder_cache", "batch_select_indices"):
            if length and batch and arg.numel() and not (0 <= int(arg.min()) and int(arg.max()) < batch):
                raise SessionError(f"cache operation {name}: indices must be in 0..{batch - 1}")
            new_batch = arg.numel()
        else:
            return batch
        if new_batch > self.limits.max_batch:
            raise RequestRefused(f"cache operation {name} would make a batch of {new_batch} rows, the limit is {self.limits.max_batch}")
        if length:
            self._charge(session, new_batch * length, f"cache operation {name}")
        return new_batch

    def _charge(self, session: Session, tokens: int, what: str) -> None:
        with self._lock:
            others = sum(s.charged for s in self._sessions.values() if s is not session)
            if others + max(tokens, session.reserved) > self.limits.max_cache_tokens:
                raise SessionError(
                    f"KV cache budget exhausted: {what} needs {tokens} token slots, "
                    f"{max(0, self.limits.max_cache_tokens - others)} of {self.limits.max_cache_tokens} are free; "
                    "retry later or use another peer"
                )
            session.tokens = tokens

    @staticmethod
    def _first_attention_layer(cache, start: int) -> int:
        return start if len(getattr(cache, "layers", ())) > start else 0

    def _apply_op(self, cache, name: str, arg) -> None:
        if name == "reorder_cache" or name == "batch_select_indices":
            arg = arg.to(self.loaded.device)
        try:
            if arg is None:
                getattr(cache, name)()
            else:
                getattr(cache, name)(arg)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise SessionError(f"cache operation {name}({arg if not isinstance(arg, torch.Tensor) else tuple(arg.shape)}) failed: {exc}") from exc


def _check_key(session: Session, req: StepRequest) -> None:
    """A step from someone other than the session's owner (a peer forwarding a pushed step) needs the session's key."""
    if req.session_key is None:
        raise SessionError(f"session {req.session_id!r} belongs to another client (and the step carries no session key)")
    if session.key is None or not hmac.compare_digest(session.key.encode(), req.session_key.encode()):
        raise SessionError(f"session {req.session_id!r} belongs to another client (the session key does not match)")


def _cache_batch(cache, layer: int) -> int:
    """Rows the cache holds at `layer` (0 while it is empty)."""
    layers = getattr(cache, "layers", None)
    if not layers or layer >= len(layers):
        return 0
    keys = getattr(layers[layer], "keys", None)
    return int(keys.shape[0]) if isinstance(keys, torch.Tensor) and keys.ndim > 0 and keys.numel() else 0


def _unconverted(raw, prepared) -> bool:
    """Whether `_prepare` left every tensor of `raw` as it was (the same object in `prepared`)."""
    if isinstance(raw, torch.Tensor):
        return prepared is raw
    if isinstance(raw, (tuple, list)):
        return len(raw) == len(prepared) and all(_unconverted(a, b) for a, b in zip(raw, prepared))
    if isinstance(raw, dict):
        return all(_unconverted(v, prepared[k]) for k, v in raw.items())
    return True


def _prepare(value, cache, device: torch.device, dtype: torch.dtype):
    """Turn a decoded argument into what the block takes: cache refs to the session's cache, tensors to our device/dtype."""
    if isinstance(value, CacheRef):
        if cache is None:
            raise ProtocolError("a cache argument was sent without a session")
        return cache
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
            if not torch.isfinite(value).all():  # additive masks: keep them finite at lower precision
                value = torch.nan_to_num(value, neginf=torch.finfo(dtype).min, posinf=torch.finfo(dtype).max)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_prepare(v, cache, device, dtype) for v in value)
    if isinstance(value, list):
        return [_prepare(v, cache, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _prepare(v, cache, device, dtype) for k, v in value.items()}
    return value
