"""The ``prometheus`` service type: ``GET /metrics`` for the whole server (SPEC section 5, 8).

Its worker is a process of its own (one by default), so a busy proxy worker never delays a
scrape. Each scrape sums the files of every pyngora process in the metrics directory (see
``pyngora.metrics``): every worker of every service, dead ones included; scrapes within
``RENDER_REUSE_SECONDS`` of each other share one render.

Answers: ``GET``/``HEAD`` on the configured path (``/metrics``; the query string is ignored)
-> 200, gzip when the client accepts it; another method there -> 405; any other path -> 404.

prometheus_client is imported only inside the worker (``new_app``): the master builds this
service object from the configuration and must stay free of it (DESIGN rule 5).

``pyngora_backend_healthy`` comes from the health checker's shared tables when the service is
told their paths (``health_tables``): read at each scrape, so it is never stale.
"""
from __future__ import annotations

import gzip
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from pyngora.headers import Headers
from pyngora.metrics import multiproc
from pyngora.services.base import WorkerContext
from pyngora.services.http_app import Exchange, HttpApp
from pyngora.services.http_service import HttpService

__all__ = ["PrometheusApp", "PrometheusService", "prometheus_http_service"]

_NO_STORE = (b"Cache-Control", b"private, no-store")

# A scrape this soon after the last render is answered with that render's body (gzipped from
# it when asked). Workers publish once a second, so this shows nothing older than they are;
# it bounds what a flood of scrapes costs: every one rendered anew (~6 ms of the exporter's
# one core for a small server), 500 at once took 3 s, and 50 clients pipelining scrapes
# without reading kept a real Prometheus waiting 8 s. One render serves both encodings, so a
# client never sees a newer body and then an older one.
RENDER_REUSE_SECONDS = 0.25


def _path_of(target: bytes) -> bytes:
    """The path of a request-target (origin-form or absolute-form), without the query."""
    if not target.startswith(b"/"):
        scheme_end = target.find(b"://")
        if scheme_end >= 0:
            slash = target.find(b"/", scheme_end + 3)
            target = target[slash:] if slash >= 0 else b"/"
    return target.split(b"?", 1)[0]


Render = Callable[..., tuple[bytes, dict[str, str]]]


class _HealthTables:
    """Reads (upstream, backend, 1|0) from the health checker's tables at scrape time.

    A table that does not exist yet (the checker has not started) is tried again next scrape.
    """

    __slots__ = ("paths", "_open")

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._open: dict[str, Any] = {}

    def __call__(self) -> Iterable[tuple[str, str, int]]:
        from pyngora.lb.health_table import HealthTable  # only in the exporter process
        out: list[tuple[str, str, int]] = []
        for path in self.paths:
            table = self._open.get(path)
            if table is None:
                try:
                    table = self._open[path] = HealthTable.open(path)
                except (OSError, ValueError):
                    continue
            out.extend(table.backend_health())
        return out


def _master_pid() -> Optional[int]:
    """The master this exporter worker was forked by (whose process tree the ``process_*``
    metrics describe), or None when the exporter runs under no pyngora master."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            title = f.read()
    except OSError:
        return None
    return ppid if title.startswith((b"pyngora: master", b"pyngora: old master")) else None


class PrometheusApp(HttpApp):
    """Per-worker handler; renders synchronously (a scrape takes milliseconds)."""

    __slots__ = ("path", "metrics_dir", "_render", "_health", "_root", "_gzip_accepted",
                 "_gzip_level", "_last")

    def __init__(self, metrics_dir: str, path: str = "/metrics", render: Optional[Render] = None,
                 health_tables: Sequence[str] = ()) -> None:
        # Only the exporter process loads prometheus_client (this app lives there alone).
        from pyngora.metrics import exporter
        self.path = path.encode("ascii")
        self.metrics_dir = metrics_dir
        self._render = render if render is not None else exporter.render
        self._gzip_accepted = exporter.gzip_accepted
        self._gzip_level = exporter.GZIP_LEVEL
        self._health = _HealthTables(health_tables) if health_tables else None
        self._root = _master_pid()
        # The last render: [monotonic time, body, headers, its gzip (made on first ask)].
        self._last: Optional[list[Any]] = None

    def _snapshot(self) -> list[Any]:
        """The last render if it is under RENDER_REUSE_SECONDS old, else a new one: a list
        [time, plain body, headers, gzipped body or None]. Raises what the render raises."""
        now = time.monotonic()
        last = self._last
        if last is None or not 0.0 <= now - last[0] < RENDER_REUSE_SECONDS:
            body, headers = self._render(self.metrics_dir, None, backend_health=self._health,
                                         process_root=self._root)
            last = self._last = [now, body, headers, None]
        return last

    def handle(self, exchange: Exchange) -> None:
        head = exchange.head
        if _path_of(head.target) != self.path:
            exchange.respond(404, Headers([_NO_STORE]))
            return None
        if head.method not in (b"GET", b"HEAD"):
            exchange.respond(405, Headers([_NO_STORE, (b"Allow", b"GET, HEAD")]))
            return None
        accept = head.headers.get(b"accept-encoding")
        try:
            snap = self._snapshot()
        except (OSError, ValueError):
            # The directory vanished (or a file changed while read): say so instead of a
            # partial answer. (A file that cannot be read at all is left out: exporter.py.)
            exchange.respond(503, Headers([_NO_STORE]))
            return None
        body, headers = snap[1], snap[2]
        if accept is not None and self._gzip_accepted(accept.decode("latin-1")):
            if snap[3] is None:
                snap[3] = gzip.compress(body, compresslevel=self._gzip_level)
            body, headers = snap[3], {**headers, "Content-Encoding": "gzip"}
        out = Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()])
        out.add(b"Cache-Control", b"no-store")
        exchange.respond(200, out, body)
        return None


class PrometheusService(HttpService):
    """``type: prometheus``: ``PrometheusService(name, conf)`` from YAML, or
    ``prometheus_http_service()`` then ``svc.add_tcp("127.0.0.1:6192")`` from Python.

    ``health_tables``: paths of the health checker's shared tables (set by whoever wires the
    health service), the source of ``pyngora_backend_healthy``.
    """

    kind = "prometheus"

    def __init__(self, name: str = "prometheus", conf: Any = None, path: Optional[str] = None,
                 metrics_dir: Optional[str] = None, health_tables: Sequence[str] = ()) -> None:
        super().__init__(name, conf)
        spec = getattr(conf, "spec", None)
        self.path = path or getattr(spec, "path", None) or "/metrics"
        self.metrics_dir = metrics_dir
        self.health_tables: list[str] = list(health_tables)
        if self.threads is None:
            self.threads = 1  # one process answers scrapes; more would only duplicate work

    def new_app(self, ctx: WorkerContext) -> PrometheusApp:
        """Runs in the service's worker: the directory the master prepared (inherited in the
        environment), else the configured ``metrics_dir``."""
        directory = (self.metrics_dir or multiproc.metrics_dir()
                     or ctx.server_conf.metrics_path)
        return PrometheusApp(directory, self.path, health_tables=self.health_tables)


def prometheus_http_service(name: str = "prometheus") -> PrometheusService:
    """Pingora's ``Service::prometheus_http_service()``: add listeners, then ``add_service``."""
    return PrometheusService(name)
