"""`swarm demo`: the first thing a new user runs.

The main test runs `swarm demo --once` from a clean cache directory as a subprocess, exactly as a
user would, and checks that it exits 0, streams tokens that equal the local model's, prints the
sentence similarities, and leaves no process behind: every process it started (peers, DHT,
coordinator, dashboard, and hivemind's p2p daemons, which are children of each of them) inherits
an environment marker, and no process carrying that marker may survive.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.processes import ROOT

MARK = "SWARM_DEMO_TEST_MARK"


def marked_processes(mark: str) -> list[psutil.Process]:
    """Processes whose environment carries `MARK=mark`: everything the demo started, directly or not."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(MARK) == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def assert_nothing_left(mark: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(mark)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            continue
        proc.kill()  # do not leak them into the rest of the test session
    assert not described, "processes left behind by swarm demo:\n" + "\n".join(described)


def demo_env(tmp_path: Path, mark: str) -> dict:
    # XDG_CACHE_HOME: the peers' throughput cache lands in the temporary directory too
    return {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}


def test_demo_once_from_a_clean_cache(tmp_path):
    cache = tmp_path / "demo-cache"
    assert not cache.exists()
    mark = uuid.uuid4().hex
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--once", "--cache-dir", str(cache), "--dashboard-port", "0"],
        cwd=ROOT, env=demo_env(tmp_path, mark), capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - t0
    out = result.stdout
    print(out, result.stderr[-3000:], f"\nswarm demo --once took {elapsed:.1f} s", sep="\n")
    try:
        assert result.returncode == 0, result.stderr[-3000:]

        # first run: the model was built in the cache directory, with safetensors and an offline tokenizer
        model_dir = cache / "swarm-demo-llama"
        assert "built: " + str(model_dir) in out
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (model_dir / name).is_file(), name

        # three planned peers with different memory caps, then tokens streamed through them
        planned = re.findall(r"peer-[abc]\s+--max-memory (\S+)\s+room for (\d) blocks -> serves blocks (\d+):(\d+) \(planned\)", out)
        assert len(planned) == 3, out
        assert len({cap for cap, *_ in planned}) == 3
        for _, room, start, end in planned:
            assert 0 < int(end) - int(start) <= int(room)
        streamed = re.search(r"^\s+> a swarm of peers (.+)$", out, re.M)
        assert streamed and len(streamed.group(1).split()) >= 10, out
        assert "same tokens as the whole model run in this process: yes" in out

        # the sentence model through the swarm: similar pairs score well above unrelated ones
        scores = [float(s) for s in re.findall(r"^\s+(-?\d\.\d\d)\s+'", out, re.M)]
        assert len(scores) == 5, out
        assert min(scores[:3]) > max(scores[3:]) + 0.3, scores

        assert re.search(r"Dashboard: http://127\.0\.0\.1:\d+/", out)
    finally:
        assert_nothing_left(mark)
    assert elapsed < 240


def test_demo_stops_everything_on_ctrl_c(tmp_path):
    """Without --once the swarm stays up; Ctrl-C (SIGINT to the terminal's process group) stops all of it."""
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "demo", "--no-sentences", "--max-new-tokens", "4",
         "--cache-dir", str(tmp_path / "cache"), "--dashboard-port", "0"],
        cwd=ROOT, env={**demo_env(tmp_path, mark), "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
        # ...and SIGINT not ignored, as in a terminal: a test run started in the background (`make test &`) ignores
        # it, children inherit that, and Python then never turns Ctrl-C into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line and "keeps running" in line:
                break
        else:
            pytest.fail("swarm demo exited before it was up:\n" + "".join(lines))
        assert len(marked_processes(mark)) > 10  # the swarm is up: demo, 5 children, their p2p daemons, ...
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # PYTHONFAULTHANDLER (set below) makes SIGABRT print every thread's stack: show where it hangs
            proc.send_signal(signal.SIGABRT)
            rest, _ = proc.communicate(timeout=30)
            pytest.fail("swarm demo still running 60 s after Ctrl-C; its output and stacks:\n"
                        + "".join(lines) + rest[-20000:])
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines)
        assert "stopped." in rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert_nothing_left(mark)


def test_demo_model_is_deterministic_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from cli.demo_assets import CORPUS, ensure_demo_model

    first = ensure_demo_model(tmp_path / "a")
    second = ensure_demo_model(tmp_path / "b")
    assert first.built and second.built
    assert not ensure_demo_model(tmp_path / "a").built  # reused from the cache
    a, b = load_file(first.path / "model.safetensors"), load_file(second.path / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    tokenizer = AutoTokenizer.from_pretrained(first.path)
    ids = tokenizer(CORPUS[0]).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == CORPUS[0]
