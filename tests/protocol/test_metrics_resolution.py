"""Durations in the metrics are measured finer than uvloop's clock: loop.time() counts whole
milliseconds (cached per loop iteration), which would record a fast request as 0 or exactly
1 ms and leave the histogram's 0.5 ms and 1 ms buckets meaningless."""
from __future__ import annotations

import asyncio

import pytest

from pyngora.metrics import multiproc, registry
from tests.protocol.test_http_app_helpers import run, serving
from tests.protocol.test_proxy_fast_path import proxy_service

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _whole_ms(seconds: float) -> bool:
    return abs(seconds * 1000 - round(seconds * 1000)) < 1e-6


def test_request_and_connect_durations_are_finer_than_a_millisecond(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(multiproc.ENV_VAR, raising=False)  # recorders only, no files

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await r.readuntil(b"\r\n\r\n"):
            w.write(OK)

    async def main() -> None:
        registry.reset()
        server = await asyncio.start_server(origin, "127.0.0.1", 0)
        conf, svc = proxy_service(server.sockets[0].getsockname()[1])
        try:
            async with serving(svc, conf) as (port, _ctx):
                for _ in range(5):  # a new client connection each, so one dial at least
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert (await asyncio.wait_for(r.readuntil(b"ok"), 5)).startswith(
                        b"HTTP/1.1 200 ")
                    w.close()
            served = registry.service_metrics("p")
            dialled = registry.upstream_metrics("o")
            assert sum(served.buckets) == 5 and sum(dialled.buckets) >= 1
            assert served.duration_sum > 0 and not _whole_ms(served.duration_sum)
            assert dialled.connect_sum > 0 and not _whole_ms(dialled.connect_sum)
        finally:
            server.close()
            registry.reset()
    run(main())
