"""The errors a newcomer is likely to hit, each triggered for real through the CLI: one line that says
what happened and what to do, a non-zero exit code, and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cli.errors import explain
from tests.processes import ROOT

DEAD = "/ip4/127.0.0.1/tcp/1/p2p/QmYcWYqKX82p6uZJho8TQ48BC96cMVNqky7JnKcCG7Kmxi"  # nobody listens on port 1


def swarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_clear(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    err = result.stderr
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cli.demo_assets import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("errors")).path


def test_malformed_initial_peers_are_refused_before_anything_starts():
    result = swarm("status", "--initial-peers", "127.0.0.1:31337")
    assert_clear(result, 2, "is not a multiaddr", "copy it from the output of `swarm dht`")
    result = swarm("status", "--initial-peers", "/ip4/127.0.0.1/tcp/31337")
    assert_clear(result, 2, "lacks the /p2p/PEER_ID part")


def test_unreachable_initial_peers():
    assert_clear(swarm("status", "--initial-peers", DEAD), 1, "could not reach any of the --initial-peers",
                 "check that that node is still running")


def test_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = swarm("dht", "--port", str(port))
    assert_clear(result, 1, f"port in use: another program already listens on 127.0.0.1:{port}", "--port 0")


def test_missing_model_files(model_dir, tmp_path):
    assert_clear(swarm("run-peer", str(tmp_path / "nowhere"), "--initial-peers", DEAD), 2,
                 "does not exist", "config.json")
    (tmp_path / "no-config").mkdir()
    assert_clear(swarm("generate", str(tmp_path / "no-config"), "--initial-peers", DEAD, "--prompt", "hi"), 2,
                 "has no config.json")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((model_dir / "config.json").read_text())
    assert_clear(swarm("run-peer", str(weightless), "--initial-peers", DEAD), 2, "has no weights")


def test_hub_id_that_cannot_be_fetched():
    assert_clear(swarm("run-peer", "no-such-org/no-such-model", "--initial-peers", DEAD), 1,
                 "model files not found", "hub id")


def test_not_enough_memory(model_dir):
    result = swarm("run-peer", str(model_dir), "--initial-peers", DEAD, "--max-memory", "1MiB", "--num-threads", "1")
    assert_clear(result, 1, "needs", "GiB free", "Serve fewer blocks")


def test_explain_recognises_errors_raised_deep_inside():
    from swarm.routing import MissingBlocksError

    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = MissingBlocksError([(4, 8)], 8)
    assert "swarm status" in explain(wrapped)
    daemon = Exception("Daemon failed to start: 2026/01/01 10:00:00 failed to listen on any addresses: "
                       "[listen tcp4 0.0.0.0:31337: bind: address already in use]")
    assert explain(daemon).startswith("port in use: another program already listens on 0.0.0.0:31337")
    assert explain(ValueError("a bug")) is None  # anything unknown keeps its traceback


def test_missing_model_for_status_and_coordinator(tmp_path):
    for command in ("status", "run-coordinator", "dashboard"):
        assert_clear(swarm(command, str(tmp_path / "nowhere"), "--initial-peers", DEAD), 1, "does not exist")
