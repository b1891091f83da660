"""How fast this peer runs one block: decode and prefill tokens/s, measured once and cached on disk.

The measurement multiplies inputs by every weight matrix of one real block, at the peer's device and
dtype: the work that dominates a block's step (attention scores over a short context are small next
to it). That needs no knowledge of the block's call signature, so it works for any architecture.
Decode runs 1 token (memory-bound, like serving one sequence); prefill runs `prefill_tokens`.

Results are cached per (model key, device name, dtype) in a JSON file, so a restart is instant.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    decode: float  # tokens/s through one block, batch 1
    prefill: float  # tokens/s through one block, `prefill_tokens` at once


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm"


def measure(block: nn.Module, device: torch.device, dtype: torch.dtype, prefill_tokens: int = 128,
            repeats: int = 5, progress: bool = False) -> Throughput:
    weights = [p for p in block.parameters() if p.ndim == 2]
    if not weights:
        raise ValueError("block has no weight matrices to measure")

    def one_pass(tokens: int) -> float:
        inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], device=device, dtype=dtype) for w in weights}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 * (repeats + 1), desc="measuring throughput", unit="pass", leave=False)
    results = []
    for tokens in (1, prefill_tokens):
        times = []
        for i in range(repeats + 1):  # the first pass warms up kernels and caches
            elapsed = one_pass(tokens)
            if i:
                times.append(elapsed)
            if bar:
                bar.update()
        results.append(tokens / max(statistics.median(times), 1e-9))
    if bar:
        bar.close()
    return Throughput(decode=results[0], prefill=results[1])


def cached_or_measure(key: str, block_factory, device: torch.device, dtype: torch.dtype,
                      cache_dir: Path | None = None, progress: bool = True) -> Throughput:
    """The cached figure for `key`, or measure it (on the block `block_factory()` returns) and cache it."""
    path = (cache_dir or default_cache_dir()) / "throughput.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("decode"), (int, float)) and isinstance(entry.get("prefill"), (int, float)):
        return Throughput(float(entry["decode"]), float(entry["prefill"]))
    result = measure(block_factory(), device, dtype, progress=progress)
    cache[key] = {"decode": result.decode, "prefill": result.prefill, "measured_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError as exc:  # a read-only home is no reason to fail: measure again next time
        logger.warning("could not cache the throughput measurement in %s: %s", path, exc)
    return result


def cache_key(model_key: str, device_name: str, dtype: str) -> str:
    return f"{model_key}|{device_name}|{dtype}"
