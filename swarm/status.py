"""The state of a swarm as one JSON-ready dict: what `swarm status --json` prints and the dashboard serves.

The shape is stable (documented in docs/cli.md); new fields may be added, none removed or renamed.
"""

from __future__ import annotations

from hivemind.utils import get_dht_time

from swarm.health import model_health
from swarm.records import PeerRecord

STATUS_VERSION = 1


def peer_entry(r: PeerRecord, now: float) -> dict:
    return {
        "peer_id": r.peer_id,
        "public_name": r.public_name,
        "state": r.state,
        "blocks": list(r.blocks) if r.blocks else None,
        "device_kind": r.device_kind,
        "device_name": r.device_name,
        "dtype": r.dtype,
        "free_memory_bytes": r.free_memory_bytes,
        "total_memory_bytes": r.total_memory_bytes,
        "capacity_blocks": r.capacity_blocks,
        "throughput": r.throughput,
        "free_cache_tokens": r.free_cache_tokens,
        "active_sessions": r.active_sessions,
        "software_version": r.software_version,
        "last_seen_s": round(max(0.0, now - r.updated_at), 1),
    }


def model_status(model_key: str, model_name: str | None, records: dict[str, PeerRecord], num_blocks: int | None) -> dict:
    if num_blocks is None:
        num_blocks = max((r.num_blocks for r in records.values()), default=0)
    health = model_health(records.values(), num_blocks)
    now = get_dht_time()
    return {
        "model_key": model_key,
        "model_name": model_name,
        "num_blocks": num_blocks,
        "health": health.verdict if num_blocks else "broken",
        "coverage": health.coverage,
        "missing": [list(m) for m in health.missing],
        "peers": [peer_entry(r, now) for r in sorted(records.values(), key=lambda r: (r.start_block or 0, r.peer_id))],
    }


def collect_status(dht, models: dict[str, str | None] | None = None) -> dict:
    """`models`: model key -> name (None: every model in the DHT's model index)."""
    from swarm.registry import get_peers, list_models

    index = list_models(dht)
    if models is None:
        models = {key: entry.model_name for key, entry in index.items()}
    result = []
    for key, name in sorted(models.items()):
        entry = index.get(key)
        result.append(model_status(key, name or (entry.model_name if entry else None), get_peers(dht, key),
                                   entry.num_blocks if entry else None))
    return {"version": STATUS_VERSION, "models": result}
