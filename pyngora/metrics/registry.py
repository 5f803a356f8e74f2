"""Hot-path metrics recorders of a worker process, flushed to the multiprocess directory.

Runs in workers (and background or exporter processes), never in the master. The recorders
count in plain Python ints and floats; ``flush()`` (about once a second from the worker's loop,
and once more before it exits) folds those counts into the process's files in
``PROMETHEUS_MULTIPROC_DIR``, which the exporter sums with prometheus-client's
``MultiProcessCollector``.

Why not prometheus-client's metric objects on the request path: in multiprocess mode every
``inc()``/``observe()`` takes a lock, checks the pid and packs into an mmap. Measured on this
project's 2-core box (prometheus-client 0.26, CPython 3.11): ``Counter.inc`` 0.76 us,
``Histogram.observe`` 1.6 us, and one request's worth (requests, duration, two byte counters,
with ``labels()``) 7.1-7.6 us; ``ServiceMetrics.request_done`` does the same in 0.21 us, a
connection open+close 0.11 us, and a flush after 100,000 requests ~0.5 ms (see
tests/unit/test_metrics_registry.py, which prints the numbers). The price: a worker killed
with SIGKILL loses at most its last flush interval of counts (never more, never negative).

Everything here is single-threaded by design (one event loop per worker): no locks.

Cardinality is bounded: the API takes no path and no client address; a status code becomes a
3-digit string when registered, its class (``5xx``) when not, ``000`` outside 100..599; error
kinds are normalised to a short snake_case word; and each label takes at most a fixed number
of distinct values per process, after which new values are counted under ``other``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from bisect import bisect_left
from http import HTTPStatus
from typing import Any, Callable

from pyngora.metrics import multiproc
from pyngora.metrics.metric_defs import MAX_NAMES, OTHER  # noqa: F401 - (re-exported)
from pyngora.metrics.multiproc import CONNECT_BUCKETS, METRICS, REQUEST_BUCKETS, MetricDef

MAX_KINDS = 48  # distinct error kinds (ErrorType has 28)
FLUSH_INTERVAL = 1.0  # seconds; the worker's timer, see start_flusher

_REQ_BOUNDS = list(REQUEST_BUCKETS)
_CONN_BOUNDS = list(CONNECT_BUCKETS)
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# CamelCase word boundaries: "ConnectTimedout" -> Connect|Timedout, "TLSHandshake" -> TLS|Handshake
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


# Status codes that keep their own label value: IANA's registry (the standard library's
# HTTPStatus) and nginx's 499. Another code of 100..599 is counted under its class ("1xx" ..
# "5xx"), anything else under "000". An origin that echoes a client's choice (httpbin's
# /status/N, say) used to let a client add a series per code, 900 of them per service and per
# backend; now at most 69 (63 + 5 + 1) per label set.
_KNOWN_CODES = frozenset((*(s.value for s in HTTPStatus), 499))


def code_label(code: int) -> str:
    """A status code as a bounded label value: ``"200"`` for a registered code, its class
    (``"5xx"``) for another one of 100..599, ``"000"`` for anything else."""
    if type(code) is not int or not 100 <= code <= 599:
        return "000"
    return str(code) if code in _KNOWN_CODES else f"{code // 100}xx"


def kind_label(kind: Any) -> str:
    """An error kind as a bounded label value: ``ConnectTimedout`` -> ``connect_timedout``."""
    s = _CAMEL_RE.sub("_", str(getattr(kind, "name", kind))).lower()
    return s if _KIND_RE.match(s) else OTHER


class _Bounded:
    """Maps raw values to labels, producing at most ``cap`` distinct labels; then ``other``."""

    __slots__ = ("_memo", "_labels", "_cap", "_fn")

    def __init__(self, cap: int, fn: Any = str) -> None:
        self._memo: dict[Any, str] = {}
        self._labels: set[str] = set()
        self._cap = cap
        self._fn = fn

    def __call__(self, raw: Any) -> str:
        label = self._memo.get(raw)
        if label is None:
            label = self._fn(raw)
            if label not in self._labels:
                if len(self._labels) < self._cap:
                    self._labels.add(label)
                else:
                    label = OTHER
            if len(self._memo) < self._cap * 4:  # a memo, never growing without bound
                self._memo[raw] = label
        return label


class ServiceMetrics:
    """Recorders of one downstream service in this process; get it from ``service_metrics()``."""

    __slots__ = ("name", "codes", "buckets", "duration_sum", "req_bytes", "resp_bytes",
                 "active", "accepted")

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes: dict[int, int] = {}  # status code -> count since last flush
        self.buckets = [0] * len(_REQ_BOUNDS)
        self.duration_sum = 0.0
        self.req_bytes = 0
        self.resp_bytes = 0
        self.active = 0  # absolute, not a delta
        self.accepted = 0

    def request_done(self, code: int, duration_s: float, req_bytes: int, resp_bytes: int) -> None:
        """A downstream request ended with status ``code`` after ``duration_s`` seconds."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        if not duration_s >= 0.0:  # negative or NaN (clock trouble): count it as instant
            duration_s = 0.0
        self.buckets[bisect_left(_REQ_BOUNDS, duration_s)] += 1
        self.duration_sum += duration_s
        self.req_bytes += req_bytes
        self.resp_bytes += resp_bytes

    def connection_opened(self) -> None:
        """A downstream connection was accepted."""
        self.active += 1
        self.accepted += 1

    def connection_closed(self) -> None:
        """A downstream connection closed (pairs with ``connection_opened``)."""
        self.active -= 1


class UpstreamMetrics:
    """Recorders of one upstream group in this process; get it from ``upstream_metrics()``."""

    __slots__ = ("name", "requests", "errors", "buckets", "connect_sum", "reused")

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, Any], int] = {}
        self.buckets = [0] * len(_CONN_BOUNDS)
        self.connect_sum = 0.0
        self.reused = 0

    def request_done(self, backend: str, code: int) -> None:
        """``backend`` (its address) answered a request with status ``code``."""
        key = (backend, code)
        d = self.requests
        d[key] = d.get(key, 0) + 1

    def connect_duration(self, seconds: float) -> None:
        """A new upstream connection took ``seconds`` to open (TCP and TLS)."""
        if not seconds >= 0.0:
            seconds = 0.0
        self.buckets[bisect_left(_CONN_BOUNDS, seconds)] += 1
        self.connect_sum += seconds

    def error(self, backend: str, kind: Any) -> None:
        """A failure talking to ``backend``; ``kind`` is an ErrorType (or its name)."""
        key = (backend, kind)
        d = self.errors
        d[key] = d.get(key, 0) + 1

    def pool_reused(self) -> None:
        """A request went out on a reused pooled connection."""
        self.reused += 1


class _State:
    """Everything this process has recorded; replaced wholesale by ``init_worker``."""

    def __init__(self, service: str | None) -> None:
        self.pid = os.getpid()
        self.service = service
        self.services: dict[str, ServiceMetrics] = {}
        self.upstreams: dict[str, UpstreamMetrics] = {}
        self.health: dict[tuple[str, str], tuple[float, float]] = {}
        self.health_dirty = False
        self.files: multiproc.ProcessFiles | None = None
        self.stop_flusher: Callable[..., None] | None = None
        self.keys: dict[tuple[Any, ...], str] = {}
        self.service_label = _Bounded(MAX_NAMES)
        self.upstream_label = _Bounded(MAX_NAMES)
        self.backend_labels: dict[str, _Bounded] = {}
        self.kind_label = _Bounded(MAX_KINDS, kind_label)
        self.code_label = _Bounded(128, code_label)

    def key(self, d: MetricDef, values: tuple[str, ...], suffix: str = "",
            le: str | None = None) -> str:
        """Cached multiprocess key (building JSON costs microseconds; the set is bounded)."""
        ck = (d.name, values, suffix, le)
        k = self.keys.get(ck)
        if k is None:
            k = self.keys[ck] = multiproc.sample_key(d, values, suffix, le)
        return k


_state = _State(None)


def init_worker(service: str | None = None) -> None:
    """Start this process's metrics; a worker calls it once right after fork.

    Drops anything inherited from the parent (its counts are in its own files), and creates
    the service's series at zero so that dashboards show 0 rather than nothing before the
    first request. Recorders already handed out in this process stay valid (calling it after
    a service's ``start_worker`` took its recorders loses nothing).
    """
    global _state
    if _state.pid != os.getpid():
        _state = _State(service)
    elif service is not None:
        _state.service = service
    if service is not None:
        service_metrics(service)


def reset() -> None:
    """Forget everything recorded in this process (tests; never on a serving worker)."""
    global _state
    if _state.stop_flusher is not None:
        _state.stop_flusher(False)
    _state = _State(None)


def _current() -> _State:
    if _state.pid != os.getpid():  # forked without init_worker: the parent's counts are not ours
        init_worker(_state.service)
    return _state


def _ensure_flusher(st: _State) -> None:
    """Start the flush timer the first time recorders are taken inside a running loop, so a
    worker that only wires recorders still publishes (its exit still needs ``close()``)."""
    if st.stop_flusher is None and multiproc.metrics_dir() is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        start_flusher(loop)


def service_metrics(service: str) -> ServiceMetrics:
    """The recorders of ``service`` (the same object on every call; keep a reference)."""
    st = _current()
    m = st.services.get(service)
    if m is None:
        m = st.services[service] = ServiceMetrics(service)
    _ensure_flusher(st)
    return m


def upstream_metrics(upstream: str) -> UpstreamMetrics:
    """The recorders of upstream group ``upstream`` (the same object on every call)."""
    st = _current()
    m = st.upstreams.get(upstream)
    if m is None:
        m = st.upstreams[upstream] = UpstreamMetrics(upstream)
    _ensure_flusher(st)
    return m


def set_backend_healthy(upstream: str, backend: str, healthy: bool) -> None:
    """Publish a health verdict; the most recent one over all live processes wins."""
    st = _current()
    st.health[(upstream, backend)] = (1.0 if healthy else 0.0, time.time())
    st.health_dirty = True


def _hist(st: _State, files: multiproc.ProcessFiles, d: MetricDef, values: tuple[str, ...],
          buckets: list[int], total: float) -> None:
    for i, n in enumerate(buckets):
        files.add(d.prefix, st.key(d, values, "_bucket", multiproc.float_to_go(d.buckets[i])), n)
    files.add(d.prefix, st.key(d, values, "_sum"), total)


def flush() -> int:
    """Fold the counts since the last flush into this process's files; returns files written.

    The worker calls it about every second (see ``start_flusher``) and once more before it
    exits. Does nothing (returns 0) when ``PROMETHEUS_MULTIPROC_DIR`` is not set.
    """
    st = _current()
    directory = multiproc.metrics_dir()
    if directory is None:
        return 0
    files = st.files
    if files is None or files.directory != directory:
        files = st.files = multiproc.ProcessFiles(directory)
    _flush_services(st, files)
    _flush_upstreams(st, files)
    if st.health_dirty:
        d = METRICS["pyngora_backend_healthy"]
        for (up, be), (value, ts) in st.health.items():
            values = (st.upstream_label(up), _backend_label(st, up, be))
            files.set(d.prefix, st.key(d, values), value, ts)
        st.health_dirty = False
    return files.write()


def _backend_label(st: _State, upstream: str, backend: str) -> str:
    bounded = st.backend_labels.get(upstream)
    if bounded is None:
        bounded = st.backend_labels[upstream] = _Bounded(MAX_NAMES)
    return bounded(backend)


def _flush_services(st: _State, files: multiproc.ProcessFiles) -> None:
    req, dur = METRICS["pyngora_requests_total"], METRICS["pyngora_request_duration_seconds"]
    acc, act = METRICS["pyngora_connections_accepted_total"], METRICS["pyngora_connections_active"]
    rqb, rsb = METRICS["pyngora_request_bytes_total"], METRICS["pyngora_response_bytes_total"]
    for m in st.services.values():
        svc = (st.service_label(m.name),)
        codes, m.codes = m.codes, {}
        for code, n in codes.items():
            files.add(req.prefix, st.key(req, (svc[0], st.code_label(code))), n)
        buckets, m.buckets = m.buckets, [0] * len(_REQ_BOUNDS)
        _hist(st, files, dur, svc, buckets, m.duration_sum)
        m.duration_sum = 0.0
        files.add(rqb.prefix, st.key(rqb, svc), m.req_bytes)
        files.add(rsb.prefix, st.key(rsb, svc), m.resp_bytes)
        files.add(acc.prefix, st.key(acc, svc), m.accepted)
        m.req_bytes = m.resp_bytes = m.accepted = 0
        files.set(act.prefix, st.key(act, svc), float(m.active))


def _flush_upstreams(st: _State, files: multiproc.ProcessFiles) -> None:
    req, err = METRICS["pyngora_upstream_requests_total"], METRICS["pyngora_upstream_errors_total"]
    con = METRICS["pyngora_upstream_connect_duration_seconds"]
    reu = METRICS["pyngora_upstream_pool_reused_total"]
    for m in st.upstreams.values():
        up = st.upstream_label(m.name)
        requests, m.requests = m.requests, {}
        for (backend, code), n in requests.items():
            values = (up, _backend_label(st, m.name, backend), st.code_label(code))
            files.add(req.prefix, st.key(req, values), n)
        errors, m.errors = m.errors, {}
        for (backend, kind), n in errors.items():
            values = (up, _backend_label(st, m.name, backend), st.kind_label(kind))
            files.add(err.prefix, st.key(err, values), n)
        buckets, m.buckets = m.buckets, [0] * len(_CONN_BOUNDS)
        _hist(st, files, con, (up,), buckets, m.connect_sum)
        m.connect_sum = 0.0
        files.add(reu.prefix, st.key(reu, (up,)), m.reused)
        m.reused = 0


def start_flusher(loop: Any, interval: float = FLUSH_INTERVAL,
                  on_error: Callable[[OSError], None] | None = None) -> Callable[..., None]:
    """Call ``flush()`` every ``interval`` seconds on an asyncio ``loop``; returns a stopper.

    Replaces any flusher started before in this process (one timer per process). The
    returned callable cancels the timer and flushes one last time (call it at exit, or call
    ``close()``; it raises OSError if that last flush fails).
    A failing flush (disk full, a directory the worker's user cannot write) is retried on the
    next tick instead of killing the worker; ``on_error`` hears about the first failure of each
    streak (give it the error log).
    """
    st = _current()
    if st.stop_flusher is not None:
        st.stop_flusher(False)
    handle: list[Any] = [None]
    failing = [False]

    def tick() -> None:
        try:
            flush()
            failing[0] = False
        except OSError as exc:  # counts stay in memory; the next tick retries
            if not failing[0] and on_error is not None:
                on_error(exc)
            failing[0] = True
        handle[0] = loop.call_later(interval, tick)

    handle[0] = loop.call_later(interval, tick)

    def stop(final_flush: bool = True) -> None:
        if handle[0] is not None:
            handle[0].cancel()
            handle[0] = None
        if st.stop_flusher is stop:
            st.stop_flusher = None
        if final_flush:
            flush()

    st.stop_flusher = stop
    return stop


def close() -> None:
    """A worker's last metrics call before ``os._exit``: stop the timer, flush everything.

    Raises OSError if the directory cannot be written (the caller logs it and exits anyway).
    """
    st = _current()
    if st.stop_flusher is not None:
        st.stop_flusher(True)
    else:
        flush()


# Master-side recorders live in the leaf ``multiproc`` (the master imports no prometheus_client
# and nothing heavy); re-exported here so callers can find every recorder in one place.
workers = multiproc.workers
worker_restart = multiproc.worker_restart
upgrade = multiproc.upgrade
upgrade_failed = multiproc.upgrade_failed
reload = multiproc.reload
build_info = multiproc.build_info
