"""The metrics of SPEC section 8 and the keys of their samples (a leaf: standard library only).

:data:`METRICS` maps each exposition name to its :class:`MetricDef` (type, HELP, labels,
gauge mode, buckets). The master (``multiproc``), the workers (``registry``) and the exporter
all read it, so a metric is declared once. :func:`sample_key` builds the key one sample has in
a multiprocess file, byte-identical to prometheus-client's; :func:`float_to_go` formats a
bucket bound the way prometheus-client does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

__all__ = ["MetricDef", "METRICS", "REQUEST_BUCKETS", "CONNECT_BUCKETS", "float_to_go",
           "series_key", "sample_key"]


# --------------------------------------------------------------------------- metric definitions
@dataclass(frozen=True)
class MetricDef:
    """One metric of SPEC section 8: its exposition name, type, HELP, labels and storage."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    mode: str = ""  # gauge multiprocess mode
    buckets: tuple[float, ...] = ()

    @property
    def prefix(self) -> str:
        """The file prefix prometheus-client uses for this type (``gauge_<mode>`` for gauges)."""
        return f"gauge_{self.mode}" if self.kind == "gauge" else self.kind

    @property
    def metric_name(self) -> str:
        """The family name stored in keys: prometheus-client strips ``_total`` from counters."""
        if self.kind == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name


_INF = float("inf")
# Proxy latencies: sub-millisecond for a local static origin up to a minute for slow backends.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, _INF)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, _INF)

_DEFS = (
    MetricDef("pyngora_requests_total", "counter",
              "Downstream requests answered, by service and HTTP status code.",
              ("service", "code")),
    MetricDef("pyngora_request_duration_seconds", "histogram",
              "Seconds from the start of a downstream request to the end of its response.",
              ("service",), buckets=REQUEST_BUCKETS),
    MetricDef("pyngora_upstream_requests_total", "counter",
              "Responses received from upstream backends, by upstream group, backend and "
              "status code.",
              ("upstream", "backend", "code")),
    MetricDef("pyngora_upstream_connect_duration_seconds", "histogram",
              "Seconds to open a new upstream connection (TCP connect and TLS handshake).",
              ("upstream",), buckets=CONNECT_BUCKETS),
    MetricDef("pyngora_upstream_errors_total", "counter",
              "Upstream failures, by upstream group, backend and error kind.",
              ("upstream", "backend", "kind")),
    MetricDef("pyngora_upstream_pool_reused_total", "counter",
              "Upstream requests sent on a reused keep-alive connection from the pool.",
              ("upstream",)),
    MetricDef("pyngora_backend_healthy", "gauge",
              "1 if the backend passes its health check, 0 if it does not.",
              ("upstream", "backend"), mode="livemostrecent"),
    MetricDef("pyngora_connections_active", "gauge",
              "Downstream connections open now.", ("service",), mode="livesum"),
    MetricDef("pyngora_connections_accepted_total", "counter",
              "Downstream connections accepted.", ("service",)),
    MetricDef("pyngora_request_bytes_total", "counter",
              "Request body bytes received from downstream clients (heads not counted).",
              ("service",)),
    MetricDef("pyngora_response_bytes_total", "counter",
              "Response body bytes sent to downstream clients (heads not counted).",
              ("service",)),
    MetricDef("pyngora_workers", "gauge",
              "Worker processes running now, per service (old and new master together during "
              "an upgrade).",
              ("service",), mode="livesum"),
    MetricDef("pyngora_worker_restarts_total", "counter",
              "Worker processes that died unexpectedly and were replaced by the master.",
              ("service",)),
    MetricDef("pyngora_upgrades_total", "counter",
              "Zero-downtime upgrades completed (listening sockets handed to a new master)."),
    MetricDef("pyngora_upgrade_failures_total", "counter",
              "Upgrades that failed; the old master kept serving."),
    MetricDef("pyngora_reloads_total", "counter",
              "Configuration reloads (SIGHUP) applied."),
    MetricDef("pyngora_build_info", "gauge",
              "Version of pyngora and Python of each running master; the value is always 1.",
              ("version", "python"), mode="livemax"),
)
METRICS: dict[str, MetricDef] = {d.name: d for d in _DEFS}


def float_to_go(value: float) -> str:
    """Format a bucket bound as prometheus-client does (``floatToGoString``), e.g. 1 -> ``1.0``."""
    d = float(value)
    if d == _INF:
        return "+Inf"
    if d == -_INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


# The label value standing for every name past the bound, and the bound: distinct services,
# upstreams, and backends per upstream, per process (registry) and in the archive of dead
# processes (multiproc), so that workers restarted again and again add no series.
OTHER = "other"
MAX_NAMES = 256


def series_key(metric_name: str, sample_name: str, labels: dict[str, str], help_text: str) -> str:
    """The key of one sample in a multiprocess file, byte-identical to prometheus-client's."""
    return json.dumps([metric_name, sample_name, labels, help_text], sort_keys=True)


def sample_key(d: MetricDef, values: tuple[str, ...], suffix: str = "",
               le: str | None = None) -> str:
    """Key of the sample of ``d`` with label ``values`` (in ``d.labels`` order); ``suffix`` is
    ``_bucket`` (with ``le``) or ``_sum`` for histograms."""
    labels = dict(zip(d.labels, values))
    if le is not None:
        labels["le"] = le
    sample = d.name + suffix
    return series_key(d.metric_name, sample, labels, d.help)
