"""Sessions whose client goes quiet expire on the peer (memory comes back); a client that returns recovers."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from peer.inprocess import start_local_peers
from peer.runner import RunnerLimits
from swarm.client import DistributedModelMixin
from swarm.local import local_router
from swarm.model import load_client_model
from tests.tiny_models import save_tiny


def test_idle_sessions_expire_and_the_client_rebuilds_its_cache(tmp_path):
    path = save_tiny("llama", tmp_path)
    peers = start_local_peers(path, [(0, 3), (3, 6)], limits=RunnerLimits(session_ttl_s=0.5))
    split = load_client_model(path, lambda layout, cfg: local_router(peers, layout.num_blocks, seed=0),
                              auto_class=AutoModelForCausalLM, mixin=DistributedModelMixin)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([[7, 3, 9, 1]])
    with split.inference_session(max_length=32):
        first = split.generate(prompt, max_new_tokens=4, do_sample=False)
        assert [p.handler.runner.num_sessions for p in peers] == [1, 1]
        free_before = [p.handler.runner.free_cache_tokens for p in peers]
        time.sleep(0.7)  # the client goes quiet for longer than the peers' session TTL
        for p in peers:
            p.handler.runner.expire_sessions()
        assert [p.handler.runner.num_sessions for p in peers] == [0, 0]
        assert all(p.handler.runner.free_cache_tokens > f for p, f in zip(peers, free_before))
        # the client comes back: its history is replayed onto fresh sessions, the tokens stay right
        second = split.generate(first, max_new_tokens=4, do_sample=False)
    assert torch.equal(second, local.generate(prompt, max_new_tokens=8, do_sample=False))
