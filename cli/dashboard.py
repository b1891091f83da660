"""`swarm dashboard`: a live web page of a swarm's peers, block coverage and health."""

from __future__ import annotations

import argparse
import threading

from cli.common import add_initial_peers, wait_until_stopped


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="serve a live web page of peers, block coverage and health")
    p.add_argument("model", nargs="?", default=None, help="model directory, hub id or model key (default: all models)")
    add_initial_peers(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    p.add_argument("--refresh", type=float, default=1.5, metavar="SECONDS",
                   help="how long one read of the DHT is served to every viewer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cli.status import resolve_models
    from swarm.dashboard.server import Dashboard, DashboardConfig, DashboardError

    if args.refresh <= 0:
        print(f"error: --refresh must be > 0 seconds, got {args.refresh}")
        return 2
    config = DashboardConfig(
        initial_peers=args.initial_peers,
        models=resolve_models(args.model),
        host=args.host,
        port=args.port,
        refresh_s=args.refresh,
    )
    try:
        dashboard = Dashboard(config)
    except DashboardError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    stop = threading.Event()
    with dashboard:
        dashboard.start()
        print(f"swarm dashboard serving {dashboard.url} (JSON: {dashboard.url}api/state, "
              f"Prometheus: {dashboard.url}metrics); Ctrl-C to stop", flush=True)
        wait_until_stopped(stop)
    return 0
