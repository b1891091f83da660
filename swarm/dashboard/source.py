"""Reads the swarm's state from the DHT for the dashboard, at most once per refresh period.

Every viewer polls `/api/state`, and Prometheus scrapes `/metrics`; all of them share one read. A
read is made on demand (nobody watching: no DHT traffic), by one thread at a time: requests that
arrive while a read is in flight wait for it instead of starting their own. If a read fails, the
last good state is served with an `error` field saying why.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from swarm.dashboard.state import dashboard_state, render_metrics
from swarm.status import STATUS_VERSION

logger = logging.getLogger(__name__)


def read_swarm(dht, models: Optional[dict[str, Optional[str]]]) -> tuple[dict, dict, float]:
    """One read of the DHT: (status dict, model key -> ControlState, DHT time). Blocking."""
    from hivemind.utils import get_dht_time

    from swarm.registry import read_control
    from swarm.status import collect_status

    status = collect_status(dht, models)
    controls = {m["model_key"]: read_control(dht, m["model_key"]) for m in status["models"]}
    return status, controls, get_dht_time()


class StateCache:
    """The dashboard's view of the swarm, re-read from the DHT when older than `refresh_s` seconds.

    :param read: returns (status, controls, dht_now) as `read_swarm` does; blocking, may raise
    :param refresh_s: how long one read is served (seconds)
    """

    def __init__(self, read: Callable[[], tuple[dict, dict, float]], refresh_s: float = 1.5):
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be > 0 seconds, got {refresh_s}")
        self._read, self.refresh_s = read, refresh_s
        self._lock = threading.Lock()
        self._state: Optional[dict] = None
        self._read_at = float("-inf")  # monotonic time of the last attempt
        self._good_at = float("-inf")  # monotonic time of the last successful read
        self.read_errors = 0
        self.reads = 0
        self.generation = 0  # changes with every new state (a read, or a failed one)

    def state(self) -> dict:
        """The `/api/state` dict (see `swarm.dashboard.state.dashboard_state`)."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, dict]:
        """(generation, state): the generation tells whether the state changed since a previous call."""
        with self._lock:  # one read at a time; concurrent callers get its result
            if time.monotonic() - self._read_at >= self.refresh_s:
                self._refresh()
                self.generation += 1
            return self.generation, self._state

    def metrics(self) -> str:
        """The `/metrics` text."""
        state = self.state()
        age = time.monotonic() - self._good_at  # +Inf until a read succeeds
        return render_metrics(state, state_age_s=age, read_errors=self.read_errors)

    def _refresh(self) -> None:
        started = time.monotonic()
        try:
            status, controls, dht_now = self._read()
        except Exception as exc:  # noqa: BLE001 - any failure becomes a visible error, the server keeps going
            self.read_errors += 1
            error = f"reading the DHT failed: {type(exc).__name__}: {exc}"
            logger.warning(error)
            if self._state is not None:
                self._state = {**self._state, "error": error}  # the last good state, marked stale
            else:
                self._state = dashboard_state(
                    {"version": STATUS_VERSION, "models": []}, {}, 0.0, updated_at=None,
                    refresh_s=self.refresh_s, error=error,
                )
        else:
            self.reads += 1
            self._state = dashboard_state(
                status, controls, dht_now, updated_at=time.time(), refresh_s=self.refresh_s
            )
            self._good_at = started
        self._read_at = time.monotonic()
