"""Decodes and validates requests, hands them to the runner, encodes the reply.

The transport (hivemind RPC, or a direct call in-process) only moves bytes; this layer turns any
failure caused by the request into an error reply for the caller, so one bad request never costs
the peer its health or another client its session.
"""

from __future__ import annotations

import logging

from peer.runner import BlockRunner
from swarm.protocol import ProtocolError, StepRequest, error_to_wire
from swarm.wire import WireError, decode_message, encode_message

logger = logging.getLogger(__name__)

# Errors that are the caller's fault (or a refusal); anything else is logged as a peer bug.
CLIENT_ERRORS = (ProtocolError, WireError, TypeError, ValueError, IndexError)


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
        except RuntimeError as exc:  # e.g. shape mismatch deep inside a block: still the request's fault
            logger.info("step failed: %s", exc)
            return encode_message(error_to_wire(exc))

    def close_session(self, session_id: str, owner: str = "local") -> bool:
        return self.runner.close_session(session_id, owner)
