"""Argument helpers and the wait-for-Ctrl-C loop shared by subcommands."""

from __future__ import annotations

import argparse
import signal
import threading


def add_initial_peers(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers", nargs="+", required=required, default=[], metavar="MULTIADDR", type=parse_initial_peer,
        help="multiaddrs of running swarm nodes, as `swarm dht` prints them (/ip4/.../tcp/.../p2p/...)",
    )


def parse_initial_peer(text: str) -> str:
    """Checks an --initial-peers address before anything starts (a typo otherwise surfaces as a daemon crash)."""
    from hivemind.utils.multiaddr import Multiaddr

    example = "/ip4/203.0.113.7/tcp/31337/p2p/QmXyz... (copy it from the output of `swarm dht`)"
    try:
        maddr = Multiaddr(text.strip())
    except Exception as exc:  # noqa: BLE001 - the multiaddr library raises several kinds
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiaddr ({exc}); expected e.g. {example}") from None
    if "p2p" not in [p.name for p in maddr.protocols()]:
        raise argparse.ArgumentTypeError(f"{text!r} lacks the /p2p/PEER_ID part that names the node; expected e.g. {example}")
    return str(maddr)


def check_model_files(model: str, need_weights: bool = True) -> str | None:
    """Why a local model directory cannot work (None if it looks fine, or if `model` is a hub id).

    Checked before joining the swarm, so a typo in a path fails at once instead of as a hub lookup.
    """
    from pathlib import Path

    from swarm.records import public_model_name

    path = Path(model).expanduser()
    looks_local = path.exists() or public_model_name(model) != model.strip().rstrip("/\\") or model.startswith("~")
    if not looks_local:
        return None  # a hub id such as org/name: transformers resolves it
    if not path.is_dir():
        return (f"model directory {model} does not exist. Pass a directory holding config.json and the weights "
                "(*.safetensors), or a hub id (org/name)")
    if not (path / "config.json").is_file():
        return f"{model} has no config.json: is it a model directory? (a model saved with save_pretrained has one)"
    if need_weights and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return f"{model} has no weights (*.safetensors or *.bin next to config.json): copy them from the original model"
    return None


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (e.g. 0:8), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def wait_until_stopped(stop: threading.Event | None = None, poll_s: float = 0.5) -> None:
    """Block the main thread until `stop` is set (by the SIGINT/SIGTERM handlers installed here) or, with
    `stop=None`, until Ctrl-C raises KeyboardInterrupt.

    It polls rather than waiting once without a timeout: the kernel may deliver a process-wide signal to
    any thread, and CPython runs Python-level handlers only in the main thread, between bytecodes. An
    untimed wait on a lock in the main thread is only woken if the signal happens to land on that thread,
    so a command with busy helper threads could sleep through Ctrl-C.
    """
    if stop is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    event = stop or threading.Event()
    while not event.wait(poll_s):
        pass
