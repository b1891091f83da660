"""The errors a newcomer is likely to hit, turned into one line that says what happened and what to do.

`cli.main` catches an exception from a subcommand, asks `explain()` for a message, and prints
`error: <message>` instead of a traceback (`-v` prints the traceback too). Exceptions that are not
recognised here propagate unchanged: a bug should still look like a bug.

Recognised, by walking the exception and its causes:
- the p2p daemon could not start: a busy port, an unparsable or unreachable --initial-peers address;
- `ConnectionError` raised by the client when it cannot join the swarm (already worded for users);
- `InsufficientMemory` (peer sizing; already carries the numbers and the fix);
- a model that is neither a local directory with a config.json and weights nor a reachable hub id;
- `SplittingError` (a model the splitter cannot handle, a block range outside the model);
- `MissingBlocksError` (the client found no peer for some blocks, even after waiting for the swarm to heal).
"""

from __future__ import annotations

import re

INITIAL_PEERS_HINT = ("Pass the addresses `swarm dht` printed (/ip4/HOST/tcp/PORT/p2p/PEER_ID), check that that node is "
                      "still running and that this machine can reach HOST:PORT (docs/troubleshooting.md)")


class UsageError(Exception):
    """A mistake in the command line found by our own checks; its message is the whole explanation."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def explain(exc: BaseException) -> str | None:
    """A user-facing message for `exc`, or None when it is not a known user error."""
    for e in _chain(exc):
        message = _explain_one(e)
        if message is not None:
            return message
    return None


def _explain_one(e: BaseException) -> str | None:
    name = type(e).__name__
    text = str(e)
    if isinstance(e, UsageError):
        return text
    if name == "P2PDaemonError" or "Daemon failed to start" in text:
        return explain_daemon_failure(text)
    if name == "InsufficientMemory":
        return f"not enough memory: this peer {text}"
    if isinstance(e, ConnectionError) and "could not join the swarm" in text:
        return text if "docs/troubleshooting.md" in text else f"{text} (docs/troubleshooting.md)"
    if name == "SplittingError":
        return text
    if name == "MissingBlocksError":
        return f"{text}. `swarm status --initial-peers ...` shows which peers serve which blocks"
    if isinstance(e, OSError):
        return explain_model_error(text)
    return None


def explain_daemon_failure(text: str) -> str:
    """hivemind's p2p daemon refused to start: say why in our words."""
    detail = text.split("Daemon failed to start:", 1)[-1].strip()
    detail = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", detail)  # the daemon's own timestamp
    if "address already in use" in detail:
        where = re.search(r"listen tcp\d? ([^:\s]+:\d+)", detail)
        port = where.group(1) if where else "the requested port"
        return (f"port in use: another program already listens on {port}. Stop it (`ss -ltnp` shows which one), "
                "or pick another --port (--port 0 takes any free one)")
    if "failed to parse multiaddr" in detail:
        return f"bad --initial-peers address ({detail}). {INITIAL_PEERS_HINT}"
    if "failed to connect to bootstrap peers" in detail:
        return f"could not reach any of the --initial-peers. {INITIAL_PEERS_HINT}"
    if "p2pd binary" in detail:
        return f"{detail}. Reinstall hivemind (pip install --force-reinstall hivemind==1.1.12)"
    return f"the p2p daemon could not start: {detail}"


def explain_model_error(text: str) -> str | None:
    """transformers could not find or fetch a model's files."""
    markers = (
        "is not a local folder", "Repo id must", "does not appear to have a file named", "no file named",
        "couldn't connect to", "not a valid model identifier", "Incorrect path_or_model_id", "has no config.json",
    )
    if not any(m in text for m in markers):
        return None
    first = text.strip().splitlines()[0].rstrip(".")
    return (f"model files not found: {first}. MODEL must be a local directory holding config.json and the weights "
            "(*.safetensors), or a hub id (org/name) this machine can download; every peer and client needs the same "
            "files")
