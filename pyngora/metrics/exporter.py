"""Render the whole server's metrics for a scrape (runs in the exporter process only).

``render()`` sums every process's files in the metrics directory with prometheus-client's
``MultiProcessCollector`` and adds the exporter process's own standard ``process_*`` metrics.
It reads under the directory's shared lock, so a worker being archived by the master at the
same moment is counted exactly once (see ``multiproc``).
"""

from __future__ import annotations

import gzip
import os
from typing import Iterable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pyngora.metrics import multiproc

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GZIP_LEVEL = 6  # level 9 costs several times the CPU for a few percent on this text


class _LockedCollector(MultiProcessCollector):
    """MultiProcessCollector that reads under the shared lock and skips dead pids' live gauges."""

    def collect(self) -> Iterable[Metric]:  # called by generate_latest, once per scrape
        directory = self._path
        multiproc.prune_dead_live_gauges(directory)
        with multiproc.dir_lock(directory, exclusive=False):
            files = [os.path.join(directory, n) for n in os.listdir(directory)
                     if multiproc.FILE_RE.match(n)]
            # Materialise inside the lock: merge() reads every file before returning.
            return list(self.merge(files, accumulate=True))


_registries: dict[str, CollectorRegistry] = {}


def _registry(metrics_dir: str) -> CollectorRegistry:
    """One registry per directory, built on the first scrape and reused (ProcessCollector reads
    /proc/stat once when built)."""
    reg = _registries.get(metrics_dir)
    if reg is None:
        reg = CollectorRegistry(auto_describe=False)
        _LockedCollector(reg, path=metrics_dir)
        ProcessCollector(registry=reg)
        _registries[metrics_dir] = reg
    return reg


def gzip_accepted(accept_encoding: str | None) -> bool:
    """True if an Accept-Encoding header value allows gzip (and does not say ``gzip;q=0``)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.replace(" ", "").lower()
            return not (q.startswith("q=0") and q.strip("q=0.") == "")
    return False


def render(metrics_dir: str, accept_encoding: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a ``GET /metrics`` answer.

    The body is Prometheus text format 0.0.4, summed over every process that wrote to
    ``metrics_dir`` (dead ones included, through the archive), plus this process's
    ``process_*`` metrics; gzip-compressed when ``accept_encoding`` allows it. Headers hold
    Content-Type (and Content-Encoding, Vary); the HTTP layer adds Content-Length.
    Raises ValueError if ``metrics_dir`` is not a directory.
    """
    if not os.path.isdir(metrics_dir):
        raise ValueError(f"metrics_dir {metrics_dir!r} is not a directory")
    body = generate_latest(_registry(metrics_dir))
    headers = {"Content-Type": CONTENT_TYPE, "Vary": "Accept-Encoding"}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
    return body, headers
