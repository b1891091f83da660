"""Child processes of `swarm demo` (and of `swarm run-peer --gpus-per-peer`): started, watched, always cleaned up.

Every child runs `python -m cli.main ...` in its own process group. hivemind starts a p2p daemon
(`p2pd`) as a child of every process that joins the DHT, in that process's group, so stopping a child
is: SIGTERM to the child itself (it announces that it leaves and stops its daemon), a grace period,
then SIGKILL to its whole group (whatever is left, daemons included). On Linux the parent also
becomes a "child subreaper", so a daemon orphaned by a crashed child is re-parented to it rather
than to init, and `reap_descendants()` finds it.

Output of each child goes to a log file (and, when `echo` is set, to our stdout with a name prefix);
`wait_for` waits for a readiness line and, if the child dies first, raises `ChildFailed` with the
tail of its log.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence


class ChildFailed(RuntimeError):
    """A child process exited or stayed silent before printing what we waited for; the message has its last lines."""


class Child:
    """One `swarm` subcommand running as a child process."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path | None, env: dict, echo: bool):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._echo = echo
        self._log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "w", encoding="utf-8", buffering=1)
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            text=True, errors="replace", start_new_session=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, name=f"pump-{name}", daemon=True)
        self._pump_thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def _pump(self) -> None:
        for raw in self.popen.stdout:
            # progress bars redraw with carriage returns: keep their last state only
            line = raw.rstrip("\n").rsplit("\r", 1)[-1]
            if self._log is not None:
                self._log.write(line + "\n")
            self.tail.append(line)
            self._lines.put(line)
            if self._echo:
                print(f"  [{self.name}] {line}", flush=True)
        self._lines.put(None)
        if self._log is not None:
            self._log.close()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first new output line for which `predicate` holds. Raises `ChildFailed` if the child exits or
        `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(self.failure(f"did not report {what} within {timeout:.0f} s"))
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = self.popen.wait()
                raise ChildFailed(self.failure(f"exited with code {code} before reporting {what}"))
            if predicate(line):
                return line

    def poll(self, predicate: Callable[[str], bool]) -> str | None:
        """Like `wait_for`, without waiting: the first new line for which `predicate` holds, or None."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)  # keep reporting the exit
                raise ChildFailed(self.failure(f"exited with code {self.popen.wait()}"))
            if predicate(line):
                return line

    def failure(self, what: str) -> str:
        self._pump_thread.join(timeout=2)  # let the last lines in
        lines = [line for line in self.tail if line.strip()][-15:]
        command = " ".join(["swarm", *self.argv[3:]])  # argv = [python, -m, cli.main, ...]
        log = f"\n  log: {self.log_path}" if self.log_path else ""
        return (f"{self.name} {what}.\n  command: {command}{log}\n  last lines:\n"
                + "\n".join(f"    {line}" for line in lines))

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_all(children: Sequence[Child], predicate: Callable[[str], bool], timeout: float, what: str,
             on_ready: Callable[[Child, str], None] | None = None) -> dict[str, str]:
    """Wait until every child printed a line for which `predicate` holds, in whatever order; returns
    name -> line. Raises `ChildFailed` as soon as one exits, or when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    pending, found = list(children), {}
    while pending:
        for child in list(pending):
            line = child.poll(predicate)
            if line is not None:
                found[child.name] = line
                pending.remove(child)
                if on_ready is not None:
                    on_ready(child, line)
        if pending and time.monotonic() > deadline:
            raise ChildFailed(pending[0].failure(f"did not report {what} within {timeout:.0f} s"))
        time.sleep(0.1)
    return found


class Children:
    """A set of child processes stopped together (context manager)."""

    def __init__(self, log_dir: Path | None, echo: bool = False, verbose: bool = False, env: dict | None = None):
        self.log_dir = Path(log_dir) if log_dir is not None else None  # None: no log files (output only echoed)
        self.echo = echo
        self.verbose = verbose
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.children: list[Child] = []

    def __enter__(self) -> "Children":
        become_subreaper()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def spawn(self, name: str, *args: str, env: dict | None = None) -> Child:
        argv = [sys.executable, "-m", "cli.main", *(["-v"] if self.verbose else []), *args]
        log_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        log_path = self.log_dir / f"{log_name}.log" if self.log_dir is not None else None
        child = Child(name, argv, log_path, {**self.env, **(env or {})}, self.echo)
        self.children.append(child)
        return child

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child (peers first, so they can still announce that they leave), wait up to
        `grace_s` seconds, then SIGKILL each child's process group and reap whatever is left."""
        for child in reversed(self.children):
            if child.alive:
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            child.kill_group()
            try:
                child.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()
        reap_descendants()


def become_subreaper() -> bool:
    """Linux: orphaned descendants (a p2p daemon whose parent died) are re-parented to this process, not init."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_descendants(timeout: float = 5.0) -> list[int]:
    """Terminate, then kill, every process still descending from this one; returns their pids."""
    import psutil

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]
