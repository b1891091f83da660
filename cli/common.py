"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse


def add_initial_peers(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers", nargs="+", required=required, default=[], metavar="MULTIADDR",
        help="multiaddrs of running swarm nodes, as `swarm dht` prints them (/ip4/.../tcp/.../p2p/...)",
    )


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (e.g. 0:8), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end
