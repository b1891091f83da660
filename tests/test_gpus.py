"""Multi-GPU hosts: which GPUs each peer process gets (pure functions), and the launcher's plumbing.

No test here needs a GPU: the assignment is a pure function of GPU ids, and the launcher is checked
by giving it GPU ids through CUDA_VISIBLE_DEVICES on a machine without CUDA, where each child peer
then reports the GPUs it was handed as it refuses to start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from peer.gpus import GpuAssignmentError, assign_gpus, unused_gpus, visible_gpus
from tests.processes import ROOT

DEAD = "/ip4/127.0.0.1/tcp/1/p2p/QmYcWYqKX82p6uZJho8TQ48BC96cMVNqky7JnKcCG7Kmxi"


def test_visible_gpus_from_count_or_environment():
    assert visible_gpus(None, 4) == ["0", "1", "2", "3"]
    assert visible_gpus(None, 0) == []
    assert visible_gpus("2,3", 8) == ["2", "3"]  # a restriction the user set is honoured
    assert visible_gpus(" 1 , 0 ", 8) == ["1", "0"]
    assert visible_gpus("GPU-8f1e,GPU-77aa", 2) == ["GPU-8f1e", "GPU-77aa"]  # UUIDs pass through
    assert visible_gpus("", 4) == []  # CUDA: empty hides every GPU
    assert visible_gpus("-1", 4) == []
    assert visible_gpus("0,-1,2", 4) == ["0"]  # CUDA stops at the first invalid id


@pytest.mark.parametrize("gpus, per_peer, want", [
    (["0"], 1, [["0"]]),
    (["0", "1", "2", "3"], 1, [["0"], ["1"], ["2"], ["3"]]),
    (["0", "1", "2", "3"], 2, [["0", "1"], ["2", "3"]]),
    (["0", "1", "2", "3", "4", "5", "6", "7"], 4, [["0", "1", "2", "3"], ["4", "5", "6", "7"]]),
    (["0", "1", "2", "3", "4"], 2, [["0", "1"], ["2", "3"]]),  # GPU 4 is left over
    (["4", "6"], 1, [["4"], ["6"]]),  # ids, not positions
])
def test_groups_are_disjoint_and_in_order(gpus, per_peer, want):
    groups = assign_gpus(gpus, per_peer)
    assert groups == want
    flat = [g for group in groups for g in group]
    assert len(flat) == len(set(flat))  # no GPU handed out twice


def test_more_peers_than_groups_share_gpus_round_robin():
    # as TorchServe hands GPUs to workers: worker i gets GPU (i * K + j) mod N
    assert assign_gpus(["0", "1", "2"], 1, num_peers=5) == [["0"], ["1"], ["2"], ["0"], ["1"]]
    assert assign_gpus(["0", "1", "2"], 2, num_peers=3) == [["0", "1"], ["2", "0"], ["1", "2"]]
    # every GPU gets the same number of peers, give or take one
    groups = assign_gpus([str(i) for i in range(4)], 1, num_peers=10)
    loads = [sum(g == [str(i)] for g in groups) for i in range(4)]
    assert max(loads) - min(loads) <= 1


def test_unused_gpus():
    gpus = ["0", "1", "2", "3", "4"]
    assert unused_gpus(gpus, assign_gpus(gpus, 2)) == ["4"]
    assert unused_gpus(gpus, assign_gpus(gpus, 1)) == []


@pytest.mark.parametrize("gpus, per_peer, num_peers, words", [
    ([], 1, None, "none is visible"),
    (["0", "1"], 3, None, "more GPUs than the 2 visible"),
    (["0"], 0, None, "at least 1"),
    (["0"], 1, 0, "at least 1"),
])
def test_impossible_requests_say_why(gpus, per_peer, num_peers, words):
    with pytest.raises(GpuAssignmentError, match=words):
        assign_gpus(gpus, per_peer, num_peers)


def test_each_peer_gets_its_own_port_name_and_identity():
    from cli.run_peer import peer_argv

    args = argparse.Namespace(
        model="/models/llama", initial_peers=[DEAD], blocks=None, device=None, dtype="bfloat16", max_memory=None,
        cache_tokens=4096, activation_reserve="256MiB", host="0.0.0.0", port=31400,
        announce_maddrs=["/ip4/203.0.113.7/tcp/31400"], use_auto_relay=False, public_name="lab", identity_path="keys/peer.key",
        announce_period=30.0, num_threads=None, attn_implementation=None, gpus_per_peer=2, batch_wait_ms=4.0, inline_max_ms=0.0,
        linear_kernel="torch", huge_pages=False,
        direct="always", direct_port=31500,
    )
    argv = peer_argv(args, 1, ["2", "3"])
    assert argv[:4] == ["run-peer", "/models/llama", "--initial-peers", DEAD]
    assert "--gpus-per-peer" not in argv

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--port") == "31401"
    assert value("--announce-maddrs") == "/ip4/203.0.113.7/tcp/31401"
    assert value("--public-name") == "lab-gpu2+3"
    assert value("--identity-path") == os.path.join("keys", "peer-1.key")
    assert value("--dtype") == "bfloat16" and value("--host") == "0.0.0.0" and value("--cache-tokens") == "4096"
    assert value("--batch-wait-ms") == "4.0" and value("--linear-kernel") == "torch" and value("--inline-max-ms") == "0.0"
    assert value("--direct") == "always" and value("--direct-port") == "31501"
    assert "--no-huge-pages" in argv
    assert "--blocks" not in argv and "--device" not in argv


def run_peer(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "run-peer", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cli.demo_assets import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("gpus")).path


@pytest.mark.skipif(sys.platform != "linux", reason="spawns peers with CUDA_VISIBLE_DEVICES set")
def test_launcher_hands_each_peer_its_gpus(tiny_model):
    """Two GPU ids and K=1: two peer processes, each told exactly one GPU. Without CUDA here, each then
    refuses to start, naming the CUDA_VISIBLE_DEVICES it was given."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the peers would start for real")
    result = run_peer(str(tiny_model), "--initial-peers", DEAD, "--gpus-per-peer", "1",
                      env={"CUDA_VISIBLE_DEVICES": "0,1"})
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 peer processes on GPUs 0; 1" in out
    assert "[gpu 0] error: --device cuda, but torch sees no CUDA GPU" in out
    assert "CUDA_VISIBLE_DEVICES=0)" in out and "CUDA_VISIBLE_DEVICES=1)" in out


def test_no_gpu_is_a_clear_error(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_peer(str(tiny_model), "--initial-peers", DEAD, "--gpus-per-peer", "1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "--gpus-per-peer needs GPUs, but none is visible" in result.stderr
