"""swarm: run a transformer model that is too big for any one machine on a swarm of peers.

The package holds what clients and servers share: model splitting, the wire codec, DHT records,
routing and the client session. `peer/`, `coordinator/` and `cli/` build on it.
"""

__version__ = "0.1.0"
