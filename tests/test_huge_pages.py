"""Weights moved into one region of transparent huge pages (swarm/huge_pages.py).

Everything here runs for real: a real model loaded from safetensors, a real anonymous mapping, and the
kernel's own account of it (/proc/self/smaps) where this kernel has transparent huge pages.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from peer.loader import load_blocks
from peer.server import PeerConfig
from swarm.client import ClientConfig
from swarm.huge_pages import HUGE_PAGE, move_to_huge_pages, thp_mode
from tests.tiny_models import save_tiny


def mapping_of(pointer: int) -> tuple[str, dict[str, int]]:
    """The /proc/self/smaps entry holding `pointer`: its header line and its kB fields."""
    header, fields, found = "", {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            if found:
                break
            lo, hi = (int(x, 16) for x in first.split("-"))
            found = lo <= pointer < hi
            header, fields = line, {}
        elif found and line.endswith(" kB"):
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    assert found, f"no mapping holds {pointer:#x}"
    return header, fields


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny("gpt2", tmp_path_factory.mktemp("huge"))


def test_outputs_identical_and_tied_weights_stay_tied(gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its embeddings to its head
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    header, _ = mapping_of(model.transformer.h[0].mlp.c_fc.weight.data_ptr())
    assert header.endswith("model.safetensors")  # where from_pretrained leaves them: the file's map

    placement = move_to_huge_pages(model)

    assert placement.tensors == len(list(model.parameters()))
    assert placement.bytes_moved == sum(p.numel() * p.element_size() for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)  # copied bit for bit
    regions = {mapping_of(p.data_ptr())[0] for p in model.parameters()}
    assert len(regions) == 1 and not regions.pop().rstrip().endswith("safetensors")  # one anonymous region
    first = min(p.data_ptr() for p in model.parameters())
    assert first % HUGE_PAGE == 0


def test_loaded_blocks_land_in_huge_pages_where_the_kernel_has_them(tmp_path):
    """A region over 2 MiB: with THP in "madvise" or "always" mode, the kernel reports huge pages in it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = load_blocks(tmp_path, 0, 3)
    x = torch.randn(1, 5, 256)
    position_embeddings = (torch.ones(1, 5, 64), torch.zeros(1, 5, 64))

    def run():
        with torch.no_grad():
            h = x
            for block in loaded.blocks:
                h = block(h, position_embeddings=position_embeddings)
                h = h[0] if isinstance(h, tuple) else h
            return h

    before = run()
    placement = move_to_huge_pages(loaded.blocks)
    assert torch.equal(run(), before)
    assert placement.bytes_moved > 4 * HUGE_PAGE
    _, fields = mapping_of(loaded.blocks[0].mlp.up_proj.weight.data_ptr())
    mode = thp_mode()
    assert placement.huge_pages == (mode in ("always", "madvise"))
    if placement.huge_pages:
        assert fields["AnonHugePages"] >= 2 * 1024, fields  # at least one 2 MiB page (kB)
    assert "huge pages" in placement.describe() or "normal pages" in placement.describe()


def test_nothing_on_cpu_nothing_moves():
    model = torch.nn.Linear(4, 4, device="meta")
    placement = move_to_huge_pages(model)
    assert placement.bytes_moved == 0 and "no CPU parameters" in placement.describe()


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(path) == "madvise"
    assert thp_mode(tmp_path / "missing") is None


def test_on_by_default_and_off_by_flag():
    from cli.run_peer import register

    assert ClientConfig().huge_pages and PeerConfig(model="m").huge_pages
    peer = "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["run-peer", "m", "--initial-peers", peer]).huge_pages is True
    assert parser.parse_args(["run-peer", "m", "--initial-peers", peer, "--no-huge-pages"]).huge_pages is False


PEAK_CHILD = r"""
import json, sys
import torch
from peer.loader import load_blocks
from swarm.huge_pages import move_to_huge_pages

def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

load_blocks(sys.argv[1], 0, 1)  # the code a load runs, imported and warm: code is not weights
before = peak()
loaded = load_blocks(sys.argv[1], 0, 4)
move_to_huge_pages(loaded.blocks)
float(sum(float(p.sum()) for p in loaded.blocks.parameters()))  # a serving peer reads every weight
held = sum(p.numel() * p.element_size() for p in loaded.blocks.parameters())
print(json.dumps({"added": peak() - before, "held": held}))
"""


def test_the_copy_does_not_double_the_peak(tmp_path):
    """The copy reads the weights through the file's map; the pages it has copied are dropped from it as it goes,
    so a peer's peak stays near its weights' bytes (benchmarks/peer_memory.py's bound), not twice them."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                         vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=120, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["held"] > 90 << 20
    assert figures["added"] <= 1.3 * figures["held"], figures
