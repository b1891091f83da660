"""Peer sizing: block bytes from the meta skeleton, capacity, clear shortage errors, cached throughput."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from peer.capacity import block_footprint, capacity_blocks, kv_bytes_per_token, shortage_message
from peer.loader import load_blocks
from peer.resources import parse_size, probe_device
from peer.throughput import cached_or_measure, measure
from swarm.splitting import block_bytes
from tests.tiny_models import save_tiny


def test_footprint_matches_loaded_block(tmp_path):
    path = save_tiny("llama", tmp_path)
    config = LlamaConfig.from_pretrained(path)
    fp = block_footprint(config, torch.float16)
    loaded = load_blocks(path, 2, 3, dtype=torch.float16)
    assert fp.weight_bytes == block_bytes(loaded.blocks[0]) > 0
    assert fp.num_blocks == 6
    # 2 (k and v) x 2 kv heads x head_dim 16 x 2 bytes
    assert kv_bytes_per_token(config, torch.float16) == 2 * 2 * 16 * 2


def test_capacity_and_shortage_message(tmp_path):
    config = LlamaConfig.from_pretrained(save_tiny("llama", tmp_path))
    fp = block_footprint(config, torch.float32)
    per_block = fp.per_block(1024)
    assert capacity_blocks(3 * per_block + 100 + 7, fp, 1024, activation_reserve=100) == 3
    assert capacity_blocks(50 * per_block, fp, 1024, activation_reserve=0) == fp.num_blocks  # capped at the model
    assert capacity_blocks(99, fp, 1024, activation_reserve=100) == 0
    message = shortage_message(2, 12345, fp, 1024, 100, "float32")
    assert "for 2 blocks at float32" in message and "GiB free" in message and "KV cache for 1024 tokens" in message


def test_parse_size_and_probe():
    assert parse_size("12GiB") == 12 * 2**30 and parse_size("512MB") == 512 * 2**20 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")
    mem = probe_device("cpu", max_memory=2**20)
    assert mem.kind == "cpu" and mem.free_bytes == 2**20 and mem.total_bytes > 2**20


def test_throughput_is_measured_once_then_cached(tmp_path):
    path = save_tiny("llama", tmp_path)
    block = load_blocks(path, 0, 1).blocks[0]
    direct = measure(block, torch.device("cpu"), torch.float32, repeats=2)
    assert 0 < direct.decode < float("inf") and 0 < direct.prefill < float("inf")  # figures, not a timing test
    calls = []

    def factory():
        calls.append(1)
        return block

    first = cached_or_measure("k", factory, torch.device("cpu"), torch.float32, cache_dir=tmp_path, progress=False)
    second = cached_or_measure("k", factory, torch.device("cpu"), torch.float32, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and first == second
