"""The ``prometheus`` service on a real loopback socket: /metrics only, gzip, 404, 405, HEAD.

Runs the service's worker side in this process's event loop (start_worker + the protocol
factory on a port-0 listener), and talks raw HTTP/1.1 to it.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess
import sys

import pytest

from pyngora.metrics import exporter, multiproc, registry
from pyngora.metrics.service import PrometheusService, _path_of, prometheus_http_service


@pytest.fixture
def mdir(tmp_path, monkeypatch) -> str:
    """A metrics directory with 42 requests of service "web" flushed by this process."""
    d = str(tmp_path / "metrics")
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    multiproc.prepare_dir(d, fresh=True)
    registry.reset()
    registry.init_worker("web")
    m = registry.service_metrics("web")
    for _ in range(42):
        m.request_done(200, 0.01, 1, 1)
    registry.flush()
    # The exporter's per-process memory (files it named, files it found readable) starts
    # empty for each directory.
    monkeypatch.setattr(exporter, "_said", set(), raising=False)
    monkeypatch.setattr(exporter, "_good", {}, raising=False)
    yield d
    registry.reset()


async def _exchange(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request (Connection: close) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def _serve_and_ask(svc: PrometheusService, requests: list[bytes]) -> list[tuple[int, dict, bytes]]:
    from pyngora.config.schema import ServerConf, parse_address
    from pyngora.services.base import WorkerContext

    async def main() -> list[tuple[int, dict, bytes]]:
        loop = asyncio.get_running_loop()
        ctx = WorkerContext(svc, 0, 0, ServerConf(), loop)
        await svc.start_worker(ctx)
        factory = svc.protocol_factory(ctx, parse_address("127.0.0.1:0"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(factory, sock=sock)
        try:
            port = sock.getsockname()[1]
            return [await _exchange(port, r) for r in requests]
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_metrics_endpoint(mdir: str) -> None:
    svc = prometheus_http_service("metrics")
    assert svc.threads == 1
    answers = _serve_and_ask(svc, [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
        b"Connection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /metrics/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ])
    (s1, h1, b1), (s2, h2, b2), (s3, _, _), (s4, _, _), (s5, h5, _), (s6, h6, b6) = answers
    assert s1 == 200 and h1[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert b'pyngora_requests_total{code="200",service="web"} 42.0' in b1
    assert int(h1[b"content-length"]) == len(b1)
    assert s2 == 200 and h2[b"content-encoding"] == b"gzip"
    assert b'pyngora_requests_total{code="200",service="web"} 42.0' in gzip.decompress(b2)
    assert (s3, s4) == (404, 404)
    assert s5 == 405 and h5[b"allow"] == b"GET, HEAD"
    assert s6 == 200 and b6 == b"" and int(h6[b"content-length"]) > 0


def test_health_from_shared_table_replaces_worker_gauges(mdir: str, tmp_path) -> None:
    from pyngora.lb.backend import Backend
    from pyngora.lb.health_table import HealthTable

    registry.set_backend_healthy("api", "10.0.0.1:80", True)  # a worker's stale view
    registry.flush()
    path = str(tmp_path / "health.table")
    table = HealthTable.create(path, capacity=16)
    table.set_group("api", [Backend("10.0.0.1:80"), Backend("10.0.0.2:80")])
    table.set("api/10.0.0.1:80", False)
    table.set("api/10.0.0.2:80", True)
    svc = PrometheusService("metrics", health_tables=[path, str(tmp_path / "missing")])
    [(status, _, body)] = _serve_and_ask(
        svc, [b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert status == 200
    assert b'pyngora_backend_healthy{backend="10.0.0.1:80",upstream="api"} 0.0' in body
    assert b'pyngora_backend_healthy{backend="10.0.0.2:80",upstream="api"} 1.0' in body
    assert body.count(b"# TYPE pyngora_backend_healthy gauge") == 1


def test_path_of() -> None:
    assert _path_of(b"/metrics?a=b") == b"/metrics"
    assert _path_of(b"http://h:1/metrics?x") == b"/metrics"
    assert _path_of(b"http://h:1") == b"/"


def test_building_the_service_does_not_import_prometheus_client() -> None:
    """The master builds service objects from YAML: that must not load prometheus_client."""
    code = ("import sys; from pyngora.metrics.service import PrometheusService; "
            "PrometheusService('m'); "
            "print(any(m.startswith('prometheus_client') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
