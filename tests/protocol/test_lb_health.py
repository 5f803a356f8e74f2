"""Health checks against real local servers (asyncio, port 0), and the HealthService prober."""
from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from typing import Any, Awaitable, Callable, Optional

import pytest

from pyngora.lb import (Backend, HealthGroup, HealthService, HealthTable, HttpHealthCheck,
                        LoadBalancer, TcpHealthCheck)
from pyngora.config.loader import parse_text
from pyngora.lb.balancer import health_group_from_conf
from pyngora.lb.health_table import HEALTHY, UNHEALTHY

from tests.support import self_signed_cert


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Await a condition with a bounded number of short polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Origin:
    """A tiny HTTP origin on 127.0.0.1: answers every request with ``status`` and counts them.
    ``stop()``/``start()`` close and reopen the same port."""

    def __init__(self, status: int = 200, ssl_ctx: Optional[ssl.SSLContext] = None) -> None:
        self.status = status
        self.hits = 0
        self.requests: list[bytes] = []
        self.port = 0
        self.ssl_ctx = ssl_ctx
        self.server: Optional[asyncio.base_events.Server] = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            self.requests.append(head)
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % self.status)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(self) -> "Origin":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                 ssl=self.ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def backend(self) -> Backend:
        return Backend(f"127.0.0.1:{self.port}")


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_tcp_refused_unhealthy_after_threshold_then_recovers() -> None:
    async def main() -> None:
        origin = await Origin().start()
        changes: list[tuple[Backend, bool]] = []
        check = TcpHealthCheck(unhealthy_after=3, healthy_after=2, timeout=2.0,
                               health_changed_callback=lambda b, ok: changes.append((b, ok)))
        lb = LoadBalancer([origin.backend], health_check=check)
        b = origin.backend
        await lb.run_health_check()
        assert lb.is_healthy(b) and changes == []
        await origin.stop()  # now refused
        for _ in range(2):
            await lb.run_health_check()
            assert lb.is_healthy(b)
        await lb.run_health_check()
        assert not lb.is_healthy(b) and lb.select(b"") is None
        assert changes == [(b, False)]
        await origin.start()  # same port
        await lb.run_health_check()
        assert not lb.is_healthy(b)
        await lb.run_health_check()
        assert lb.is_healthy(b) and lb.select(b"") == b
        assert changes == [(b, False), (b, True)]
        await origin.stop()
    run(main())


def test_http_wrong_status_and_request_shape() -> None:
    async def main() -> None:
        origin = await Origin(status=503).start()
        seen: list[bool] = []

        async def cb(backend: Backend, ok: bool) -> None:  # async callbacks are awaited
            seen.append(ok)

        check = HttpHealthCheck("svc.example", path="/healthz", expect_status=200,
                                health_changed_callback=cb)
        lb = LoadBalancer([origin.backend], health_check=check)
        await lb.run_health_check()
        assert not lb.is_healthy(origin.backend) and seen == [False]
        head = origin.requests[-1]
        assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
        assert b"\r\nHost: svc.example\r\n" in head
        origin.status = 200
        await lb.run_health_check()
        assert lb.is_healthy(origin.backend) and seen == [False, True]
        with pytest.raises(Exception):
            await HttpHealthCheck("x", expect_status=204).check(origin.backend)
        await origin.stop()
    run(main())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_http_check_names_an_ipv6_or_unix_backend_by_a_valid_host(tmp_path: Any) -> None:
    """A backend without a name of its own is named by its address: an IPv6 literal goes in
    brackets (nginx answers 400 to ``Host: ::1``), a Unix socket as localhost (a path is no
    Host); the check must see the answer a proxied request would get."""
    async def main() -> None:
        heads: list[bytes] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            head = await r.readuntil(b"\r\n\r\n")
            heads.append(head)
            host = head.split(b"\r\nHost: ", 1)[1].split(b"\r\n", 1)[0]
            ok = host in (b"[::1]", b"localhost")  # nginx's rule: no bare ':' or '/'
            w.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % (200 if ok else 400))
            await w.drain()
            w.close()

        backends = []
        servers = []
        if _ipv6_loopback():
            srv6 = await asyncio.start_server(handle, "::1", 0)
            servers.append(srv6)
            backends.append(Backend(f"[::1]:{srv6.sockets[0].getsockname()[1]}"))
        path = str(tmp_path / "h.sock")
        servers.append(await asyncio.start_unix_server(handle, path))
        backends.append(Backend(f"unix:{path}"))
        for backend in backends:
            await HttpHealthCheck(None).check(backend)  # raises unless 200
        assert len(heads) == len(backends)
        for srv in servers:
            srv.close()
    run(main())


def test_http_check_timeout_and_garbage() -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)  # never answers; returns when the checker hangs up
            writer.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n")
            writer.close()

        s1 = await asyncio.start_server(silent, "127.0.0.1", 0)
        s2 = await asyncio.start_server(garbage, "127.0.0.1", 0)
        b1 = Backend(f"127.0.0.1:{s1.sockets[0].getsockname()[1]}")
        b2 = Backend(f"127.0.0.1:{s2.sockets[0].getsockname()[1]}")
        lb = LoadBalancer([b1, b2], health_check=HttpHealthCheck("h", timeout=0.3))
        await lb.run_health_check()
        assert not lb.is_healthy(b1) and not lb.is_healthy(b2)
        for s in (s1, s2):
            s.close()
            await s.wait_closed()
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
def test_https_check_with_sni(tmp_path: Any) -> None:
    pair = self_signed_cert(tmp_path, "health.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pair)
    snis: list[Optional[str]] = []
    ctx.sni_callback = lambda sock, name, c: snis.append(name)  # type: ignore[assignment]

    async def main() -> None:
        origin = await Origin(ssl_ctx=ctx).start()
        await HttpHealthCheck("health.test", tls=True, verify=False).check(origin.backend)
        assert snis == ["health.test"]
        with pytest.raises(ssl.SSLError):  # verification on: a self-signed cert is refused
            await HttpHealthCheck("health.test", tls=True).check(origin.backend)
        await origin.stop()
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
def test_each_backend_is_checked_as_the_proxy_talks_to_it(tmp_path: Any) -> None:
    """From the YAML: a plain backend and a TLS one in one group, the TLS one verified against
    the server's ``ca_file`` (a review found the plain one probed with TLS and marked down, and
    ``ca_file`` ignored: healthy backends taken out of service)."""
    cert, key = self_signed_cert(tmp_path, "origin.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def main() -> None:
        plain = await Origin().start()
        secure = await Origin(ssl_ctx=ctx).start()
        conf = parse_text(f"""services:
  - name: p
    type: http_proxy
    listeners: ['127.0.0.1:0']
    upstreams:
      - name: mixed
        backends:
          - {{addr: "{plain.backend.addr}"}}
          - {{addr: "{secure.backend.addr}", tls: true, sni: origin.test}}
        health_check: {{type: http}}
""", "h.yaml")
        group = health_group_from_conf(conf.services[0].spec.upstreams[0], ca_file=cert)
        for b in group.backends.get():
            await group.health_check.check(b)  # raises when unhealthy
        assert plain.hits == 1 and secure.hits == 1
        without_ca = health_group_from_conf(conf.services[0].spec.upstreams[0])
        tls_backend = [b for b in without_ca.backends.get() if b.ext["tls"]][0]
        with pytest.raises(ssl.SSLError):  # the system CAs do not know this origin
            await without_ca.health_check.check(tls_backend)
        await plain.stop()
        await secure.stop()
    run(main())


def test_health_service_probes_each_backend_once_per_interval(tmp_path: Any) -> None:
    path = str(tmp_path / "run" / "health.tbl")

    async def main() -> None:
        origins = [await Origin().start() for _ in range(3)]
        web = await Origin().start()
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
        dead.close()  # nothing listens there: refused
        changes: list[tuple[str, str, bool]] = []
        groups = [
            HealthGroup("api", [o.backend for o in origins],
                        HttpHealthCheck("api", unhealthy_after=2, timeout=2.0),
                        interval_seconds=0.2),
            HealthGroup("web", [web.backend, Backend(dead_addr)], TcpHealthCheck(timeout=2.0),
                        interval_seconds=0.2),
        ]
        svc = HealthService(path, groups,
                            on_change=lambda g, b, ok: changes.append((g, b.addr, ok)))
        shutdown = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.ensure_future(svc.run(shutdown, ready.set))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            # After the first full round the table already has real health.
            reader = HealthTable.open(path)
            assert reader.state(f"web/{dead_addr}") == UNHEALTHY
            assert reader.state(f"web/{web.backend.addr}") == HEALTHY
            assert ("web", dead_addr, False) in changes
            # Probes: every backend of a group the same number of times, one per round.
            await until(lambda: min(o.hits for o in origins) >= 4)
            hits = [o.hits for o in origins]
            assert max(hits) - min(hits) <= 1
            # A worker's balancer reads the table.
            lb = LoadBalancer([o.backend for o in origins])
            lb.attach_health_table(reader, "api")
            assert {lb.select(b"") for _ in range(9)} == {o.backend for o in origins}
            origins[1].status = 500  # two failed rounds -> unhealthy everywhere
            await until(lambda: reader.state(f"api/{origins[1].backend.addr}") == UNHEALTHY)
            assert origins[1].backend not in {lb.select(b"") for _ in range(9)}
            assert ("api", origins[1].backend.addr, False) in changes
            origins[1].status = 200
            await until(lambda: reader.state(f"api/{origins[1].backend.addr}") == HEALTHY)
            assert origins[1].backend in {lb.select(b"") for _ in range(9)}
            assert reader.updated_at > 0
            lb.close()
        finally:
            shutdown.set()
            await asyncio.wait_for(task, 10)
            for o in origins + [web]:
                await o.stop()
        # A new prober (restart, upgrade) starts from the stored state: no "all healthy" gap.
        again = HealthTable.open(path)
        assert again.state(f"web/{dead_addr}") == UNHEALTHY
        again.close()

    run(main())


def test_health_service_with_no_groups_is_ready_at_once(tmp_path: Any) -> None:
    async def main() -> None:
        shutdown = asyncio.Event()
        called: list[int] = []

        class Notifier:
            def notify_ready(self) -> None:
                called.append(1)
                shutdown.set()

        await HealthService(str(tmp_path / "t"), []).run(shutdown, Notifier())  # type: ignore
        assert called == [1]
    run(main())


def _prober_child(lb: LoadBalancer, stop: Any) -> None:
    """A background-service process running Pingora's health-check loop for ``lb``."""
    async def main() -> None:
        shutdown = asyncio.Event()
        fut = asyncio.get_running_loop().run_in_executor(None, stop.wait, 20)
        fut.add_done_callback(lambda _: shutdown.set())
        await lb.start(shutdown)
    asyncio.run(main())


def test_pingora_style_background_lb_shares_health_with_forked_workers(tmp_path: Any) -> None:
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(128)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    live_addr = f"127.0.0.1:{live.getsockname()[1]}"
    # Built once (in the "master"), then used by the prober process and by this "worker".
    lb = LoadBalancer.try_from_iter([live_addr, dead_addr])
    lb.set_health_check(TcpHealthCheck(timeout=2.0))
    lb.health_check_frequency = 0.1
    lb.attach_health_table(str(tmp_path / "lb.tbl"), "default")
    lb.sync_interval = 0.0
    stop = ctx.Event()
    proc = ctx.Process(target=_prober_child, args=(lb, stop))
    proc.start()
    try:
        async def picks() -> None:
            await until(lambda: {lb.select(b"") for _ in range(6)} == {Backend(live_addr)},
                        timeout=15)
        run(picks())
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        live.close()
        lb.close()
    assert proc.exitcode == 0
