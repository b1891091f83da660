"""`swarm run-peer MODEL`: serve a range of the model's blocks."""

from __future__ import annotations

import argparse
import sys

from cli.common import add_initial_peers, parse_blocks


def register(sub) -> None:
    p = sub.add_parser("run-peer", help="lend this device: serve a range of a model's blocks")
    p.add_argument("model", help="model directory or hub id")
    add_initial_peers(p)
    p.add_argument("--blocks", type=parse_blocks, default=None, metavar="START:END",
                   help="serve exactly blocks [START, END) (default: the coordinator's plan, or the peers' own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--max-memory", default=None, help="cap on memory this peer uses, e.g. 12GiB")
    p.add_argument("--cache-tokens", type=int, default=8192,
                   help="KV-cache budget in tokens (sequences x length) to reserve memory for (default: 8192)")
    p.add_argument("--activation-reserve", default="256MiB", help="memory kept free for activations (default: 256MiB)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="addresses other machines should dial")
    p.add_argument("--use-auto-relay", action="store_true",
                   help="behind NAT without a public address: reach others through relay nodes")
    p.add_argument("--public-name", default="", help="a name shown on the dashboard")
    p.add_argument("--identity-path", default=None, help="key file for a peer id that survives restarts")
    p.add_argument("--announce-period", type=float, default=30.0, help="seconds between DHT refreshes")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; give each peer a share when several run on one host)")
    p.add_argument("--attn-implementation", default=None, help="transformers attention implementation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from peer.capacity import InsufficientMemory
    from peer.resources import parse_size
    from peer.server import PeerConfig, PeerServer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    config = PeerConfig(
        model=args.model,
        initial_peers=args.initial_peers,
        blocks=args.blocks,
        device=device,
        dtype=dtype,
        max_memory=parse_size(args.max_memory) if args.max_memory else None,
        cache_tokens=args.cache_tokens,
        activation_reserve=parse_size(args.activation_reserve),
        host=args.host,
        port=args.port,
        announce_maddrs=args.announce_maddrs,
        public_name=args.public_name,
        identity_path=args.identity_path,
        announce_period_s=args.announce_period,
        attn_implementation=args.attn_implementation,
        num_threads=args.num_threads,
        use_auto_relay=args.use_auto_relay,
    )
    try:
        PeerServer(config).run()
    except InsufficientMemory as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
