"""Heterogeneous peers sized by --max-memory, planned by a coordinator that never becomes a single point of failure.

Real processes: a DHT, two coordinators (one leads, one stands by) and peers started without
--blocks, each capped to room for about 2, 3, 3 and 8 blocks of an 8-block model.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peer.capacity import block_footprint
from swarm import AutoDistributedModelForCausalLM
from swarm.client import SwarmConnection
from swarm.records import model_key
from swarm.registry import get_lease
from swarm.splitting import read_config_json
from tests.processes import SwarmProcesses, wait_until

CACHE_TOKENS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("coord") / "llama8"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def memory_for(model_dir, blocks: int) -> str:
    """--max-memory that fits `blocks` blocks (weights + KV for CACHE_TOKENS) and not one more."""
    fp = block_footprint(LlamaConfig.from_pretrained(model_dir), torch.float32)
    return str(blocks * fp.per_block(CACHE_TOKENS) + fp.per_block(CACHE_TOKENS) // 2)


def start_sized_peer(procs, model_dir, dht, blocks, name):
    return procs.start_peer(
        model_dir, dht, None, "--max-memory", memory_for(model_dir, blocks), "--activation-reserve", "0",
        "--cache-tokens", str(CACHE_TOKENS), "--public-name", name, name=name, wait=False,
    )


def status(procs, dht, model_dir) -> dict:
    result = procs.run_cli("status", str(model_dir), "--initial-peers", dht, "--json")
    models = json.loads(result.stdout)["models"]
    return models[0] if models else {}


def online(st: dict) -> dict[str, dict]:
    return {p["public_name"]: p for p in st.get("peers", []) if p["state"] == "online"}


def generates_like_local(model_dir, dht) -> None:
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=[dht])
    try:
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                           local.generate(prompt, max_new_tokens=8, do_sample=False))
    finally:
        model.swarm_connection.close()


def test_heterogeneous_peers_planned_rebalanced_and_self_planned(model_dir, tmp_path):
    key = model_key(str(model_dir), read_config_json(model_dir))
    with SwarmProcesses(env={"XDG_CACHE_HOME": str(tmp_path)}) as procs:
        dht = procs.start_dht()
        coord_a = procs.spawn("coordinator A", "run-coordinator", str(model_dir), "--initial-peers", dht, "--period", "1", "--lease-ttl", "4")
        a_id = coord_a.wait_for(lambda l: l.startswith("swarm coordinator ready"), 60).split()[-1]
        coord_b = procs.spawn("coordinator B", "run-coordinator", str(model_dir), "--initial-peers", dht, "--period", "1", "--lease-ttl", "4")
        b_id = coord_b.wait_for(lambda l: l.startswith("swarm coordinator ready"), 60).split()[-1]

        sizes = {"p2": 2, "p3a": 3, "p3b": 3, "p8": 8}
        peers = {name: start_sized_peer(procs, model_dir, dht, n, name) for name, n in sizes.items()}
        for proc in peers.values():
            SwarmProcesses.wait_ready(proc, timeout=120)

        # every block covered, ranges within capacity, the big peer holds the most
        st = wait_until(lambda: (s := status(procs, dht, model_dir)) and len(online(s)) == 4 and not s["missing"] and s,
                        60, what="4 online peers covering every block")
        by_name = online(st)
        for name, p in by_name.items():
            start, end = p["blocks"]
            assert p["capacity_blocks"] == sizes[name], (name, p)
            assert end - start <= p["capacity_blocks"], (name, p)
        assert by_name["p8"]["blocks"] == [0, 8]
        conn = SwarmConnection([dht])
        try:
            assert get_lease(conn.dht, key).coordinator_id == a_id  # A started first and leads; B stands by
        finally:
            conn.close()
        generates_like_local(model_dir, dht)

        # the big peer leaves: the plan re-covers its blocks with the small ones (2 + 3 + 3 = 8)
        t0 = time.monotonic()
        peers["p8"].stop(signal.SIGTERM)
        wait_until(lambda: (s := status(procs, dht, model_dir)) and set(online(s)) == {"p2", "p3a", "p3b"}
                   and not s["missing"], 90, what="coverage restored without p8")
        generates_like_local(model_dir, dht)
        recovery_s = time.monotonic() - t0
        print(f"\nre-covered and generating again {recovery_s:.1f} s after the 8-block peer left")
        assert recovery_s < 90

        # a new peer joins: it is given the weakest blocks
        before = status(procs, dht, model_dir)
        weakest = min(range(8), key=lambda b: (before["coverage"][b], b))
        weakest_level = before["coverage"][weakest]
        peers["p2b"] = start_sized_peer(procs, model_dir, dht, 2, "p2b")
        SwarmProcesses.wait_ready(peers["p2b"], timeout=120)
        joined = wait_until(lambda: online(status(procs, dht, model_dir)).get("p2b"), 30, what="p2b online")
        start, end = joined["blocks"]
        assert min(before["coverage"][start:end]) == weakest_level, (before["coverage"], joined["blocks"])

        # the leader dies: the standby takes over
        coord_a.stop(signal.SIGKILL)
        conn = SwarmConnection([dht])
        try:
            wait_until(lambda: (lease := get_lease(conn.dht, key)) is not None and lease.coordinator_id == b_id, 30,
                       what="standby coordinator holding the lease")
        finally:
            conn.close()

        # no coordinator left: peers plan for themselves and still cover the model when one leaves
        coord_b.stop(signal.SIGTERM)
        peers["p2"].stop(signal.SIGTERM)
        wait_until(lambda: (s := status(procs, dht, model_dir)) and set(online(s)) == {"p3a", "p3b", "p2b"}
                   and not s["missing"], 90, what="self-planned coverage without any coordinator")
        generates_like_local(model_dir, dht)
