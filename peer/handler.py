"""Decodes and validates requests, hands them to the runner, encodes the reply.

The transport (hivemind RPC, or a direct call in-process) only moves bytes; this layer turns any
failure into an error reply for the caller, so one bad request never costs the peer its health or
another client its session. Each error reply says whether another peer may succeed (`retry`):

- the request is malformed (`ProtocolError`, `WireError`): ``retry: false``, any peer would refuse it;
- this peer refuses it (`RequestRefused`: range, limits, sessions, KV budget): ``retry: true``;
- the blocks failed on it (anything else, e.g. a shape error deep inside a block or out of memory):
  ``retry: true``, logged here, since it may be this peer's fault.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from peer.runner import BlockRunner
from swarm.chain import FORWARDED_KEYS, PUSH_MAX_BYTES, Delivery, Forward, deliver, plan_ahead, plan_forward, posted
from swarm.protocol import ProtocolError, StepRequest, error_to_wire
from swarm.wire import PENDING, WireError, decode_message, decode_tensor_message, encode_message

logger = logging.getLogger(__name__)

# Errors that are the caller's fault (or a refusal): answered, not logged as a peer problem.
CLIENT_ERRORS = (ProtocolError, WireError)


# a reply's bytes; for a pushed step what to send on first, or for its last hop (tail delivery) what to keep
Reply = bytes | Forward | Delivery


@dataclass
class Prepared:
    """A pushed step that the peer before this one sent ahead of its output (`swarm.chain.plan_ahead`), decoded and
    checked on arrival, while that peer computes; or why it could not be (answered when its hidden state comes)."""

    request: StepRequest | None
    error: BaseException | None
    size: int  # bytes it came in


@dataclass
class Posted:
    """A `Prepared` step with its hidden state come (`encode_message(tensor)` bytes): what the compute queue runs."""

    prepared: Prepared
    hidden: bytes

    def __len__(self) -> int:  # the compute queue estimates a step's time from its bytes
        return self.prepared.size + len(self.hidden)

    def request(self) -> StepRequest:
        """The step, its hidden state in place (in the request and where the trail of outputs refers to it)."""
        if self.prepared.error is not None:
            raise self.prepared.error
        request, self.prepared.request = self.prepared.request, None  # used once
        if request is None:
            raise ProtocolError("this prepared step was already run")
        hidden, raw = decode_tensor_message(self.hidden)
        request.hidden = hidden
        if request.trail:
            request.trail = [raw if t is PENDING else t for t in request.trail]
        return request


class Ahead(Protocol):
    """Sends a pushed step's next request before this peer's blocks run (peer.server, over direct connections)."""

    def send(self, forward: Forward) -> object | None: ...  # a handle to post the output under, or None: not now

    def abandon(self, handle: object) -> None: ...  # the step ended without an output to post


class StepHandler:
    """bytes in, bytes out: the contract every transport of a peer calls. A pushed step's answer is a
    `Forward` instead: the transport sends its request on, then replies with `Forward.reply(...)`; the last
    hop's, with tail delivery, a `Delivery`: the transport keeps it for the client and answers `DELIVERED`."""

    def __init__(self, runner: BlockRunner, ahead: Ahead | None = None):
        self.runner = runner
        self.ahead = ahead  # where a pushed step's next request may go before the blocks run; None: after, as ever
        self.sent_ahead = 0  # next requests sent before the blocks (rpc_info: "sent_ahead")

    def step(self, data: bytes | Posted, owner: str = "local") -> Reply:
        return self.step_many([(data, owner)])[0]

    def prepare(self, data: bytes) -> Prepared:
        """Decode and check a pushed step sent ahead of its hidden state (tensor 0, `Posted` brings it)."""
        try:
            request = StepRequest.from_wire(decode_message(data, raw_keys=FORWARDED_KEYS, hold_first=True))
            if request.hidden is not PENDING:
                raise ProtocolError("a step sent ahead takes its hidden state as tensor 0, which comes later")
            return Prepared(request, None, len(data))
        except Exception as exc:  # noqa: BLE001 - answered when its hidden state comes
            return Prepared(None, exc, len(data))

    def step_many(self, items: list[tuple[bytes | Posted, str]], done: Callable[[int, Reply], None] | None = None) -> list[Reply]:
        """Replies to requests that arrived together (the runner may merge their decode steps into one batch).

        `done(k, reply)` is called as soon as reply k is ready, before the requests after it have run. A lone pushed
        step's next request goes ahead of the blocks where `ahead` takes it; its output follows (`Forward.ahead`).
        """
        replies: list[Reply | None] = [None] * len(items)

        def put(k: int, reply: Reply) -> None:
            replies[k] = reply
            if done is not None:
                done(k, reply)

        decoded: list[tuple[int, StepRequest, str, bool]] = []
        for k, (data, owner) in enumerate(items):
            try:
                # the later hops' part of a pushed step stays undecoded: it is passed on as it came
                if type(data) is Posted:
                    request = data.request()
                else:
                    request = StepRequest.from_wire(decode_message(data, raw_keys=FORWARDED_KEYS))
                decoded.append((k, request, owner, bool(request.next) and len(data) <= PUSH_MAX_BYTES))
            except BaseException as exc:  # noqa: BLE001 - answered to its sender alone
                put(k, _error_reply(exc))

        sent: dict[int, tuple[Forward, object]] = {}  # decoded index -> (the forward planned ahead, its handle)
        if self.ahead is not None and len(decoded) == 1 and decoded[0][3]:
            _, request, owner, _ = decoded[0]
            try:
                forward = plan_ahead(request, owner)
                handle = self.ahead.send(forward) if forward is not None else None
            except Exception:  # noqa: BLE001 - a bug guard: the step goes on as ever, its forward planned after
                logger.exception("sending a pushed step's next request ahead failed")
                handle = None
            if handle is not None:
                sent[0] = (forward, handle)
                self.sent_ahead += 1

        def finished(j: int, result) -> None:
            k, request, owner, pushed = decoded[j]
            ahead = sent.pop(j, None)
            if isinstance(result, BaseException):
                reply = _error_reply(result)
                if request.tail:
                    reply = deliver(request, reply, owner)
            elif ahead is not None:
                try:
                    reply = posted(ahead[0], result.hidden, ahead[1])
                    ahead = None
                except Exception as exc:  # noqa: BLE001
                    reply = _error_reply(exc)
            elif request.tail:
                try:
                    reply = deliver(request, result.hidden, owner)
                except Exception as exc:  # noqa: BLE001
                    reply = deliver(request, _error_reply(exc), owner)
            else:
                try:
                    forward = plan_forward(request, result.hidden, owner) if pushed else None
                    reply = forward if forward is not None else encode_message(result.to_wire())
                except Exception as exc:  # noqa: BLE001
                    reply = _error_reply(exc)
            if ahead is not None:  # no output to post: the next peer drops what it prepared
                self.ahead.abandon(ahead[1])
            put(k, reply)

        if decoded:
            try:
                self.runner.step_many([(req, owner) for _, req, owner, _ in decoded], done=finished)
            finally:
                for _, handle in sent.values():  # a step the runner never finished (a bug): nothing will be posted
                    self.ahead.abandon(handle)
        return replies  # type: ignore[return-value]

    def close_session(self, session_id: str, owner: str = "local") -> bool:
        return self.runner.close_session(session_id, owner)


def _error_reply(exc: BaseException) -> bytes:
    """The error reply for one request; what is not the caller's fault is logged here."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    if isinstance(exc, MemoryError):
        logger.warning("step ran out of memory: %s", exc)
        exc = RuntimeError(f"the peer ran out of memory: {exc}")
    elif not isinstance(exc, CLIENT_ERRORS):
        logger.info("step failed: %s: %s", type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
    return encode_message(error_to_wire(exc))
