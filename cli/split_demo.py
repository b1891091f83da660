"""`make demo` (until `swarm demo` lands): split a small model over 3 in-process peers and generate.

Builds a small Llama with random weights (seed 0), saves it with safetensors in a cache
directory, splits it over three in-process peers with uneven block ranges, and shows that the
split model's greedy generation equals the same model run whole.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def build_demo_model(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = directory / "demo-llama"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=1000, max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from peer.inprocess import start_local_peers
    from swarm.local import local_router
    from swarm.model import load_client_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarm"
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    path = build_demo_model(args.cache_dir)
    ranges = [(0, 2), (2, 5), (5, 8)]
    print(f"model: {path} (8 blocks), peers: {', '.join(f'{a}:{b}' for a, b in ranges)}")
    peers = start_local_peers(path, ranges)
    split = load_client_model(path, lambda layout, cfg: local_router(peers, layout.num_blocks), auto_class=AutoModelForCausalLM)
    local = AutoModelForCausalLM.from_pretrained(path).eval()

    prompt = torch.tensor([[1, 17, 42, 256, 7]])
    t0 = time.perf_counter()
    out_split = split.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    t1 = time.perf_counter()
    out_local = local.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    t2 = time.perf_counter()
    print("split :", out_split[0].tolist(), f"({t1 - t0:.2f} s)")
    print("local :", out_local[0].tolist(), f"({t2 - t1:.2f} s)")
    same = torch.equal(out_split, out_local)
    print("identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
