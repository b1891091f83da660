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

from peer.runner import BlockRunner
from swarm.protocol import ProtocolError, StepRequest, error_to_wire
from swarm.wire import WireError, decode_message, encode_message

logger = logging.getLogger(__name__)

# Errors that are the caller's fault (or a refusal): answered, not logged as a peer problem.
CLIENT_ERRORS = (ProtocolError, WireError)


class StepHandler:
    """bytes in, bytes out: the contract every transport of a peer calls."""

    def __init__(self, runner: BlockRunner):
        self.runner = runner

    def step(self, data: bytes, owner: str = "local") -> bytes:
        try:
            request = StepRequest.from_wire(decode_message(data))
            response = self.runner.step(request, owner=owner)
            return encode_message(response.to_wire())
        except CLIENT_ERRORS as exc:
            return encode_message(error_to_wire(exc))
        except MemoryError as exc:
            logger.warning("step ran out of memory: %s", exc)
            return encode_message(error_to_wire(RuntimeError(f"the peer ran out of memory: {exc}")))
        except Exception as exc:  # noqa: BLE001 - the boundary: whatever the blocks raise becomes a reply
            logger.info("step failed: %s: %s", type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            return encode_message(error_to_wire(exc))

    def close_session(self, session_id: str, owner: str = "local") -> bool:
        return self.runner.close_session(session_id, owner)
