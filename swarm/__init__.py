"""swarm: run a transformer model that is too big for any one machine on a swarm of peers.

The package holds what clients and servers share: model splitting, the wire codec, DHT records,
routing and the client session. `peer/`, `coordinator/` and `cli/` build on it.

    from swarm import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])
"""

__version__ = "0.1.0"

_LAZY = {
    "AutoDistributedModelForCausalLM": "swarm.client",
    "AutoDistributedModel": "swarm.client",
    "ClientConfig": "swarm.client",
}


def __getattr__(name: str):
    # lazy, so `swarm --version` and `import swarm` stay cheap (no torch import)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
