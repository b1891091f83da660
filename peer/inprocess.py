"""Peers inside the calling process: the split demo and the splitting tests use these."""

from __future__ import annotations

from pathlib import Path

import torch

from peer.handler import StepHandler
from peer.loader import load_blocks
from peer.runner import BlockRunner, RunnerLimits
from swarm.local import LocalPeer


def start_local_peers(
    model_name_or_path: str | Path,
    ranges: list[tuple[int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    limits: RunnerLimits = RunnerLimits(),
) -> list[LocalPeer]:
    """One in-process peer per ``(start, end)`` range, each loading only its own blocks."""
    peers = []
    for i, (start, end) in enumerate(ranges):
        loaded = load_blocks(model_name_or_path, start, end, dtype=dtype, attn_implementation=attn_implementation)
        peers.append(LocalPeer(f"local-{i}", start, end, StepHandler(BlockRunner(loaded, limits))))
    return peers
