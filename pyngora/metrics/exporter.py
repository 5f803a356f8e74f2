"""Render the whole server's metrics for a scrape (runs in the exporter process only).

``render()`` sums every process's files in the metrics directory with prometheus-client's
``MultiProcessCollector`` and adds the standard ``process_*`` metrics of every pyngora process
(``processes``; of the exporter alone when it runs under no master).
It reads under the directory's shared lock, so a worker being archived by the master at the
same moment is counted exactly once (see ``multiproc``).
"""

from __future__ import annotations

import gzip
import os
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pyngora.metrics import multiproc
from pyngora.metrics.processes import ProcessesCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GZIP_LEVEL = 6  # level 9 costs several times the CPU for a few percent on this text


HealthSource = Callable[[], Iterable[tuple[str, str, int]]]
_HEALTH = multiproc.METRICS["pyngora_backend_healthy"]


class _LockedCollector(MultiProcessCollector):
    """MultiProcessCollector that reads under the shared lock and skips dead pids' live gauges.

    ``skip`` names metric families left out (replaced by another source at scrape time).
    """

    def __init__(self, registry: CollectorRegistry, path: str, skip: frozenset[str]) -> None:
        super().__init__(registry, path=path)
        self._skip = skip

    def collect(self) -> Iterable[Metric]:  # called by generate_latest, once per scrape
        directory = self._path
        multiproc.prune_dead_live_gauges(directory)
        with multiproc.dir_lock(directory, exclusive=False):
            files = [os.path.join(directory, n) for n in os.listdir(directory)
                     if multiproc.FILE_RE.match(n)]
            # Materialise inside the lock: merge() reads every file before returning.
            metrics = list(self.merge(files, accumulate=True))
        return [m for m in metrics if m.name not in self._skip]


class _HealthCollector:
    """``pyngora_backend_healthy`` read at scrape time from the health checker's shared table
    (``pyngora.lb.health_table.HealthTable.backend_health``): never stale, never summed."""

    def __init__(self, source: HealthSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(_HEALTH.name, _HEALTH.help, labels=list(_HEALTH.labels))
        seen: set[tuple[str, str]] = set()
        for upstream, backend, value in self._source():
            if (upstream, backend) not in seen:  # one sample per series, whatever the source
                seen.add((upstream, backend))
                family.add_metric([upstream, backend], float(value))
        return [family]


def gzip_accepted(accept_encoding: str | None) -> bool:
    """True if an Accept-Encoding header value allows gzip (and does not say ``gzip;q=0``)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.replace(" ", "").lower()
            return not (q.startswith("q=0") and q.strip("q=0.") == "")
    return False


def render(metrics_dir: str, accept_encoding: str | None = None,
           backend_health: HealthSource | None = None,
           process_root: Optional[int] = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a ``GET /metrics`` answer.

    The body is Prometheus text format 0.0.4, summed over every process that wrote to
    ``metrics_dir`` (dead ones included, through the archive), plus the ``process_*``
    metrics of ``process_root`` (the master) and its children, labelled ``pid`` and
    ``process`` (this process's alone, unlabelled, without a root); gzip-compressed when ``accept_encoding`` allows it. Headers hold
    Content-Type (and Content-Encoding, Vary); the HTTP layer adds Content-Length.
    ``backend_health``, when given, returns (upstream, backend, 1|0) triples read at scrape
    time; they replace whatever workers published with ``registry.set_backend_healthy``.
    Raises ValueError if ``metrics_dir`` is not a directory.
    """
    if not os.path.isdir(metrics_dir):
        raise ValueError(f"metrics_dir {metrics_dir!r} is not a directory")
    # A registry per scrape: cheap (ProcessCollector reads /proc/stat once), and nothing of
    # one scrape (a health source, a directory) leaks into the next.
    registry = CollectorRegistry(auto_describe=False)
    skip = frozenset((_HEALTH.name,)) if backend_health is not None else frozenset()
    _LockedCollector(registry, metrics_dir, skip)
    if backend_health is not None:
        registry.register(_HealthCollector(backend_health))  # type: ignore[arg-type]
    if process_root is not None:
        registry.register(ProcessesCollector(process_root))  # type: ignore[arg-type]
    else:
        ProcessCollector(registry=registry)
    body = generate_latest(registry)
    headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
    return body, headers
