"""The dashboard's HTTP server: the page, `/api/state` and `/metrics`, from one process.

The stack is Python's own `http.server` (a thread per connection): the DHT client is blocking, each
request is a lookup in `StateCache` (one DHT read per refresh period, shared by every viewer), and
the page is three static files polled by a few lines of JavaScript, so no web framework or
front-end build earns its place here.

Routes (GET and HEAD):
- ``/``: the page (``static/index.html``, with ``static/dashboard.css`` and ``static/dashboard.js``)
- ``/api/state``: the swarm state as JSON (`swarm.dashboard.state.dashboard_state`; docs/dashboard.md)
- ``/metrics``: Prometheus text format (`swarm.dashboard.state.render_metrics`)
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Sequence

from swarm.dashboard.source import StateCache, read_swarm

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {  # URL path -> (file under static/, content type); nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The page builds its DOM with textContent only; the policy forbids inline scripts and other origins too.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardError(RuntimeError):
    """The dashboard cannot start (port in use, DHT unreachable); the message says what to do."""


@dataclass(frozen=True)
class DashboardConfig:
    """What `swarm dashboard` runs with."""

    initial_peers: Sequence[str]  # multiaddrs of running swarm nodes
    models: Optional[dict[str, Optional[str]]] = None  # model key -> name to show; None: every model in the DHT
    host: str = "127.0.0.1"  # interface to listen on ("0.0.0.0": all interfaces)
    port: int = 8080  # TCP port (0: any free port)
    refresh_s: float = 1.5  # one DHT read is served to every viewer for this long (seconds)
    connect_timeout_s: float = 20.0  # joining the DHT (seconds)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck viewer never blocks shutdown
    allow_reuse_address = True  # restart at once after a stop (Linux still refuses a port another socket listens on)

    def __init__(self, address: tuple[str, int], cache: StateCache, static: dict[str, tuple[bytes, str]]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.cache, self.static = cache, static
        self._encoded: tuple[int, bytes, bytes] = (-1, b"", b"")  # (state generation, json, gzipped json)
        self._encode_lock = threading.Lock()
        super().__init__(address, _Handler)

    def state_body(self) -> tuple[bytes, bytes]:
        """/api/state as (JSON, gzipped JSON), encoded once per DHT read."""
        generation, state = self.cache.snapshot()
        with self._encode_lock:
            if self._encoded[0] != generation:
                body = json.dumps(state, separators=(",", ":"), allow_nan=False).encode()
                self._encoded = (generation, body, gzip.compress(body, compresslevel=5))
            return self._encoded[1], self._encoded[2]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: a polling page reuses its connection
    server_version = "swarm-dashboard"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        gzipped = False
        if path in self.server.static:
            body, content_type = self.server.static[path]
            cache = "no-cache"
        elif path == "/api/state":
            body, zipped = self.server.state_body()
            if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
                body, gzipped = zipped, True
            content_type, cache = JSON_TYPE, "no-store"
        elif path == "/metrics":
            body, content_type, cache = self.server.cache.metrics().encode(), METRICS_TYPE, "no-store"
        else:
            body = f"not found: {path}\nthe dashboard serves /, /api/state and /metrics\n".encode()
            self._send(404, body, "text/plain; charset=utf-8", "no-store", head)
            return
        self._send(200, body, content_type, cache, head, gzipped)

    def _send(self, code: int, body: bytes, content_type: str, cache: str, head: bool, gzipped: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Vary", "Accept-Encoding")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s %s", self.address_string(), format % args)


class Dashboard:
    """The dashboard: binds its port, joins the DHT, then serves until closed.

        with Dashboard(DashboardConfig(initial_peers=[...], port=0)) as dashboard:
            dashboard.start()
            print(dashboard.url)

    The port is bound first, so a busy port fails at once, before the slower DHT join.
    Raises `DashboardError` if the port is taken or the swarm cannot be joined.
    """

    def __init__(self, config: DashboardConfig):
        self.config = config
        static = {path: ((STATIC_DIR / name).read_bytes(), kind) for path, (name, kind) in STATIC_FILES.items()}
        self._dht = None
        self.cache = StateCache(self._read, refresh_s=config.refresh_s)
        try:
            self._http = _HTTPServer((config.host, config.port), self.cache, static)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DashboardError(
                    f"cannot serve the dashboard on {config.host}:{config.port}: the port is already in use "
                    f"(another dashboard?). Pick a free one with --port (--port 0: any free port)"
                ) from exc
            raise DashboardError(f"cannot serve the dashboard on {config.host}:{config.port}: {exc}") from exc
        try:
            self._dht = _join(config)
        except BaseException:
            self._http.server_close()
            raise
        self._thread: Optional[threading.Thread] = None

    def _read(self):
        return read_swarm(self._dht, self.config.models)

    @property
    def url(self) -> str:
        """Where to open the page (on a wildcard host: this machine's loopback address)."""
        host, port = self._http.server_address[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> None:
        """Serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the dashboard is already serving")
        self._thread = threading.Thread(target=self._http.serve_forever, name="swarm-dashboard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(timeout=5)
        self._http.server_close()
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _join(config: DashboardConfig):
    from swarm.registry import make_dht

    if not config.initial_peers:
        raise DashboardError("no --initial-peers given: pass the multiaddrs that `swarm dht` printed")
    try:
        return make_dht(list(config.initial_peers), client_mode=True, wait_timeout=config.connect_timeout_s)
    except Exception as exc:  # noqa: BLE001 - hivemind raises several kinds here; one clear message instead
        raise DashboardError(
            f"could not join the swarm through {list(config.initial_peers)}: {exc}. Check that `swarm dht` is "
            "running and that the addresses (including the /p2p/... part) are the ones it printed"
        ) from exc
