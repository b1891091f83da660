"""Refresh docs/dashboard.png: a small local swarm (a DHT, five peers on a 24-block toy Llama, a coordinator
lease and plan written from here), the dashboard, and a screenshot taken with headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [OUTPUT.png]

Needs what the browser test needs (scripts/install_browser.sh). Takes about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEERS = [  # public name, blocks
    ("alice-desktop", "0:12"),
    ("bob-server", "12:24"),
    ("carol-laptop", "0:8"),
    ("dave-workstation", "8:16"),
    ("erin-cloud", "16:20"),
]


def save_model(directory: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    path = directory / "toy-llama-24"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def main() -> int:
    from hivemind.utils import get_dht_time
    from playwright.sync_api import expect, sync_playwright

    from swarm.records import PlanRecord
    from swarm.registry import local_peer_id, make_dht, publish_plan, release_lease, try_acquire_lease
    from tests.processes import SwarmProcesses, wait_until
    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, terminate

    output = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png")
    model = save_model(Path(tempfile.mkdtemp(prefix="swarm-screenshot-")))
    with SwarmProcesses() as procs:
        addr = procs.start_dht()
        peers = {name: procs.start_peer(model, addr, blocks, "--public-name", name, name=name, wait=False)
                 for name, blocks in PEERS}
        for proc in peers.values():
            procs.wait_ready(proc)
        dashboard = procs.spawn("dashboard", "dashboard", "--initial-peers", addr, "--port", "0", "--refresh", "1")
        url = re.search(r"serving (http://\S+/) ", dashboard.wait_for(lambda t: "serving http" in t, 60)).group(1)
        dht = make_dht([addr], client_mode=True)
        try:
            def served_model():
                state = json.load(urllib.request.urlopen(url + "api/state", timeout=15))
                return next((m["model_key"] for m in state["models"] if m["peer_counts"]["online"] == len(PEERS)), None)

            key = wait_until(served_model, 30, what="all peers online")
            me = local_peer_id(dht)
            try_acquire_lease(dht, key, me, ttl_s=120)
            assignments = {p.info["peer_id"]: tuple(map(int, dict(PEERS)[n].split(":"))) for n, p in peers.items()}
            publish_plan(dht, key, PlanRecord.build(epoch=12, num_blocks=24, coordinator_id=me,
                                                    created_at=get_dht_time() - 42, assignments=assignments))
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1360, "height": 760}, device_scale_factor=1)
                page.goto(url)
                expect(page.get_by_test_id("coordinator")).to_contain_text("plan epoch 12", timeout=20000)
                page.screenshot(path=str(output), full_page=True)
                browser.close()
            release_lease(dht, key, me)
        finally:
            dht.shutdown()
            for proc in peers.values():
                if proc.alive:
                    terminate(proc)
    print(f"saved {output} ({os.path.getsize(output)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
