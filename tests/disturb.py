"""Disturbing a generation in progress (kill, freeze a peer) and seeing which peers served it before and after;
a directory of spans a test can change while the router runs.

Shared by the fault tests (tests/test_reliability.py, tests/test_push.py).
"""

from __future__ import annotations

import threading
import time

import torch


class Directory:
    """Spans that a test can change while the router runs (the router calls it for the current spans)."""

    def __init__(self, spans):
        self.spans = list(spans)

    def __call__(self):
        return list(self.spans)


class Progress:
    """A `generate` streamer that signals after `at` new tokens (and paces decoding a little)."""

    def __init__(self, at: int):
        self.at, self.seen = at, -1  # the first `put` is the prompt
        self.reached = threading.Event()

    def put(self, value) -> None:
        self.seen += 1
        if self.seen >= self.at:
            self.reached.set()
        time.sleep(0.02)

    def end(self) -> None:
        self.reached.set()


def generate_and_disturb(client, prompt: torch.Tensor, generate_kwargs: dict, at: int, disturb) -> tuple[torch.Tensor, list, list]:
    """Generate in a session (max length 80); after `at` tokens call `disturb(hops)` from this thread.
    Returns the tokens and the session's hops before and after."""
    result: dict = {}
    progress = Progress(at)
    with client.inference_session(max_length=80) as cache:
        session = cache._swarm_session

        def run():
            try:
                result["out"] = client.generate(prompt, streamer=progress, **generate_kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        assert progress.reached.wait(120), "generation did not start"
        before = list(session.hops)
        disturb(before)
        thread.join(180)
        assert not thread.is_alive(), "generation hangs"
        after = list(session.hops)
    if "error" in result:
        raise result["error"]
    return result["out"], before, after


def peer_named(peers: dict, peer_id: str) -> str:
    """The name under which `peers` (name -> started peer process) holds `peer_id`."""
    return next(name for name, proc in peers.items() if proc.info["peer_id"] == peer_id)
