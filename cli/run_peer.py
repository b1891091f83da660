"""`swarm run-peer MODEL`: serve a range of the model's blocks.

With `--gpus-per-peer K` this process starts one peer process per group of K GPUs instead (each
sees only its GPUs through CUDA_VISIBLE_DEVICES, handed out by `peer.gpus`), relays their output
with a `[gpu ...]` prefix, and stops them all on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.common import add_initial_peers, check_model_files, parse_blocks


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
    p.add_argument("--direct", default="private", choices=["private", "always", "never"],
                   help="direct TCP connections for steps, ~8x faster than libp2p per hop but unencrypted: accept them "
                        "and use them to peers at loopback/private addresses (private, the default), to any address "
                        "(always), or not at all (never)")
    p.add_argument("--direct-port", type=int, default=0,
                   help="TCP port for direct connections, on --host (0: any free port; with --gpus-per-peer, "
                        "peer i gets P+i)")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="addresses other machines should dial")
    p.add_argument("--use-auto-relay", action="store_true",
                   help="behind NAT without a public address: reach others through relay nodes")
    p.add_argument("--public-name", default="", help="a name shown on the dashboard")
    p.add_argument("--identity-path", default=None, help="key file for a peer id that survives restarts")
    p.add_argument("--announce-period", type=float, default=30.0, help="seconds between DHT refreshes")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; give each peer a share when several run on one host)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="while other sessions are active, a decode step may wait this long (at most one batch's "
                        "compute time) for theirs, to run them as one batch (default: 50; 0: never wait)")
    p.add_argument("--inline-max-ms", type=float, default=50.0,
                   help="a lone session's step expected to take less than this runs on the peer's event loop, "
                        "without the hand-off to its compute thread (default: 50; 0: never)")
    p.add_argument("--linear-kernel", choices=("auto", "torch"), default="auto",
                   help="fp32 CPU linear layers over several rows (merged sessions, prefills): 'auto' runs them on "
                        "oneDNN from the rows where it measures faster at start-up; 'torch': torch's own kernel")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, copy the blocks' weights out of the file map into one region of transparent huge "
                        "pages: decode reads every weight per token, and the copy measured ~9%% faster (default: on)")
    p.add_argument("--attn-implementation", default=None, help="transformers attention implementation")
    p.add_argument("--gpus-per-peer", type=int, default=None, metavar="K",
                   help="multi-GPU host: start one peer process per group of K GPUs (round-robin through "
                        "CUDA_VISIBLE_DEVICES); --port P gives peer i port P+i, --identity-path F gives it F-i")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    problem = check_model_files(args.model)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    if args.gpus_per_peer is not None:
        return run_gpu_peers(args)
    return run_one(args)


def run_one(args: argparse.Namespace) -> int:
    import torch

    from peer.capacity import InsufficientMemory
    from peer.resources import parse_size
    from peer.server import PeerConfig, PeerServer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"error: --device {device}, but torch sees no CUDA GPU (torch {torch.__version__}"
              + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
              + "). Install a CUDA build of torch and check `nvidia-smi`, or use --device cpu", file=sys.stderr, flush=True)
        return 2
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
        batch_wait_ms=args.batch_wait_ms,
        inline_max_ms=args.inline_max_ms,
        linear_kernel=args.linear_kernel,
        huge_pages=args.huge_pages,
        direct=args.direct,
        direct_port=args.direct_port,
        use_auto_relay=args.use_auto_relay,
    )
    try:
        PeerServer(config).run()
    except InsufficientMemory as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---- one peer per GPU group -------------------------------------------------------------------------------

FORWARDED_OPTIONS = [  # (argparse dest, flag) of every option a child peer gets as given
    ("device", "--device"), ("dtype", "--dtype"), ("max_memory", "--max-memory"), ("cache_tokens", "--cache-tokens"),
    ("activation_reserve", "--activation-reserve"), ("host", "--host"), ("announce_period", "--announce-period"),
    ("num_threads", "--num-threads"), ("attn_implementation", "--attn-implementation"),
    ("batch_wait_ms", "--batch-wait-ms"), ("inline_max_ms", "--inline-max-ms"), ("linear_kernel", "--linear-kernel"),
    ("direct", "--direct"),
]


def peer_argv(args: argparse.Namespace, index: int, gpus: list[str]) -> list[str]:
    """`swarm run-peer` arguments of the peer for GPU group `index` (without --gpus-per-peer)."""
    argv = ["run-peer", args.model, "--initial-peers", *args.initial_peers]
    if args.blocks is not None:
        argv += ["--blocks", f"{args.blocks[0]}:{args.blocks[1]}"]
    for dest, flag in FORWARDED_OPTIONS:
        value = getattr(args, dest)
        if value is not None:
            argv += [flag, str(value)]
    if args.port:
        argv += ["--port", str(args.port + index)]
    if args.direct_port:
        argv += ["--direct-port", str(args.direct_port + index)]
    if args.announce_maddrs:
        argv += ["--announce-maddrs", *(_shift_port(m, index) for m in args.announce_maddrs)]
    if args.use_auto_relay:
        argv.append("--use-auto-relay")
    if not args.huge_pages:
        argv.append("--no-huge-pages")
    name = f"{args.public_name}-gpu{'+'.join(gpus)}" if args.public_name else f"gpu{'+'.join(gpus)}"
    argv += ["--public-name", name[:64]]
    if args.identity_path:
        path = Path(args.identity_path)
        argv += ["--identity-path", str(path.with_name(f"{path.stem}-{index}{path.suffix}"))]
    return argv


def _shift_port(maddr: str, index: int) -> str:
    """/ip4/X/tcp/P -> /ip4/X/tcp/P+index: each peer announces its own port."""
    parts = maddr.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("tcp", "udp") and parts[i + 1].isdigit():
            parts[i + 1] = str(int(parts[i + 1]) + index)
    return "/".join(parts)


def run_gpu_peers(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cli.children import Children
    from peer.gpus import GpuAssignmentError, assign_gpus, unused_gpus, visible_gpus

    if args.device is not None and not args.device.startswith("cuda"):
        print(f"error: --gpus-per-peer hands out GPUs, but --device is {args.device}; leave --device out", file=sys.stderr)
        return 2
    import torch

    gpus = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    try:
        groups = assign_gpus(gpus, args.gpus_per_peer)
    except GpuAssignmentError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"swarm run-peer: {len(groups)} peer process{'es' * (len(groups) != 1)} on GPUs "
          + "; ".join(",".join(g) for g in groups), flush=True)
    left = unused_gpus(gpus, groups)
    if left:
        print(f"note: GPU {','.join(left)} is left unused ({len(gpus)} GPUs are not a multiple of {args.gpus_per_peer})",
              flush=True)
    if args.gpus_per_peer > 1:
        print("note: a peer runs its blocks on the first GPU of its group today; the others only reserve room",
              flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failed = False
    with Children(log_dir=None, echo=True, verbose=args.verbose) as children:
        for i, group in enumerate(groups):
            child_args = peer_argv(args, i, group)
            if args.device is None:
                child_args += ["--device", "cuda"]
            children.spawn(f"gpu {','.join(group)}", *child_args, env={"CUDA_VISIBLE_DEVICES": ",".join(group)})
        running = list(children.children)
        while running and not stop.wait(0.5):
            for child in [c for c in running if not c.alive]:
                running.remove(child)
                code = child.popen.returncode
                if code:
                    failed = True
                    print(f"[{child.name}] exited with code {code}", file=sys.stderr, flush=True)
    return 1 if failed else 0
