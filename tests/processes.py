"""Real swarm processes for end-to-end tests: started through the CLI, awaited on their readiness line,
always killed at teardown.

    with SwarmProcesses() as procs:
        addr = procs.start_dht()
        procs.start_peer(model_dir, addr, "0:3")
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    name: str
    lines: list[str] = field(default_factory=list)
    _queue: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    info: dict = field(default_factory=dict)

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float) -> str:
        """The first output line satisfying `predicate`; fails with the process's output on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name} not ready after {timeout} s; output:\n" + "\n".join(self.lines[-40:]))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited with {self.popen.wait()}; output:\n" + "\n".join(self.lines[-40:]))
            if predicate(line):
                return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process itself (as `kill PID` would), then SIGKILL whatever is left of its group
        (hivemind's p2p daemons): signalling the whole group first would kill the daemons before the
        process could announce that it is leaving."""
        code = self.popen.returncode
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                code = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code if code is not None else self.popen.wait(5)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class SwarmProcesses:
    """Starts `swarm` subcommands as child processes (each in its own process group) and cleans up."""

    def __init__(self, env: dict | None = None):
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def __enter__(self) -> "SwarmProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def spawn(self, name: str, *args: str) -> Proc:
        popen = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        proc = Proc(popen, name)
        threading.Thread(target=proc._pump, daemon=True).start()
        self.procs.append(proc)
        return proc

    def start_dht(self, timeout: float = 60.0) -> str:
        proc = self.spawn("dht", "dht")
        return proc.wait_for(lambda line: line.startswith("/ip4/"), timeout).strip()

    def start_peer(self, model: Path | str, initial_peer: str, blocks: str | None, *extra: str, name: str | None = None,
                   wait: bool = True, timeout: float = 120.0) -> Proc:
        # one torch thread per peer: several peers share this machine's cores, and oversubscribed
        # OpenMP threads spin against each other (10x slower steps)
        args = ["run-peer", str(model), "--initial-peers", initial_peer, "--announce-period", "2", "--num-threads", "1", *extra]
        if blocks is not None:
            args += ["--blocks", blocks]
        proc = self.spawn(name or f"peer {blocks}", *args)
        if wait:
            self.wait_ready(proc, timeout)
        return proc

    @staticmethod
    def wait_ready(proc: Proc, timeout: float = 120.0) -> Proc:
        line = proc.wait_for(lambda line: line.startswith("swarm peer ready "), timeout)
        proc.info = json.loads(line[len("swarm peer ready "):])
        return proc

    def run_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL if not proc.alive else signal.SIGTERM, timeout=10)
        self.procs.clear()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s (last value: {last!r})")
