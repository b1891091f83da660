"""Entry point of the `swarm` console command.

Each subcommand lives in its own module under `cli/` and registers itself in `SUBCOMMANDS`
below; this module only builds the parser and dispatches, so `swarm --help` stays cheap
(no torch import until a subcommand runs).
"""

from __future__ import annotations

import argparse
import sys

from swarm import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Peer-to-peer inference swarm for transformer models.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
