"""`swarm run-coordinator`: plan which peer serves which blocks; several may run (one leads)."""

from __future__ import annotations

import argparse

from cli.common import add_initial_peers


def register(sub) -> None:
    p = sub.add_parser("run-coordinator", help="assign block ranges to peers (optional; standbys take over)")
    p.add_argument("model", nargs="?", default=None, help="model directory, hub id or model key (default: every model)")
    add_initial_peers(p)
    p.add_argument("--period", type=float, default=5.0, help="seconds between planning rounds")
    p.add_argument("--lease-ttl", type=float, default=15.0, help="seconds a silent leader keeps the lease")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--identity-path", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.status import resolve_models
    from coordinator.service import Coordinator, CoordinatorConfig, run_until_signalled

    models = resolve_models(args.model)
    config = CoordinatorConfig(
        initial_peers=args.initial_peers, models=list(models) if models else [], period_s=args.period,
        lease_ttl_s=args.lease_ttl, host=args.host, port=args.port, identity_path=args.identity_path,
    )
    run_until_signalled(Coordinator(config))
    return 0
