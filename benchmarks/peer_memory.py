"""Peak memory of a peer that loads blocks 8..16 of a 24-block model.

Prints the RSS a peer process adds while loading its 8 blocks, as a ratio to those blocks' own
bytes (target: at most 1.3x), next to loading the whole model for comparison. Weights are read once after loading (safetensors maps files
lazily; a serving peer touches every weight on its first step), so the figure is what a peer
really holds. The range is then moved into huge pages, as a CPU peer does by default (`swarm.huge_pages`), a
copy out of the file's map. Each load runs in a
fresh process, so peaks do not mix. The model (Llama-shaped, hidden 1024, 24 blocks, fp32,
~1.7 GB) is built once from a seeded config and saved with safetensors in a temp directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, sys
import torch, transformers
sys.path.insert(0, {root!r})
from peer.loader import load_blocks
from swarm.huge_pages import move_to_huge_pages
from swarm.splitting import block_bytes

def peak_bytes():
    # VmHWM (peak RSS) of this process image; getrusage's ru_maxrss would carry the parent's peak over exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

path, mode, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# import everything a load needs first (modeling code, the skeleton on meta): code is not weights
from swarm.splitting import build_skeleton, load_config, resolve_class
config = load_config(path)
build_skeleton(resolve_class(config), config)
build_skeleton(transformers.AutoModelForCausalLM._model_mapping[type(config)], config)
gc.collect()
before = peak_bytes()
if mode == "range":
    loaded = load_blocks(path, start, end)
    move_to_huge_pages(loaded.blocks)  # as a CPU peer does (`--huge-pages`, the default): a copy out of the file map
    held = sum(block_bytes(b) for b in loaded.blocks)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
params = list(loaded.blocks.parameters()) if mode == "range" else list(model.parameters())
touched = float(sum(float(p.sum()) for p in params))  # fault in every page: a serving peer reads all its weights
print(json.dumps({{"added": peak_bytes() - before, "held": held}}))
"""


def build_model(directory: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = directory / "llama24"
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True, max_shard_size="500MB")
    return path


def measure(path: Path, mode: str, start: int, end: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(path), mode, str(start), str(end)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--start", type=int, default=8)
    parser.add_argument("--end", type=int, default=16)
    args = parser.parse_args()
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), args.layers, args.hidden)
        rng = measure(path, "range", args.start, args.end)
        full = measure(path, "full", 0, args.layers)
    ratio = rng["added"] / rng["held"]
    print(f"blocks {args.start}..{args.end} of {args.layers}: {rng['held'] / gib:.3f} GiB of weights")
    print(f"  peak RSS added by the peer's load : {rng['added'] / gib:.3f} GiB  -> ratio {ratio:.2f}x (target <= 1.3x)")
    print(f"  whole model, for comparison       : {full['added'] / gib:.3f} GiB added for {full['held'] / gib:.3f} GiB")
    print(json.dumps({"benchmark": "peer_memory", "ratio": round(ratio, 3), "range_bytes": rng["held"],
                      "range_added": rng["added"], "full_added": full["added"]}))


if __name__ == "__main__":
    main()
