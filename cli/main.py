"""Entry point of the `swarm` console command.

Each subcommand lives in its own module under `cli/` with a `register(subparsers)` function;
this module only builds the parser and dispatches, so `swarm --help` stays cheap (no torch
import until a subcommand runs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from swarm import __version__

SUBCOMMANDS = ["cli.demo", "cli.dht", "cli.run_peer", "cli.run_coordinator", "cli.status", "cli.generate", "cli.dashboard"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Peer-to-peer inference swarm for transformer models.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more logs (debug level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a in ("-v", "--verbose") for a in argv):
        _quiet_third_party_logs()  # before anything imports hivemind (parsing --initial-peers does)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - known user errors become one line; anything else is re-raised
        from cli.errors import explain

        message = explain(exc)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1


def _quiet_third_party_logs() -> None:
    """hivemind logs INFO lines through its own handler; by default only warnings and errors are useful."""
    import os

    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


if __name__ == "__main__":
    sys.exit(main())
