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
from typing import Callable

from peer.runner import BlockRunner
from peer.steady import SteadySteps
from swarm.chain import PUSH_MAX_BYTES, Delivery, Forward, deliver, plan_forward
from swarm.protocol import ProtocolError, StepRequest, error_to_wire
from swarm.wire import WireError, encode_message

logger = logging.getLogger(__name__)

# Errors that are the caller's fault (or a refusal): answered, not logged as a peer problem.
CLIENT_ERRORS = (ProtocolError, WireError)


# a reply's bytes; for a pushed step what to send on first, or for its last hop (tail delivery) what to keep
Reply = bytes | Forward | Delivery


class StepHandler:
    """bytes in, bytes out: the contract every transport of a peer calls. A pushed step's answer is a
    `Forward` instead: the transport sends its request on, then replies with `Forward.reply(...)`; the last
    hop's, with tail delivery, a `Delivery`: the transport keeps it for the client and answers `DELIVERED`."""

    def __init__(self, runner: BlockRunner):
        self.runner = runner
        self.steady = SteadySteps()  # a session's next decode step refilled from its last one (peer.steady)

    def step(self, data: bytes, owner: str = "local") -> Reply:
        return self.step_many([(data, owner)])[0]

    def step_many(self, items: list[tuple[bytes, str]], done: Callable[[int, Reply], None] | None = None) -> list[Reply]:
        """Replies to requests that arrived together (the runner may merge their decode steps into one batch).

        `done(k, reply)` is called as soon as reply k is ready, before the requests after it have run.
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
                request = self.steady.decode(data, owner)
                decoded.append((k, request, owner, bool(request.next) and len(data) <= PUSH_MAX_BYTES))
            except BaseException as exc:  # noqa: BLE001 - answered to its sender alone
                put(k, _error_reply(exc))

        def finished(j: int, result) -> None:
            k, request, owner, pushed = decoded[j]
            if isinstance(result, BaseException):
                reply = _error_reply(result)
                if request.tail:
                    reply = deliver(request, reply, owner)
            elif request.tail:
                try:  # a refilled step's reply is put together from what the first one's taught (peer.steady)
                    reply = self.steady.deliver(request, result.hidden, owner)
                    if reply is None:
                        reply = deliver(request, result.hidden, owner)
                        self.steady.learn(request, reply.data)
                except Exception as exc:  # noqa: BLE001
                    reply = deliver(request, _error_reply(exc), owner)
            else:
                try:
                    if pushed:
                        forward = self.steady.forward(request, result.hidden)
                        if forward is None:
                            forward = plan_forward(request, result.hidden, owner)
                            if forward is not None and forward.request is not None:
                                self.steady.learn(request, forward.request)
                        reply = forward if forward is not None else encode_message(result.to_wire())
                    else:  # this step's own reply: refilled where its framing was learnt (peer.steady)
                        reply = self.steady.reply(request, result.hidden)
                        if reply is None:
                            reply = encode_message(result.to_wire())
                            self.steady.learn(request, reply, reply=True)
                except Exception as exc:  # noqa: BLE001
                    reply = _error_reply(exc)
            put(k, reply)

        if decoded:
            try:
                self.runner.step_many([(req, owner) for _, req, owner, _ in decoded], done=finished)
            finally:
                for _, request, _, _ in decoded:
                    self.steady.settle(request)
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
