"""`swarm dht`: a bootstrap DHT node; prints the multiaddrs others pass as --initial-peers."""

from __future__ import annotations

import argparse
import sys
import threading

from cli.common import add_initial_peers, wait_until_stopped


def register(sub) -> None:
    p = sub.add_parser("dht", help="run a bootstrap DHT node and print its addresses")
    add_initial_peers(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    p.add_argument("--announce-maddrs", nargs="*", default=None, help="addresses other machines should dial")
    p.add_argument("--identity-path", default=None, help="key file for a peer id that survives restarts")
    p.add_argument("--relay-hop-limit", type=int, default=0,
                   help="act as a relay for peers behind NAT (a public node; 0: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from swarm.registry import make_dht

    try:
        dht = make_dht(
            args.initial_peers, host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"],
            announce_maddrs=args.announce_maddrs, identity_path=args.identity_path,
            relay_hop_limit=args.relay_hop_limit,
        )
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a hivemind traceback
        from cli.errors import explain

        print(f"error: could not start the DHT node on {args.host}:{args.port}: {explain(exc) or exc}", file=sys.stderr)
        return 1
    maddrs = [str(a) for a in dht.get_visible_maddrs()]
    print("swarm dht ready; pass these to other nodes as --initial-peers:", flush=True)
    for maddr in maddrs:
        print(maddr, flush=True)
    stop = threading.Event()
    wait_until_stopped(stop)
    dht.shutdown()
    return 0
