"""The worker-side recorders: bounded labels, flushing, the flush timer, and their cost.

The micro-benchmark at the end prints per-call costs (run with ``-s`` to see them); it asserts
nothing about time, only that both sides counted.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time

import pytest

from pyngora.metrics import multiproc, registry


@pytest.fixture
def mdir(tmp_path, monkeypatch) -> str:
    d = str(tmp_path / "metrics")
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    multiproc.prepare_dir(d, fresh=True)
    registry.reset()
    registry.init_worker("web")
    yield d
    registry.reset()


def series(directory: str) -> set[str]:
    """Every sample key in every file of ``directory``."""
    keys: set[str] = set()
    for name in os.listdir(directory):
        if multiproc.FILE_RE.match(name):
            keys.update(k for k, _v, _t in multiproc.read_file(os.path.join(directory, name)))
    return keys


def test_labels_are_bounded() -> None:
    assert registry.code_label(200) == "200"
    assert registry.code_label(99) == "000"
    assert registry.code_label(1000) == "000"
    assert registry.code_label("200") == "000"  # type: ignore[arg-type]
    assert registry.kind_label("ConnectTimedout") == "connect_timedout"
    assert registry.kind_label("TLSHandshakeFailure") == "tls_handshake_failure"
    assert registry.kind_label("InvalidHTTPHeader") == "invalid_http_header"
    assert registry.kind_label("H2Error") == "h2_error"
    from pyngora.errors import ErrorType
    labels = {registry.kind_label(e) for e in ErrorType}
    assert len(labels) == len(ErrorType) and "other" not in labels
    assert registry.kind_label("read_timeout") == "read_timeout"
    assert registry.kind_label("/etc/passwd?x=1") == "other"
    assert registry.kind_label("x" * 200) == "other"


def test_recorders_take_no_path_or_address() -> None:
    """The API has nowhere to put a URL or a client address."""
    params = set()
    for fn in (registry.ServiceMetrics.request_done, registry.UpstreamMetrics.request_done,
               registry.UpstreamMetrics.error, registry.UpstreamMetrics.connect_duration):
        params |= set(inspect.signature(fn).parameters)
    assert params == {"self", "code", "duration_s", "req_bytes", "resp_bytes", "backend", "kind",
                      "seconds"}


def test_10000_distinct_urls_create_no_new_series(mdir: str) -> None:
    m = registry.service_metrics("web")
    up = registry.upstream_metrics("api")
    m.request_done(200, 0.01, 10, 10)
    up.request_done("10.0.0.1:80", 200)
    registry.flush()
    before = series(mdir)
    for i in range(10_000):
        url = f"/items/{i}?q={i * 7919}"  # what a client sends; the recorders never see it
        m.connection_opened()
        m.request_done(200, len(url) / 1e5, len(url), 100)
        m.connection_closed()
        up.request_done("10.0.0.1:80", 200)
    registry.flush()
    assert series(mdir) == before


def test_hostile_label_values_are_capped(mdir: str) -> None:
    """Even a buggy caller passing 10,000 distinct backends/kinds/codes gets bounded series."""
    up = registry.upstream_metrics("api")
    for i in range(10_000):
        up.error(f"10.{i // 256}.{i % 256}.1:80", f"Kind{i}")
        up.request_done("b", 100000 + i)
    registry.flush()
    keys = series(mdir)
    errs = [k for k in keys if '"pyngora_upstream_errors_total"' in k]
    backends = {k.split('"backend": "')[1].split('"')[0] for k in errs}
    kinds = {k.split('"kind": "')[1].split('"')[0] for k in errs}
    assert len(backends) <= registry.MAX_NAMES + 1 and "other" in backends
    assert len(kinds) <= registry.MAX_KINDS + 1 and "other" in kinds
    codes = [k for k in keys if '"pyngora_upstream_requests_total"' in k]
    assert len(codes) == 1 and '"code": "000"' in codes[0]


def test_flush_writes_only_changes_and_zero_series_show(mdir: str) -> None:
    assert registry.flush() > 0  # first flush: the service's series appear at 0
    keys = series(mdir)
    assert any('"pyngora_connections_active"' in k for k in keys)
    assert any('"pyngora_request_duration_seconds_bucket"' in k for k in keys)
    assert registry.flush() == 0  # nothing happened: nothing written
    registry.service_metrics("web").connection_opened()
    assert registry.flush() == 2  # the accepted counter and the active gauge


def test_flush_without_directory_is_a_noop(monkeypatch) -> None:
    monkeypatch.delenv(multiproc.ENV_VAR, raising=False)
    registry.reset()
    registry.init_worker("web")
    registry.service_metrics("web").request_done(200, 0.1, 1, 1)
    assert registry.flush() == 0


def test_flusher_runs_on_the_loop(mdir: str) -> None:
    async def main() -> None:
        stop = registry.start_flusher(asyncio.get_running_loop(), interval=0.02)
        registry.service_metrics("web").request_done(200, 0.1, 1, 1)
        path = multiproc.own_path(mdir, "counter", os.getpid())
        for _ in range(500):  # bounded wait for the condition
            if any('"code": "200"' in k for k, _v, _t in multiproc.read_file(path)):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the flusher never wrote the count")
        registry.service_metrics("web").request_done(404, 0.1, 1, 1)
        stop()  # cancels the timer and flushes the rest
        assert any('"code": "404"' in k for k, _v, _t in multiproc.read_file(path))

    asyncio.run(main())


def test_recorders_taken_before_init_worker_stay_valid(mdir: str) -> None:
    m = registry.service_metrics("web")
    registry.init_worker("web")  # a worker calling it late must not orphan m
    m.request_done(201, 0.1, 1, 1)
    registry.close()
    assert any('"code": "201"' in k for k in series(mdir))


def test_taking_recorders_in_a_loop_starts_the_flusher(mdir: str) -> None:
    async def main() -> None:
        m = registry.service_metrics("auto")  # no start_flusher call: it starts by itself
        m.request_done(202, 0.1, 1, 1)
        for _ in range(300):  # bounded: FLUSH_INTERVAL is 1 s
            if any('"code": "202"' in k for k in series(mdir)):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("nothing flushed by the automatic timer")
        m.request_done(203, 0.1, 1, 1)
        registry.close()  # the worker's exit: cancel the timer, flush the rest
        assert any('"code": "203"' in k for k in series(mdir))

    asyncio.run(main())


def test_flusher_reports_a_failing_directory_once(tmp_path, monkeypatch) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv(multiproc.ENV_VAR, str(blocked))  # every write fails
    registry.reset()
    registry.init_worker("web")
    errors: list[OSError] = []

    async def main() -> None:
        stop = registry.start_flusher(asyncio.get_running_loop(), interval=0.01,
                                      on_error=errors.append)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if errors:
                break
        await asyncio.sleep(0.05)  # several more failing ticks
        with pytest.raises(OSError):
            stop()  # the last flush reports to the caller

    asyncio.run(main())
    assert len(errors) == 1
    registry.reset()


def _per_call_us(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


_PC_BENCH = """
import os, sys, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import Counter, Histogram
c = Counter("pyngora_requests_total", "h", ["service", "code"])
h = Histogram("pyngora_request_duration_seconds", "h", ["service"])
b1 = Counter("pyngora_request_bytes_total", "h", ["service"])
b2 = Counter("pyngora_response_bytes_total", "h", ["service"])
def req():
    c.labels("web", "200").inc(); h.labels("web").observe(0.0123)
    b1.labels("web").inc(120); b2.labels("web").inc(1500)
n = 50000
t = time.perf_counter()
for _ in range(n):
    req()
print((time.perf_counter() - t) / n * 1e6)
"""


def test_hot_path_micro_benchmark(mdir: str, tmp_path) -> None:
    """Prints the per-request cost of the recorders vs prometheus-client's multiprocess objects."""
    m = registry.service_metrics("web")
    n = 100_000
    ours = _per_call_us(lambda: m.request_done(200, 0.0123, 120, 1500), n)
    conn = _per_call_us(lambda: (m.connection_opened(), m.connection_closed()), n)
    t = time.perf_counter()
    registry.flush()
    flush_us = (time.perf_counter() - t) * 1e6
    pc_dir = tmp_path / "pc"
    pc_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", _PC_BENCH, str(pc_dir)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = float(out.stdout)
    print(f"\nrecorder request_done: {ours:.2f} us/call; connection open+close: {conn:.2f} us; "
          f"flush after {2 * n} calls: {flush_us:.0f} us; prometheus-client multiprocess "
          f"Counter/Histogram for the same request: {theirs:.2f} us/call")
    from pyngora.metrics import exporter
    body, _ = exporter.render(mdir)
    assert b'pyngora_requests_total{code="200",service="web"} 100000.0' in body
