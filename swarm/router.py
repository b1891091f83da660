"""Sends one forward pass along a route of peers, and survives peers that fail on the way.

`SwarmRouter` turns the stubs' recorded layer calls into one `StepRequest` per hop, each with only
its own layers' arguments (deduplicated: layers that received the same objects share a row), and
chains the hops. In-process peers (tests, `make demo`) and hivemind RPC peers differ only in the
`Transport` they plug in, so the exact same codec and validation run in both.

Failures (see docs/reliability.md). A peer that cannot be reached, times out, answers garbage or
replies with an error it marks retryable is *banned* (`Bans`: for `ban_base_s`, doubling with each
further failure, up to `ban_max_s`) and its part of the route is re-routed around it:

- a stateless pass continues from the failed hop's input over a new route for the remaining blocks;
- in a session, the failed hop ``[a, b)`` is replaced by the cheapest chain of other peers covering
  ``[a, b)`` (one or several hops, possibly starting mid-range), each opening a new session on its
  peer, and every step the session has run so far is *replayed* there, in order, with the cache
  operations that came before each step. The router keeps, per session, a `_History`: for each step
  the hidden state that entered every hop boundary, the step's layer arguments (a wire-encoded
  snapshot: masks bit-packed, shared tensors once) and its cache operations. A replacement starting
  at block ``a`` is fed the recorded inputs at ``a``; a chain ``[a, c), [c, b)`` feeds the second hop
  with the first one's replayed outputs. The rebuilt KV cache is the one the failed peer held, so
  the output equals a run without the failure.

Push (`push=True`, docs/wire.md "Pushed steps"): a session step whose request fits one unary message
goes to the first peer only, naming the later hops (`StepRequest.next`); each peer forwards its output
to the next and the replies come back nested, so the client sends once and receives once per step.
The client still gets every hop's output (the replay history needs them). If the chain breaks at hop
k, hops before k are recorded as done and the step goes on from k hop by hop, as above: a peer that
ran the step but whose reply was lost answers the direct repeat from the reply it kept. Replays and
stateless passes are never pushed.

If no route exists (blocks nobody serves, or only banned peers serve them), the router re-reads the
directory and waits, at most `heal_timeout_s` from the first failure of the step, then raises
`MissingBlocksError` naming the blocks. An error the peer marks as the request's own fault
(`RemoteError.retry == False`) is raised at once: every peer would refuse it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from swarm.microbatch import auto_parts, cut, microbatch_bounds, splittable
from swarm.chain import PUSH_MAX_BYTES, link_hops
from swarm.protocol import DELIVERED, CollectRequest, ProtocolError, RemoteError, StepRequest, StepResponse, raise_if_error
from swarm.remote import ClientSession
from swarm.routing import Hop, MissingBlocksError, Span, choose_route, missing_blocks
from swarm.wire import RepeatDecoder, RepeatEncoder, WireError, decode_message, encode_message, skeleton

logger = logging.getLogger(__name__)


class PeerUnreachable(RuntimeError):
    """A peer did not answer (dead, unreachable, or too slow). Transports raise this."""


class ReplyLost(PeerUnreachable):
    """The stream to a peer closed without a reply, though the peer was reached. The router repeats
    the request once (a session step carries its `step` number, so a peer that ran it answers again
    without running it twice) before it counts as a failure."""


class SessionLost(RuntimeError):
    """A session's peer failed and its history could not be replayed (the history was over its limit)."""


class Transport(Protocol):
    def step(self, peer_id: str, request: bytes, timeout: float | None = None) -> bytes:
        """Send one step request; raise `PeerUnreachable` (or `OSError`/`TimeoutError`) if no reply came.
        `timeout` (seconds; None: the transport's own) is given for pushed steps, which wait for a whole chain."""
        ...

    def close_session(self, peer_id: str, session_id: str, wait: bool = True) -> None: ...

    # Optional, for tail delivery (a transport without them pushes steps the nested way):
    # collects(first, last) -> bool: whether `push` can collect from the last peer;
    # push(first, request, last, collect: CollectRequest, timeout) -> swarm.direct.PushedStep (or the same interface).


@dataclass(frozen=True)
class RetryPolicy:
    """How the router recovers from failing peers. Times in seconds."""

    ban_base_s: float = 5.0  # a peer that failed is avoided this long; each further failure doubles it
    ban_max_s: float = 300.0  # cap of the doubling ban
    heal_timeout_s: float = 60.0  # a step waits at most this long (from its first failure) for a usable route
    poll_interval_s: float = 1.0  # while waiting, re-read the directory this often
    max_history_bytes: int = 1 << 30  # replay history kept per session; past it, a failed peer ends the session
    hop_timeout_s: float = 120.0  # a pushed step: each hop may take this long; the client waits this x the hops


class Bans:
    """Peers to avoid, each until a time that doubles with its consecutive failures. Thread-safe."""

    def __init__(self, base_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        self.base_s, self.max_s, self.clock = base_s, max_s, clock
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def ban(self, peer_id: str) -> float:
        """Ban `peer_id` after a failure; returns the ban's length in seconds."""
        with self._lock:
            n = self._failures.get(peer_id, 0) + 1
            self._failures[peer_id] = n
            length = min(self.base_s * 2 ** min(n - 1, 32), self.max_s)
            self._until[peer_id] = self.clock() + length
            return length

    def succeeded(self, peer_id: str) -> None:
        """A step succeeded on `peer_id`: its next failure starts the backoff over."""
        if peer_id in self._failures:
            with self._lock:
                self._failures.pop(peer_id, None)

    def active(self) -> frozenset[str]:
        now = self.clock()
        with self._lock:
            for peer in [p for p, t in self._until.items() if t <= now]:
                del self._until[peer]
            return frozenset(self._until)

    def next_expiry(self) -> float | None:
        """Seconds until the soonest ban ends (None: nobody is banned)."""
        with self._lock:
            return max(0.0, min(self._until.values()) - self.clock()) if self._until else None


def dedupe_calls(layer_calls: list[tuple[tuple, dict]]) -> tuple[list[tuple[tuple, dict]], list[int]]:
    """Distinct argument sets (layers that received the same objects share one) and each layer's row."""
    rows: dict[tuple, int] = {}
    calls: list[tuple[tuple, dict]] = []
    index: list[int] = []
    for args, kwargs in layer_calls:
        key = (tuple(map(id, args)), tuple(kwargs), tuple(map(id, kwargs.values())))
        row = rows.get(key)
        if row is None:
            row = rows[key] = len(calls)
            calls.append((args, kwargs))
        index.append(row)
    return calls, index


def build_step(
    hop: Hop,
    hidden: torch.Tensor,
    layer_calls: list[tuple[tuple, dict]],
    session: ClientSession | None,
    cache_ops: list,
    attn_implementation: str | None,
    *,
    session_id: str | None = None,
    new_session: bool | None = None,
    step: int | None = None,
    session_key: str | None = None,
) -> StepRequest:
    """One hop's request: the arguments of layers ``[hop.start, hop.end)``, each distinct set sent once.

    `session_id` / `new_session` override the session's (a replacement hop opens its own session id);
    `session_key` is the hop's secret (sent when the session opens, and in every pushed request).
    """
    calls, index = dedupe_calls(layer_calls[hop.start : hop.end])
    if session is not None:
        session_id = session_id or session.session_id
        if new_session is None:
            new_session = hop.peer_id not in session.opened_on
    return StepRequest(
        start=hop.start,
        end=hop.end,
        hidden=hidden,
        calls=calls,
        layer_calls=index,
        session_id=session_id if session else None,
        new_session=bool(new_session) if session else False,
        cache_class=session.cache_class if session else None,
        cache_ops=list(cache_ops),
        attn_implementation=attn_implementation,
        max_length=session.max_length if session else None,
        step=step if session else None,
        session_key=session_key if session else None,
    )


# ---------------------------------------------------------------------------------------------------
# Session state kept by the router


# A step whose layer arguments hold at most this many tensor bytes (a decode step) is kept as copies for
# the replay history; a larger one (a prefill, with its masks) is kept wire-encoded, masks bit-packed.
SNAPSHOT_COPY_BYTES = 1 << 16


@dataclass
class _CallsSnapshot:
    """A step's layer arguments as the replay history keeps them: later changes to the caller's objects
    do not reach them. Copying a decode step's few small tensors costs a fraction of encoding them, and
    it is on every token's path; a prefill's arguments are encoded, which keeps their masks small."""

    copied: tuple[list, list[int]] | None  # (distinct calls with every tensor cloned, each layer's row)
    encoded: bytes | None  # or the same, wire-encoded
    nbytes: int

    @classmethod
    def of(cls, layer_calls: list[tuple[tuple, dict]]) -> "_CallsSnapshot":
        calls, index = dedupe_calls(layer_calls)
        size = _tensor_bytes(calls)
        if size <= SNAPSHOT_COPY_BYTES:
            return cls((_clone(calls, {}), index), None, size)
        encoded = encode_message([calls, index])
        return cls(None, encoded, len(encoded))

    def expand(self) -> list[tuple[tuple, dict]]:
        """One (args, kwargs) per layer, as `dedupe_calls` received them (shared rows stay shared)."""
        calls, index = self.copied if self.copied is not None else decode_message(self.encoded)
        return [calls[row] for row in index]


def _tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors in nested tuples, lists and dicts (one shared by several layers counts once)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    return 0


def _clone(value: Any, memo: dict) -> Any:
    """A copy of nested tuples, lists and dicts with every tensor cloned (once, however often it appears)."""
    if isinstance(value, torch.Tensor):
        copy = memo.get(id(value))
        if copy is None:
            copy = memo[id(value)] = value.detach().clone()
        return copy
    if isinstance(value, tuple):
        return tuple(_clone(v, memo) for v in value)
    if isinstance(value, list):
        return [_clone(v, memo) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v, memo) for k, v in value.items()}
    return value


@dataclass
class _Step:
    """One step of a session, as needed to replay it on a replacement peer."""

    ops: list[tuple[str, Any]]  # cache operations applied before the step, in order
    calls: _CallsSnapshot | None  # the layer arguments (None once the history is dropped)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block position -> hidden entering it
    unkept: list | None = None  # the caller's layer arguments, until `keep` copies them (None: nothing to copy)

    def keep(self) -> None:
        """Copy what the caller passed, its block-0 input and its layer arguments: its objects may change once the
        step returns. The router does it once a pushed step is on its way, while it waits for the reply (off the
        token's path), and at the latest when the step ends; nothing changes them meanwhile, since the caller
        waits for the step. A session whose history is dropped keeps nothing (`unkept` stays None)."""
        if self.unkept is not None:
            layer_calls, self.unkept = self.unkept, None
            self.inputs[0] = self.inputs[0].detach().clone()
            self.calls = _CallsSnapshot.of(layer_calls)

    def nbytes(self) -> int:
        return (self.calls.nbytes if self.calls else 0) + sum(t.numel() * t.element_size() for t in self.inputs.values())


@dataclass
class _SessionHop:
    hop: Hop
    session_id: str  # this hop's session id on its peer (replacements get fresh ones)
    synced: int = 0  # steps of the session this peer has run (it holds their keys/values)
    # the session's secret on this peer: lets a step that another peer forwards (push) use the session
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    unsure: bool = False  # a pushed step reached no further than this hop's input: its peer may have run it anyway
    # its decode steps sent hop by hop (a one-peer route, no push) and their replies: each repeats the last one's
    # bytes but for its tensors and step, so it is refilled, not encoded or decoded in full (swarm.wire)
    requests: RepeatEncoder = field(default_factory=RepeatEncoder)
    replies: RepeatDecoder = field(default_factory=RepeatDecoder)


@dataclass
class _SessionState:
    hops: list[_SessionHop]
    steps: list[_Step] = field(default_factory=list)
    history_bytes: int = 0
    history_dropped: bool = False  # over RetryPolicy.max_history_bytes: failures can no longer be replayed
    # the replies collected from the last peer (tail delivery): a decode step's repeat one framing
    replies: RepeatDecoder = field(default_factory=RepeatDecoder)
    requests: RepeatEncoder = field(default_factory=RepeatEncoder)  # its pushed steps' requests: the same, sent


class _Recovery:
    """The time bound of one pass's recovery: starts at its first failure."""

    def __init__(self, heal_timeout_s: float):
        self.heal_timeout_s = heal_timeout_s
        self.deadline: float | None = None
        self.errors: list[str] = []  # the failures met, for the final error message
        self.failed_peers: set[str] = set()  # past the deadline, only routes avoiding these are tried

    def failed(self, message: str, peer_id: str | None = None) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.heal_timeout_s
        self.errors.append(message)
        if peer_id is not None:
            self.failed_peers.add(peer_id)

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


class SwarmRouter:
    """Chooses routes from the spans peers offer and runs steps over a transport, re-routing failures."""

    def __init__(
        self,
        num_blocks: int,
        spans: Callable[[], list[Span]],
        transport: Transport,
        rng: random.Random | None = None,
        policy: RetryPolicy = RetryPolicy(),
        microbatches: int | None = None,
        wire_dtype: torch.dtype | None = None,
        push: bool = False,
        tail: bool = True,
    ):
        self.num_blocks = num_blocks
        self.spans = spans  # the directory: returns the current spans; may have `invalidate()` to force a re-read
        self.transport = transport
        self.rng = rng or random.Random()
        self.policy = policy
        self.bans = Bans(policy.ban_base_s, policy.ban_max_s)
        self.microbatches = microbatches  # stateless steps: None picks a count per step, 1 turns pipelining off
        self.wire_dtype = wire_dtype  # hidden states travel in this dtype (peers reply in it); None: the model's own
        # session steps go to the first peer only, which forwards along the route; the transport's peers must
        # do that (libp2p peers do; `swarm.local.LocalTransport` does it in-process)
        self.push = push
        # pushed steps collect the last peer's reply from it directly when the transport can (`Transport.collects`)
        self.tail = tail
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._states: dict[str, _SessionState] = {}
        self._lock = threading.Lock()

    def route(self, start: int = 0, end: int | None = None) -> list[Hop]:
        """The cheapest route over peers that are not banned (raises `MissingBlocksError` if none)."""
        return choose_route(self.spans(), self.num_blocks, start=start, end=end, rng=self.rng, exclude=self.bans.active())

    # ---- one pass ------------------------------------------------------------------------------------

    def run(
        self,
        session: ClientSession | None,
        hidden: torch.Tensor,
        layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None,
    ) -> torch.Tensor:
        wire = self.wire_dtype
        if wire is not None and hidden.is_floating_point() and hidden.dtype != wire:
            # a lower precision on the wire (the user asked for it): peers compute in their own dtype and
            # reply in the request's, so every hop's hidden state travels in `wire`; the replay history
            # keeps what was sent, so a replay feeds a replacement peer the very same inputs
            return self._run(session, hidden.to(wire), layer_calls, attn_implementation).to(hidden.dtype)
        return self._run(session, hidden, layer_calls, attn_implementation)

    def _run(
        self,
        session: ClientSession | None,
        hidden: torch.Tensor,
        layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None,
    ) -> torch.Tensor:
        if session is None:
            return self._run_stateless(hidden, layer_calls, attn_implementation)
        if session.closed:
            raise RuntimeError(f"session {session.session_id} is closed")
        recovery = _Recovery(self.policy.heal_timeout_s)
        with self._lock:
            state = self._states.get(session.session_id)
        if state is None:
            hops = session.hops if session.hops is not None else self._route_with_recovery(0, self.num_blocks, recovery)
            state = _SessionState([])
            # a session that failed on its first step may have left its id open on some peer: start over with fresh ids
            state.hops = [
                self._fresh_hop(session, state, h) if session.opened_on else _SessionHop(h, session.session_id) for h in hops
            ]
            with self._lock:
                self._states[session.session_id] = state
        ops, session.pending_ops = session.pending_ops, []
        step = _Step(ops=ops, calls=None, unkept=None if state.history_dropped else layer_calls)
        step.inputs[0] = hidden  # copied by `step.keep()`
        state.steps.append(step)
        t = len(state.steps) - 1
        session.hops = [h.hop for h in state.hops]
        try:
            out = self._run_session_step(session, state, t, layer_calls, attn_implementation, recovery)
        except BaseException:
            self._abandon_step(session, state, t)
            raise
        step.keep()
        self._account(state, session)
        return out

    def _run_session_step(
        self, session: ClientSession, state: _SessionState, t: int, layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None, recovery: _Recovery,
    ) -> torch.Tensor:
        out = None
        k = 0
        push = self.push and self._pushable(state, t)
        while k < len(state.hops):
            shop = state.hops[k]
            try:
                if push:  # once, from the first hop; hops the chain did not reach go on one by one below
                    push = False
                    k, out = self._push_step(session, state, t, layer_calls, attn_implementation)
                    continue
                out = self._sync_hop(session, state, shop, t, layer_calls, attn_implementation)
            except _PeerFailed as failure:
                recovery.failed(str(failure), shop.hop.peer_id)
                self._retire(shop, failure)
                if state.history_dropped and t > 0:
                    raise SessionLost(
                        f"peer {shop.hop.peer_id} (blocks {shop.hop.start}..{shop.hop.end - 1}) failed: {failure}. "
                        + self._lost_reason(session)
                    ) from failure.__cause__
                hops = self._route_with_recovery(shop.hop.start, shop.hop.end, recovery)
                state.hops[k : k + 1] = [self._fresh_hop(session, state, h) for h in hops]
                session.hops = [h.hop for h in state.hops]
                logger.info(
                    "session %s: blocks %d..%d re-routed to %s; replaying %d earlier step(s)", session.session_id,
                    shop.hop.start, shop.hop.end - 1, [(h.peer_id, h.start, h.end) for h in hops], t,
                )
                continue
            k += 1
        return out

    def _lost_reason(self, session: ClientSession) -> str:
        return (
            f"Session {session.session_id}'s replay history was dropped past {self.policy.max_history_bytes} bytes "
            "(RetryPolicy.max_history_bytes / ClientConfig.max_history_bytes), so its keys and values cannot be "
            "rebuilt: start a new session, or raise the limit"
        )

    @staticmethod
    def _fresh_hop(session: ClientSession, state: _SessionState, hop: Hop) -> _SessionHop:
        """A hop that opens a new session on its peer (a fresh id: the peer may hold one of ours already)."""
        return _SessionHop(hop, f"{session.session_id}.{uuid.uuid4().hex[:12]}")

    def _abandon_step(self, session: ClientSession, state: _SessionState, t: int) -> None:
        """Undo step `t` after it failed for good, so the session stays usable if the caller retries.

        Its cache operations go back to the queue; peers that ran it (their caches are one step ahead)
        are dropped from the session: their part is replayed under a fresh session id next time.
        """
        step = state.steps.pop()
        session.pending_ops = step.ops + session.pending_ops
        for i, shop in enumerate(state.hops):
            if shop.synced > t or shop.unsure:
                self._close_quietly(shop.hop.peer_id, shop.session_id, wait=False)
                state.hops[i] = self._fresh_hop(session, state, shop.hop)
        if not state.steps:
            with self._lock:
                self._states.pop(session.session_id, None)

    def _sync_hop(
        self, session: ClientSession, state: _SessionState, shop: _SessionHop, t: int,
        layer_calls: list[tuple[tuple, dict]], attn_implementation: str | None,
    ) -> torch.Tensor:
        """Bring one hop up to step `t` (replaying the steps it has not run) and return its step-`t` output."""
        hop = shop.hop
        out = None
        if shop.synced < t and state.history_dropped:
            raise SessionLost(f"blocks {hop.start}..{hop.end - 1} must be rebuilt on {hop.peer_id}. " + self._lost_reason(session))
        for i in range(shop.synced, t + 1):
            step = state.steps[i]
            calls = layer_calls if i == t else step.calls.expand()
            request = build_step(
                hop, step.inputs[hop.start], calls, session, step.ops, attn_implementation,
                session_id=shop.session_id, new_session=shop.synced == 0, step=i,
                session_key=shop.key if shop.synced == 0 else None,  # opening: later pushed steps will need it
            )
            if i == t and i > 0 and not step.ops:  # the session's next decode step: refilled where it repeats
                out = self._exchange(hop, self._repeat_request(shop, request, attn_implementation, session),
                                     request.hidden.shape, shop.replies.decode)
            else:
                out = self._send(hop, request)
            shop.synced = i + 1
            shop.unsure = False
            if hop.end < self.num_blocks:
                if i < t and hop.end not in step.inputs and not state.history_dropped:
                    state.history_bytes += out.numel() * out.element_size()
                step.inputs[hop.end] = out
            session.opened_on.add(hop.peer_id)
        self.bans.succeeded(hop.peer_id)
        return out

    # ---- pushed steps --------------------------------------------------------------------------------

    @staticmethod
    def _pushable(state: _SessionState, t: int) -> bool:
        """Whether step `t` can be pushed: several hops, none behind (replays go hop by hop), no peer twice in a row
        (a peer does not call itself)."""
        hops = state.hops
        return (
            len(hops) > 1
            and all(h.synced == t for h in hops)
            and all(a.hop.peer_id != b.hop.peer_id for a, b in zip(hops, hops[1:]))
        )

    def _push_step(
        self, session: ClientSession, state: _SessionState, t: int, layer_calls: list[tuple[tuple, dict]],
        attn_implementation: str | None,
    ) -> tuple[int, torch.Tensor | None]:
        """Send step `t` to the first hop, naming the others; each peer forwards to the next (docs/wire.md).

        Returns ``(k, out)``: hops ``[0, k)`` ran the step and their outputs are recorded (the history needs each
        boundary's), `out` is hop ``k - 1``'s. Hops from `k` on did not answer through the chain: the caller goes on
        from there hop by hop (a peer that ran the step anyway answers the repeat from the reply it kept). A step too
        large for one unary message is not pushed (k = 0). The first hop's own error reply counts as that peer's
        failure (`_PeerFailed` / `RemoteError`), exactly as without push.

        With tail delivery (`tail`, and a transport that `collects`), the last peer
        keeps its reply, with every hop's output, and the client collects it from there while the chain answers
        `DELIVERED`: the reply does not travel back through every peer.
        """
        hops, step = state.hops, state.steps[t]
        hidden = step.inputs[0]
        if hidden.numel() * hidden.element_size() * len(hops) > PUSH_MAX_BYTES:  # the nested replies must fit too
            return 0, None
        first, last = hops[0], hops[-1]
        collects = getattr(self.transport, "collects", None)
        tail = self.tail and collects is not None and collects(first.hop.peer_id, last.hop.peer_id)

        def build() -> dict:
            requests = [
                build_step(
                    shop.hop, hidden, layer_calls, session, step.ops, attn_implementation, session_id=shop.session_id,
                    new_session=t == 0, step=t, session_key=shop.key if (i > 0 or t == 0) else None,
                )
                for i, shop in enumerate(hops)
            ]
            for request in requests:
                request.hop_timeout = self.policy.hop_timeout_s
            if tail:
                requests[0].trail, requests[-1].tail = [], True  # each peer adds its output to the trail; the last keeps all
            # the previous peer's output goes in as "hidden"; absent fields read as unset (fewer nodes to walk)
            requests[0].next = link_hops([
                (shop.hop.peer_id, {k: v for k, v in request.to_wire().items() if k != "hidden" and v is not None and v != []})
                for shop, request in zip(hops[1:], requests[1:])
            ])
            return requests[0].to_wire()  # encoded: the hops' shared tensors (rotary, cache ops) travel once

        # a decode step of a running session is the last one's request but for its tensors and step: refilled
        # (swarm.wire.RepeatEncoder) when everything else it is built from is the last step's
        # (layers that share an argument row share its objects: the distinct rows and which layer has which describe
        # them all, at a fraction of the walk)
        tensors = [hidden]
        shape = None
        if t > 0 and not step.ops:
            rows, index = dedupe_calls(layer_calls)
            shape = skeleton(rows, tensors, {id(hidden): 0})
        if shape is None:
            data = encode_message(build())
        else:
            key = (shape, tuple(index),
                   tuple((s.hop.peer_id, s.hop.start, s.hop.end, s.session_id, s.key) for s in hops), tail,
                   attn_implementation, session.max_length, session.cache_class, self.policy.hop_timeout_s)
            data = state.requests.encode(key, tensors, t, build)
        if len(data) > PUSH_MAX_BYTES:
            return 0, None
        for shop in hops:
            shop.unsure = True  # until its output comes back: if the step is abandoned, its session is not trusted
            session.opened_on.add(shop.hop.peer_id)  # it may hold the session now (closed at the end either way)
        timeout = self.policy.hop_timeout_s * len(hops)
        try:
            if tail:
                pushed = self.transport.push(first.hop.peer_id, data, last.hop.peer_id,
                                             CollectRequest(last.session_id, t, timeout), timeout)
                step.keep()  # the step is on its way: copy the caller's arguments while the peers run it
                kind, raw = pushed.first(skip_chain=DELIVERED)
                if kind == "tail":
                    outs = self._delivered(session, state, t, raw, hidden)
                    if outs is not None:
                        self._record_pushed(state, t, outs)
                        return len(hops), outs[-1]
                    raw = pushed.chain()  # the tail did not come: the chain's answer says how far the step went
                    if raw == DELIVERED:  # every hop ran it: hop by hop now, each answers from the reply it kept
                        return 0, None
            else:
                raw = self.transport.step(first.hop.peer_id, data, timeout=timeout)
        except (PeerUnreachable, OSError, TimeoutError) as exc:
            logger.info("pushed step %d of session %s: peer %s: %s: %s; going on hop by hop", t, session.session_id,
                        first.hop.peer_id, type(exc).__name__, exc)
            return 0, None
        return self._unnest(session, state, t, raw, hidden)

    def _delivered(self, session: ClientSession, state: _SessionState, t: int, raw: bytes, hidden: torch.Tensor) -> list | None:
        """The outputs of all the session's hops from the last peer's collected reply, or None (logged) if it is an
        error."""
        n = len(state.hops)
        try:
            reply = state.replies.decode(raw)
            if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
                raise RemoteError("(the last)", str(reply["error"].get("type"))[:64], str(reply["error"].get("message"))[:4096])
            response = StepResponse.from_wire(reply)
            outs = [*(response.trail or []), response.hidden]
            if len(outs) != n:
                raise ProtocolError(f"the collected reply holds {len(outs)} outputs for {n} hops")
            for out in outs:
                if out.shape != hidden.shape:
                    raise ProtocolError(f"returned a hidden state of {tuple(out.shape)} for {tuple(hidden.shape)}")
        except (WireError, ProtocolError, RemoteError) as exc:
            logger.info("pushed step %d of session %s: its last peer's reply could not be collected (%s: %s); reading "
                        "the chain's", t, session.session_id, type(exc).__name__, exc)
            return None
        return outs

    def _record_pushed(self, state: _SessionState, t: int, outs: list) -> None:
        """Hops ``[0, len(outs))`` ran step `t` and gave `outs`: recorded as for hop-by-hop steps."""
        for shop, out in zip(state.hops, outs):
            self._record_hop(state, t, shop, out)

    def _record_hop(self, state: _SessionState, t: int, shop: _SessionHop, out: torch.Tensor) -> None:
        shop.synced, shop.unsure = t + 1, False
        if shop.hop.end < self.num_blocks:
            state.steps[t].inputs[shop.hop.end] = out
        self.bans.succeeded(shop.hop.peer_id)

    def _unnest(self, session: ClientSession, state: _SessionState, t: int, raw: bytes, hidden: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Read the chain's nested replies (`then`): as `_push_step` returns."""
        hops = state.hops
        out = None
        for k, shop in enumerate(hops):
            hop = shop.hop
            try:
                reply = decode_message(raw)
                if k == 0:  # the first hop's own answer: its errors mean what they mean without push
                    raise_if_error(reply, hop.peer_id)
                elif isinstance(reply, dict) and isinstance(reply.get("error"), dict):
                    logger.info("pushed step %d of session %s: peer %s answered through the chain: %s; going on hop by "
                                "hop", t, session.session_id, hop.peer_id, reply["error"].get("message"))
                    return k, out
                response = StepResponse.from_wire(reply)
                if response.hidden.shape != hidden.shape:
                    raise ProtocolError(f"returned a hidden state of {tuple(response.hidden.shape)} for {tuple(hidden.shape)}")
            except RemoteError as exc:  # k == 0
                if not exc.retry:
                    raise
                forgot = exc.kind == "SessionError" and exc.message.startswith("unknown session")
                raise _PeerFailed(hop, str(exc), peer_healthy=forgot) from exc
            except (WireError, ProtocolError) as exc:
                if k == 0:
                    raise _PeerFailed(hop, f"peer {hop.peer_id}: {type(exc).__name__}: {exc}") from exc
                logger.info("pushed step %d of session %s: peer %s answered through the chain with %s: %s; going on hop "
                            "by hop", t, session.session_id, hop.peer_id, type(exc).__name__, exc)
                return k, out
            out = response.hidden
            self._record_hop(state, t, shop, out)
            if k + 1 < len(hops) and response.then is not None:
                raw = response.then
                continue
            if k + 1 < len(hops) and response.then_error is not None:
                try:
                    raise_if_error(response.then_error, hop.peer_id)
                except RemoteError as exc:
                    if not exc.retry:  # the chain entry itself was unusable: any peer would refuse it
                        raise
                    logger.info("pushed step %d of session %s: %s; going on hop by hop", t, session.session_id, exc)
            return k + 1, out  # the whole route, or the chain ended here (e.g. a repeat answered): the rest hop by hop
        return len(hops), out

    def _run_stateless(self, hidden: torch.Tensor, layer_calls: list[tuple[tuple, dict]], attn: str | None) -> torch.Tensor:
        """A step without a cache; a batch is cut into micro-batches kept in flight together along the route,
        so the peers of the route compute at the same time (pipeline parallelism)."""
        parts = self.microbatches
        if parts != 1 and splittable(hidden, layer_calls):
            if parts is None:
                hops = len(self._route_with_recovery(0, self.num_blocks, _Recovery(self.policy.heal_timeout_s)))
                tokens = hidden.shape[1] if hidden.ndim > 2 else 1
                parts = auto_parts(hidden.shape[0], hops, tokens)
            if parts > 1:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="swarm-microbatch")
                futures = [
                    self._pool.submit(self._run_chain, *cut(hidden, layer_calls, a, b), attn)
                    for a, b in microbatch_bounds(hidden.shape[0], parts)
                ]
                return torch.cat([f.result() for f in futures])
        return self._run_chain(hidden, layer_calls, attn)

    def _run_chain(self, hidden: torch.Tensor, layer_calls: list[tuple[tuple, dict]], attn: str | None) -> torch.Tensor:
        recovery = _Recovery(self.policy.heal_timeout_s)
        hops = self._route_with_recovery(0, self.num_blocks, recovery)
        h = hidden
        while hops:
            hop = hops[0]
            try:
                h = self._send(hop, build_step(hop, h, layer_calls, None, [], attn))
            except _PeerFailed as failure:
                recovery.failed(str(failure), hop.peer_id)
                self._ban(hop.peer_id, failure)
                hops = self._route_with_recovery(hop.start, self.num_blocks, recovery)
                continue
            self.bans.succeeded(hop.peer_id)
            hops.pop(0)
        return h

    # ---- one request ---------------------------------------------------------------------------------

    @staticmethod
    def _repeat_request(shop: _SessionHop, request: StepRequest, attn: str | None, session: ClientSession) -> bytes:
        """`request` (a running session's step `request.step` to one hop) encoded, refilled from the hop's last one
        when everything but its tensors and step is the same (`RepeatEncoder`; the key as `_push_step`'s, from the
        distinct argument rows `build_step` already found)."""
        tensors = [request.hidden]
        shape = skeleton(request.calls, tensors, {id(request.hidden): 0})
        if shape is None:
            return encode_message(request.to_wire())
        key = (shape, tuple(request.layer_calls), shop.hop.peer_id, request.start, request.end, shop.session_id, attn,
               session.max_length, session.cache_class)
        return shop.requests.encode(key, tensors, request.step, request.to_wire)

    def _send(self, hop: Hop, request: StepRequest) -> torch.Tensor:
        """Send one request; a failure of the peer raises `_PeerFailed`, the request's own fault `RemoteError`."""
        data = encode_message(request.to_wire())  # TypeError/ValueError here are the caller's: not caught
        return self._exchange(hop, data, request.hidden.shape, decode_message)

    def _exchange(self, hop: Hop, data: bytes, shape: torch.Size, decode: Callable[[bytes], Any]) -> torch.Tensor:
        """`_send` of an encoded request whose hidden state has `shape`; its reply read by `decode`."""
        try:
            try:
                raw = self.transport.step(hop.peer_id, data)
            except ReplyLost as exc:
                logger.info("%s; repeating the request once", exc)
                raw = self.transport.step(hop.peer_id, data)
            reply = decode(raw)
            raise_if_error(reply, hop.peer_id)
            out = StepResponse.from_wire(reply).hidden
        except RemoteError as exc:
            if not exc.retry:
                raise
            # the peer is healthy but no longer holds our session (it expired while we were idle, or the
            # peer restarted): rebuild it there by replay, without avoiding the peer
            forgot = exc.kind == "SessionError" and exc.message.startswith("unknown session")
            raise _PeerFailed(hop, str(exc), peer_healthy=forgot) from exc
        except (PeerUnreachable, OSError, TimeoutError, WireError, ProtocolError) as exc:
            raise _PeerFailed(hop, f"peer {hop.peer_id}: {type(exc).__name__}: {exc}") from exc
        if out.shape != shape:
            raise _PeerFailed(hop, f"peer {hop.peer_id} returned a hidden state of {tuple(out.shape)} for {tuple(shape)}")
        return out

    # ---- failures ------------------------------------------------------------------------------------

    def _ban(self, peer_id: str, failure: "_PeerFailed") -> None:
        length = self.bans.ban(peer_id)
        logger.warning("%s; avoiding this peer for %.1f s", failure, length)
        invalidate = getattr(self.spans, "invalidate", None)
        if invalidate is not None:  # the failure may mean the swarm changed: read it again
            invalidate()

    def _retire(self, shop: _SessionHop, failure: "_PeerFailed") -> None:
        """Ban a failed hop's peer and close its session there, without waiting (it may be dead)."""
        if not failure.peer_healthy:
            self._ban(shop.hop.peer_id, failure)
        if shop.synced or failure.maybe_opened:
            self._close_quietly(shop.hop.peer_id, shop.session_id, wait=False)

    def _route_with_recovery(self, start: int, end: int, recovery: _Recovery) -> list[Hop]:
        """A route for ``[start, end)`` avoiding banned peers, waiting for the swarm to heal if none exists."""
        while True:
            # past the deadline, only peers that have not failed during this step are tried: the number of
            # attempts stays bounded by the number of peers, however often bans expire
            late = recovery.left() <= 0
            exclude = self.bans.active() | (frozenset(recovery.failed_peers) if late else frozenset())
            try:
                return choose_route(self.spans(), self.num_blocks, start=start, end=end, rng=self.rng, exclude=exclude)
            except MissingBlocksError:
                recovery.failed(f"no usable route for blocks {start}..{end - 1}")
                if late or recovery.left() <= 0:
                    raise self._unavailable(start, end, recovery) from None
            except Exception as exc:  # noqa: BLE001 - the directory could not be read: as if empty, until the deadline
                logger.warning("could not read the swarm's peers: %s: %s", type(exc).__name__, exc)
                recovery.failed(f"no usable route for blocks {start}..{end - 1}")
                if late or recovery.left() <= 0:
                    raise self._unavailable(start, end, recovery) from exc
            invalidate = getattr(self.spans, "invalidate", None)
            if invalidate is not None:
                invalidate()
            expiry = self.bans.next_expiry()
            pause = min(self.policy.poll_interval_s, recovery.left(), expiry if expiry is not None else float("inf"))
            time.sleep(max(pause, 0.01))

    def _unavailable(self, start: int, end: int, recovery: _Recovery) -> MissingBlocksError:
        try:
            spans = self.spans()
        except Exception:  # noqa: BLE001 - name the blocks anyway
            spans = []
        uncovered = [(max(a, start), min(b, end)) for a, b in missing_blocks(spans, self.num_blocks) if b > start and a < end]
        waited = f"waited {self.policy.heal_timeout_s:.0f} s for the swarm to heal (RetryPolicy.heal_timeout_s)"
        peer_errors = [e for e in recovery.errors if not e.startswith("no usable route")]
        last = f"; last failures: {'; '.join(peer_errors[-3:])}" if peer_errors else ""
        if uncovered:
            return MissingBlocksError(uncovered, self.num_blocks, detail=waited + last)
        failed = self.bans.active() | recovery.failed_peers
        banned = sorted({s.peer_id for s in spans if s.start < end and s.end > start} & failed)
        return MissingBlocksError(
            [(start, end)], self.num_blocks, served=True,
            detail=f"every peer serving them failed recently ({', '.join(banned) or 'none'}); {waited}{last}",
        )

    def _account(self, state: _SessionState, session: ClientSession) -> None:
        """Drop inputs no current hop needs; drop the whole history past the byte limit."""
        if state.history_dropped:
            state.steps[-1].calls = None
            state.steps[-1].inputs.clear()
            return
        starts = {h.hop.start for h in state.hops}
        step = state.steps[-1]
        for pos in [p for p in step.inputs if p not in starts]:
            del step.inputs[pos]
        state.history_bytes += step.nbytes()
        if state.history_bytes > self.policy.max_history_bytes:
            logger.warning(
                "session %s: replay history passed %d bytes (RetryPolicy.max_history_bytes); a peer failure from now "
                "on ends the session", session.session_id, self.policy.max_history_bytes,
            )
            state.history_dropped = True
            for s in state.steps:
                s.calls = None
                s.inputs.clear()
            state.history_bytes = 0

    # ---- closing -------------------------------------------------------------------------------------

    def close_session(self, session: ClientSession, wait: bool = True) -> None:
        if session.closed:
            return
        session.closed = True
        with self._lock:
            state = self._states.pop(session.session_id, None)
        if state is None:
            targets = [(peer, session.session_id) for peer in session.opened_on]
        else:
            targets = [(h.hop.peer_id, h.session_id) for h in state.hops if h.synced]
        banned = self.bans.active()
        first_error = None
        for peer_id, session_id in targets:
            try:  # a banned peer is likely dead: do not wait for it
                self.transport.close_session(peer_id, session_id, wait=wait and peer_id not in banned)
            except Exception as exc:  # noqa: BLE001 - close the others anyway; peers' session TTL cleans up
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _close_quietly(self, peer_id: str, session_id: str, wait: bool) -> None:
        try:
            self.transport.close_session(peer_id, session_id, wait=wait)
        except Exception as exc:  # noqa: BLE001 - best effort; the peer's session TTL cleans up anyway
            logger.debug("closing session %s on %s failed: %s", session_id, peer_id, exc)


class _PeerFailed(Exception):
    """Internal: one request to one peer failed in a way another peer may not."""

    def __init__(self, hop: Hop, message: str, maybe_opened: bool = True, peer_healthy: bool = False):
        super().__init__(message)
        self.hop = hop
        self.maybe_opened = maybe_opened  # the peer may hold a session for it: close it there
        self.peer_healthy = peer_healthy  # the peer works, it only lost our session: do not ban it
