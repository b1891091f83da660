"""`swarm dashboard` against a real swarm: a DHT, three peers and the dashboard as separate processes
(no mocks), checked through its JSON API, its Prometheus metrics and a real headless Chromium.

The swarm serves a tiny 6-block Llama as alpha [0, 6), beta [0, 3) and gamma [3, 6): every block has two
replicas, so the model is healthy. The browser test runs last because it stops peers: beta (SIGTERM,
its record turns draining at once) makes blocks 0-2 single-replica (degraded); alpha then leaves
blocks 0-2 with no peer (broken).

Coordinator: the browser test starts a real `swarm run-coordinator` process and checks that its id
(leader) and its plan epoch appear on the page; the API test also writes a lease and plan through the
registry directly, to check every field of the coordinator section.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from hivemind.utils import get_dht_time

from swarm.dashboard.source import StateCache
from swarm.dashboard.state import coordinator_entry, render_metrics
from swarm.records import CoordinatorLease, PlanRecord
from swarm.registry import (
    ControlState,
    local_peer_id,
    make_dht,
    publish_plan,
    release_lease,
    try_acquire_lease,
)
from swarm.status import collect_status
from tests.processes import SwarmProcesses, wait_until
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("SWARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PEERS = {"alpha": "0:6", "beta": "0:3", "gamma": "3:6"}
CHANGE_S = 20.0  # bound for the page to show a change in the swarm (announce 2 s + cache 1 s + poll 2 s, slow CI)


@dataclass
class Swarm:
    procs: SwarmProcesses
    addr: str
    url: str
    peers: dict
    dht: object  # this process's own DHT node (client mode): reads for comparison, coordinator records
    model_key: str


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def api_state(swarm: Swarm) -> dict:
    return json.loads(get(swarm.url + "api/state")[2])


def only_model(state: dict) -> dict:
    assert len(state["models"]) == 1, [m["model_key"] for m in state["models"]]
    return state["models"][0]


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    model = save_tiny("llama", tmp_path_factory.mktemp("models"))
    with SwarmProcesses() as procs:
        addr = procs.start_dht()
        started = {name: procs.start_peer(model, addr, blocks, "--public-name", name, name=name, wait=False)
                   for name, blocks in PEERS.items()}
        for proc in started.values():
            procs.wait_ready(proc)
        dashboard = procs.spawn("dashboard", "dashboard", "--initial-peers", addr, "--port", "0", "--refresh", "1")
        line = dashboard.wait_for(lambda text: "swarm dashboard serving " in text, timeout=60)
        url = re.search(r"serving (http://\S+/) ", line).group(1)
        dht = make_dht([addr], client_mode=True)
        try:
            swarm = Swarm(procs, addr, url, started, dht, model_key="")
            state = wait_until(lambda: _all_online(swarm), timeout=30, what="3 online peers on /api/state")
            swarm.model_key = only_model(state)["model_key"]
            yield swarm
        finally:
            dht.shutdown()
            for proc in started.values():  # before stop_all, whose process-group SIGTERM makes run-peer hang
                if proc.alive:
                    terminate(proc)


def _all_online(swarm: Swarm) -> dict | None:
    state = api_state(swarm)
    models = state["models"]
    if len(models) == 1 and models[0]["peer_counts"]["online"] == 3:
        return state
    return None


# ---------------------------------------------------------------------------------------------------
# /api/state and /metrics of a live swarm


def test_api_state_describes_the_swarm(swarm):
    status, headers, body = get(swarm.url + "api/state")
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert state["version"] == 1 and state["dashboard_version"] == 1 and state["error"] is None
    assert state["refresh_s"] == 1.0 and abs(state["updated_at"] - time.time()) < 30
    model = only_model(state)
    assert model["model_name"] == "llama" and model["num_blocks"] == 6
    assert model["health"] == "healthy" and model["coverage"] == [2] * 6 and model["missing"] == []
    assert model["peer_counts"] == {"joining": 0, "online": 3, "draining": 0}
    by_name = {p["public_name"]: p for p in model["peers"]}
    assert {name: tuple(p["blocks"]) for name, p in by_name.items()} == {"alpha": (0, 6), "beta": (0, 3), "gamma": (3, 6)}
    assert {p["peer_id"] for p in model["peers"]} == {proc.info["peer_id"] for proc in swarm.peers.values()}
    for peer in model["peers"]:
        assert peer["state"] == "online" and peer["device_kind"] == "cpu" and peer["dtype"] == "float32"
        assert 0 < peer["free_memory_bytes"] <= peer["total_memory_bytes"]
        assert peer["free_cache_tokens"] > 0 and peer["active_sessions"] == 0 and peer["last_seen_s"] < 30
        assert peer["planned_blocks"] is None
    assert len(model["block_throughput"]) == 6
    assert model["coordinator"]["present"] is False and model["coordinator"]["leader"] is None

    # a superset of `swarm status --json` (swarm.status.collect_status): scripts read either one
    expected = collect_status(swarm.dht)
    assert set(expected) <= set(state)
    reference = only_model(expected)
    assert {k: v for k, v in reference.items() if k != "peers"} == {k: model[k] for k in reference if k != "peers"}
    # a peer that re-announces between the two reads measures its free memory again: those two fields move
    live = ("last_seen_s", "free_memory_bytes")
    for ours, theirs in zip(model["peers"], reference["peers"]):
        assert set(theirs) <= set(ours) and theirs["peer_id"] == ours["peer_id"]
        assert {k: v for k, v in theirs.items() if k not in live} == {k: ours[k] for k in theirs if k not in live}
        assert 0 < theirs["free_memory_bytes"] <= theirs["total_memory_bytes"]


def test_api_state_is_gzipped_on_request_and_other_paths_are_404(swarm):
    status, headers, body = get(swarm.url + "api/state", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert only_model(json.loads(gzip.decompress(body)))["num_blocks"] == 6
    status, headers, body = get(swarm.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"static/dashboard.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(swarm.url + "static/dashboard.js")[0] == 200
    assert get(swarm.url + "static/../server.py")[0] == 404
    assert get(swarm.url + "nope")[0] == 404


def test_metrics_in_prometheus_format(swarm):
    status, headers, body = get(swarm.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    m = parse_metrics(text)
    key = swarm.model_key
    assert sample(m, "swarm_model_info", model=key, model_name="llama") == 1
    assert sample(m, "swarm_model_blocks", model=key) == 6
    assert sample(m, "swarm_model_health", model=key, verdict="healthy") == 1
    assert sample(m, "swarm_model_health", model=key, verdict="broken") == 0
    assert sample(m, "swarm_peers", model=key, state="online") == 3
    assert sample(m, "swarm_peers", model=key, state="draining") == 0
    assert sample(m, "swarm_blocks_without_replica", model=key) == 0
    assert sample(m, "swarm_blocks_single_replica", model=key) == 0
    assert [sample(m, "swarm_block_replicas", model=key, block=b) for b in range(6)] == [2] * 6
    assert all(sample(m, "swarm_block_throughput_tokens_per_second", model=key, block=b) is not None for b in range(6))
    assert sample(m, "swarm_coordinator_up", model=key) == 0
    assert not any(name == "swarm_plan_epoch" for name, _ in m)  # no plan: no sample
    assert 0 <= sample(m, "swarm_dashboard_state_age_seconds") < 30
    assert sample(m, "swarm_dashboard_dht_read_errors_total") == 0
    for name in ("swarm_peers", "swarm_plan_epoch", "swarm_block_throughput_tokens_per_second"):
        assert f"# TYPE {name} gauge" in text and f"# HELP {name} " in text


def test_coordinator_lease_and_plan_are_shown(swarm):
    coordinator_id = local_peer_id(swarm.dht)
    key = swarm.model_key
    assert try_acquire_lease(swarm.dht, key, coordinator_id, ttl_s=60)
    try:
        peer_ids = {name: proc.info["peer_id"] for name, proc in swarm.peers.items()}
        plan = PlanRecord.build(
            epoch=7, num_blocks=6, coordinator_id=coordinator_id, created_at=get_dht_time(),
            assignments={peer_ids["alpha"]: (0, 6), peer_ids["beta"]: (0, 3), peer_ids["gamma"]: (3, 6)},
        )
        assert publish_plan(swarm.dht, key, plan)
        model = wait_until(lambda: _with_plan(swarm), timeout=CHANGE_S, what="the plan on /api/state")
        co = model["coordinator"]
        assert co["present"] is True and co["leader"] == coordinator_id and co["standbys"] == []
        assert co["plan_epoch"] == 7 and co["plan_assigned_peers"] == 3 and 0 <= co["plan_age_s"] < 60
        assert 0 < co["lease_expires_in_s"] <= 60
        assert {p["public_name"]: tuple(p["planned_blocks"]) for p in model["peers"]} == {
            "alpha": (0, 6), "beta": (0, 3), "gamma": (3, 6)}
        m = parse_metrics(get(swarm.url + "metrics")[2].decode())
        assert sample(m, "swarm_coordinator_up", model=key) == 1
        assert sample(m, "swarm_plan_epoch", model=key) == 7
    finally:
        release_lease(swarm.dht, key, coordinator_id)
    model = wait_until(lambda: _without_leader(swarm), timeout=CHANGE_S, what="no coordinator on /api/state")
    assert model["coordinator"]["plan_epoch"] is None and model["coordinator"]["last_plan_epoch"] == 7


def _with_plan(swarm):
    model = only_model(api_state(swarm))
    return model if model["coordinator"]["plan_epoch"] is not None else None


def _without_leader(swarm):
    model = only_model(api_state(swarm))
    return model if not model["coordinator"]["present"] else None


def test_busy_port_is_a_clear_error(swarm):
    port = swarm.url.rstrip("/").rsplit(":", 1)[1]
    result = swarm.procs.run_cli("dashboard", "--initial-peers", swarm.addr, "--port", port, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}: the port is already in use" in result.stdout and "--port" in result.stdout


# ---------------------------------------------------------------------------------------------------
# What a person sees, in a real browser (runs last: it stops peers)


def terminate(proc) -> None:
    """SIGTERM to the peer's own process, as an operator's `kill PID` does: it announces `draining` and exits.
    (Not to its process group: `run-peer` then hangs in shutdown, because its p2p daemon child dies first.)"""
    os.kill(proc.popen.pid, signal.SIGTERM)
    proc.popen.wait(timeout=30)


def _browser_or_skip():
    """Playwright's sync API, or a skip saying exactly what is missing. As root (CI), `make test` installs
    both (scripts/install_browser.sh), so there a missing browser is a failure, not a skip."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright Python package (pip install playwright)")
        sync_playwright = None
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium, or set SWARM_CHROMIUM)")
    if missing:
        message = "browser test needs " + " and ".join(missing) + "; `make test` installs them when run as root"
        if os.geteuid() == 0:
            pytest.fail(message + " — it runs as root here, so scripts/install_browser.sh should have done it")
        pytest.skip(message)
    return sync_playwright


def test_page_shows_health_live_in_chromium(swarm, tmp_path):
    sync_playwright = _browser_or_skip()
    from playwright.sync_api import expect

    key = swarm.model_key
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(swarm.url)
            section = page.locator(f'section[data-model-key="{key}"]')
            verdict = section.get_by_test_id("verdict")
            rows = section.locator("tr.peer-row")
            cells = section.locator(".strip .cell")

            # 3 peers, full coverage (2 replicas everywhere), healthy, no coordinator
            expect(verdict).to_have_text("healthy", timeout=CHANGE_S * 1000)
            expect(rows).to_have_count(3)
            for name in PEERS:
                expect(rows.filter(has_text=name)).to_contain_text("online")
            expect(cells).to_have_count(6)
            assert [cells.nth(i).get_attribute("data-replicas") for i in range(6)] == ["2"] * 6
            assert all("r2" in cells.nth(i).get_attribute("class") for i in range(6))
            expect(section.get_by_test_id("coordinator")).to_contain_text("no coordinator")
            expect(page).to_have_title(re.compile("^HEALTHY"))

            # a real coordinator starts: its leader id and plan epoch show up without a reload
            coordinator_proc = swarm.procs.spawn("coordinator", "run-coordinator", "--initial-peers", swarm.addr,
                                                 "--period", "1")
            try:
                coordinator_id = coordinator_proc.wait_for(lambda l: l.startswith("swarm coordinator ready"), 60).split()[-1]
                coordinator = section.get_by_test_id("coordinator")
                expect(coordinator).to_contain_text(f"leader …{coordinator_id[-8:]}", timeout=CHANGE_S * 1000)
                # the epoch continues from plans published earlier in this module, so any number will do
                expect(coordinator).to_contain_text(re.compile(r"plan epoch \d+"), timeout=CHANGE_S * 1000)
                page.screenshot(path=str(tmp_path / "healthy.png"), full_page=True)  # for a look after a failure
            finally:
                coordinator_proc.stop()  # SIGTERM: it releases the lease on its way out

            # beta [0, 3) leaves: blocks 0-2 keep one replica -> degraded; beta shows as draining
            started = time.monotonic()
            terminate(swarm.peers["beta"])
            expect(verdict).to_have_text("degraded", timeout=CHANGE_S * 1000)
            # beta's row turns draining, or is gone once the record expires; either way it is not online
            expect(section.locator("tr.peer-row.s-online").filter(has_text="beta")).to_have_count(0)
            assert [cells.nth(i).get_attribute("data-replicas") for i in range(6)] == ["1"] * 3 + ["2"] * 3

            # alpha [0, 6) leaves too: no one serves blocks 0-2 -> broken, said in words and in red cells
            terminate(swarm.peers["alpha"])
            expect(verdict).to_have_text("broken", timeout=CHANGE_S * 1000)
            expect(section.get_by_test_id("verdict-reason")).to_contain_text("0–2")
            assert [cells.nth(i).get_attribute("data-replicas") for i in range(6)] == ["0"] * 3 + ["1"] * 3
            expect(page).to_have_title(re.compile("^BROKEN"))
            print(f"healthy -> degraded -> broken shown in {time.monotonic() - started:.1f} s")
            page.screenshot(path=str(tmp_path / "broken.png"), full_page=True)
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------------
# Pure parts: the coordinator section, metric escaping, the shared cache


def test_coordinator_entry_names_leader_and_standbys():
    now = 1000.0
    lease = CoordinatorLease.build(coordinator_id="QmLeader", acquired_at=900.0, expires_at=1020.0)
    standby = CoordinatorLease.build(coordinator_id="QmStandby", acquired_at=990.0, expires_at=1025.0)
    plan = PlanRecord.build(epoch=3, num_blocks=4, coordinator_id="QmLeader", created_at=940.0,
                            assignments={"QmPeer": (0, 2)}, uncovered=[(2, 4)], note="not enough memory")
    control = ControlState(lease=lease, plan=plan, claims={"QmLeader": lease, "QmStandby": standby},
                           plans={"QmLeader": plan}, claim_expirations={})
    entry = coordinator_entry(control, now)
    assert entry["present"] and entry["leader"] == "QmLeader" and entry["standbys"] == ["QmStandby"]
    assert entry["plan_epoch"] == 3 and entry["plan_age_s"] == 60.0 and entry["lease_expires_in_s"] == 20.0
    assert entry["plan_uncovered"] == [[2, 4]] and entry["plan_note"] == "not enough memory"
    orphan = ControlState(lease=None, plan=None, claims={}, plans={"QmLeader": plan}, claim_expirations={})
    entry = coordinator_entry(orphan, now)
    assert not entry["present"] and entry["plan_epoch"] is None and entry["last_plan_epoch"] == 3
    assert coordinator_entry(None, now)["present"] is False


def test_metric_labels_are_escaped():
    state = {"models": [{
        "model_key": "m@1", "model_name": 'we"ird\\na\nme', "num_blocks": 1, "health": "degraded", "coverage": [1],
        "missing": [], "peers": [], "peer_counts": {"joining": 0, "online": 1, "draining": 0},
        "block_throughput": [2.5], "bottleneck_throughput": 2.5, "active_sessions": 0, "free_cache_tokens": 0,
        "coordinator": coordinator_entry(None, 0.0),
    }]}
    text = render_metrics(state, state_age_s=float("inf"), read_errors=2)
    assert 'swarm_model_info{model="m@1",model_name="we\\"ird\\\\na\\nme"} 1' in text
    m = parse_metrics(text)
    assert sample(m, "swarm_blocks_single_replica", model="m@1") == 1
    assert m[("swarm_dashboard_state_age_seconds", frozenset())] == float("inf")
    assert m[("swarm_dashboard_dht_read_errors_total", frozenset())] == 2


def test_state_cache_reads_once_per_period_and_keeps_the_last_good_state():
    reads, fail = [], threading.Event()

    def read():
        reads.append(time.monotonic())
        time.sleep(0.2)  # a slow DHT: concurrent viewers must wait for this read, not start their own
        if fail.is_set():
            raise ConnectionError("DHT unreachable")
        return {"version": 1, "models": []}, {}, 0.0

    cache = StateCache(read, refresh_s=30.0)
    threads = [threading.Thread(target=cache.state) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(reads) == 1 and cache.state()["error"] is None

    fail.set()
    cache.refresh_s = 0.01
    time.sleep(0.02)
    state = cache.state()
    assert state["error"] == "reading the DHT failed: ConnectionError: DHT unreachable"
    assert state["models"] == [] and state["updated_at"] is not None and cache.read_errors == 1
    assert sample(parse_metrics(cache.metrics()), "swarm_dashboard_dht_read_errors_total") >= 1
