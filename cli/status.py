"""`swarm status`: which blocks are served by whom, and a health verdict."""

from __future__ import annotations

import argparse
import json

from cli.common import add_initial_peers


def register(sub) -> None:
    p = sub.add_parser("status", help="show block coverage, peers and health")
    p.add_argument("model", nargs="?", default=None, help="model directory, hub id or model key (default: all models)")
    add_initial_peers(p)
    p.add_argument("--json", action="store_true", help="print the stable JSON form (see docs/cli.md)")
    p.set_defaults(func=run)


def resolve_models(model: str | None) -> dict[str, str | None] | None:
    from swarm.records import is_model_key, model_key
    from swarm.splitting import read_config_json

    if model is None:
        return None
    if is_model_key(model):
        return {model: None}
    from cli.common import check_model_files
    from cli.errors import UsageError

    problem = check_model_files(model, need_weights=False)
    if problem:
        raise UsageError(problem)
    return {model_key(model, read_config_json(model)): model}


def run(args: argparse.Namespace) -> int:
    from swarm.client import SwarmConnection
    from swarm.status import collect_status

    models = resolve_models(args.model)
    conn = SwarmConnection(args.initial_peers)
    try:
        status = collect_status(conn.dht, models)
    finally:
        conn.close()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    broken = any(m["health"] == "broken" for m in status["models"]) or not status["models"]
    return 1 if broken else 0


def render(status: dict) -> str:
    if not status["models"]:
        return "no models are being served in this swarm"
    lines = []
    for m in status["models"]:
        lines.append(f"{m['model_name'] or m['model_key']}  [{m['model_key']}]  {m['num_blocks']} blocks  -> {m['health'].upper()}")
        strip = "".join(str(min(c, 9)) for c in m["coverage"])
        lines.append(f"  replicas per block: {strip}")
        if m["missing"]:
            lines.append("  missing blocks: " + ", ".join(f"{s}..{e - 1}" for s, e in m["missing"]))
        for p in m["peers"]:
            blocks = f"{p['blocks'][0]}:{p['blocks'][1]}" if p["blocks"] else "-"
            name = f" ({p['public_name']})" if p["public_name"] else ""
            lines.append(f"  {p['peer_id'][-8:]}{name:<12} {p['state']:<9} blocks {blocks:<8} {p['device_kind']}/{p['dtype']:<9}"
                         f" sessions {p['active_sessions']:<3} seen {p['last_seen_s']}s ago")
    return "\n".join(lines)
