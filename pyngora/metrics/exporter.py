"""Render the whole server's metrics for a scrape (runs in the exporter process only).

``render()`` sums every process's files in the metrics directory with prometheus-client's
``MultiProcessCollector`` and adds the standard ``process_*`` metrics of every pyngora process
(``processes``; of the exporter alone when it runs under no master).
It reads under the directory's shared lock, so a worker being archived by the master at the
same moment is counted exactly once (see ``multiproc``).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pyngora import log
from pyngora.metrics import multiproc
from pyngora.metrics.processes import ProcessesCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GZIP_LEVEL = 6  # level 9 costs several times the CPU for a few percent on this text


HealthSource = Callable[[], Iterable[tuple[str, str, int]]]
_HEALTH = multiproc.METRICS["pyngora_backend_healthy"]


# The gauge modes prometheus-client's merge knows; a file of another mode would be summed as
# if it were a gauge of every pid (samples under counters' names, each with a pid label).
_GAUGE_MODES = frozenset(("all", "liveall", "min", "livemin", "max", "livemax", "sum",
                          "livesum", "mostrecent", "livemostrecent"))
# Files already found readable, by (name, inode, size, mtime): most files of a scrape are
# rewritten every second (a new inode each), so this stays small; bounded anyway.
_good: dict[str, tuple[int, int, int]] = {}
_said: set[str] = set()  # unreadable files already named in the error log
_MAX_REMEMBERED = 4096


def _readable(path: str, name: str, mode: Optional[str]) -> bool:
    """Whether prometheus-client's merge can read the metrics file ``path`` (named ``name``,
    gauge ``mode`` or None). A file it cannot read used to fail every scrape (500, or 503)
    for as long as it lay there, so one torn or foreign file took the whole server's metrics
    away; such a file is now left out, and named once in the error log. Empty files (a
    prometheus-client file being created) are left out without a word."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False  # (archived meanwhile: the archive has its counts)
    except OSError as exc:
        return _unreadable(name, str(exc))
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    if _good.get(name) == stamp:
        return True
    if mode is not None and mode not in _GAUGE_MODES:
        return _unreadable(name, f"unknown gauge mode {mode!r}")
    if st.st_size < 8:
        return False
    try:
        for key, _value, _ts in multiproc.read_file(path):
            metric, sample, labels, help_text = json.loads(key)
            if not (isinstance(metric, str) and isinstance(sample, str)
                    and isinstance(help_text, str) and isinstance(labels, dict)
                    and all(isinstance(v, str) for v in labels.values())):
                raise ValueError(f"bad key {key[:80]!r}")
    except (OSError, ValueError, TypeError) as exc:
        return _unreadable(name, str(exc))
    if len(_good) >= _MAX_REMEMBERED:
        _good.clear()
    _good[name] = stamp
    return True


def _unreadable(name: str, why: str) -> bool:
    """Name an unreadable metrics file in the error log, once per file name; returns False."""
    if name not in _said and len(_said) < _MAX_REMEMBERED:
        _said.add(name)
        log.ERROR.warning("metrics file %s left out of /metrics: %s", name, why)
    return False


class _LockedCollector(MultiProcessCollector):
    """MultiProcessCollector that reads under the shared lock, skips dead pids' live gauges
    and leaves out the files it cannot read (see ``_readable``).

    ``skip`` names metric families left out (replaced by another source at scrape time).
    """

    def __init__(self, registry: CollectorRegistry, path: str, skip: frozenset[str]) -> None:
        super().__init__(registry, path=path)
        self._skip = skip

    def collect(self) -> Iterable[Metric]:  # called by generate_latest, once per scrape
        directory = self._path
        multiproc.prune_dead_live_gauges(directory)
        with multiproc.dir_lock(directory, exclusive=False):
            files = []
            for name in os.listdir(directory):
                m = multiproc.FILE_RE.match(name)
                path = os.path.join(directory, name)
                if m and _readable(path, name, m.group("mode")):
                    files.append(path)
            # Materialise inside the lock: merge() reads every file before returning.
            try:
                metrics = list(self.merge(files, accumulate=True))
            except (RuntimeError, LookupError, TypeError, ValueError, struct.error) as exc:
                # A file that went bad between the check and the merge (prometheus-client's
                # reader raises all of these): this scrape fails (503), the next one leaves
                # the file out.
                _good.clear()
                raise ValueError(f"a metrics file changed while read: {exc}") from None
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
