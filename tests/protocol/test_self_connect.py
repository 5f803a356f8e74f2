"""A TCP dial that the kernel connects to itself is a refused connect, not an upstream.

Linux completes a connect() to a dead local port in the ephemeral range as a simultaneous open
when it picks that very port as the source. The proxy then read its own request back as the
"response" (a 502, no retry) and a TCP health check called the dead backend healthy.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional

import pytest

from pyngora.errors import Error, ErrorType
from pyngora.lb.backend import Backend
from pyngora.lb.health import TcpHealthCheck
from pyngora.upstreams.dial import connected_to_itself, dial
from pyngora.upstreams.peer import HttpPeer

from tests.protocol.test_http_app_helpers import run

# A sweep of connect() calls to one dead port walks the source ports; on this kernel the dead
# port came up within 36,000 attempts in every trial (a port of the parity connect() prefers).
_SWEEP_ATTEMPTS = 150_000
_SWEEP_SECONDS = 40.0


def _dead_connect_port() -> int:
    """A free 127.0.0.1 port in the ephemeral range, of the parity connect() picks from
    (bind(0) picks the other one)."""
    for _ in range(100):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1] + 1
        probe.close()
        check = socket.socket()
        try:
            check.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            check.close()
        return port
    raise AssertionError("no free port found")


class _Sink(asyncio.Protocol):
    transport: Optional[asyncio.BaseTransport] = None
    alpn: Optional[str] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


def test_a_socket_connected_to_itself_is_recognised_and_a_real_connection_is_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        own = socket.socket()
        own.bind(("127.0.0.1", 0))
        own.connect(own.getsockname())  # the simultaneous open, made deliberately
        transport, _ = await loop.create_connection(_Sink, sock=own)
        assert connected_to_itself(transport)
        transport.abort()

        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(_Sink, "127.0.0.1", port)
        assert not connected_to_itself(transport)
        transport.abort()
        server.close()
    run(main())


def test_dials_to_a_dead_port_are_all_refused_even_the_one_connected_to_itself() -> None:
    async def main() -> tuple[int, int]:
        peer = HttpPeer(f"127.0.0.1:{_dead_connect_port()}")
        deadline = time.monotonic() + _SWEEP_SECONDS
        for attempt in range(1, _SWEEP_ATTEMPTS + 1):
            try:
                proto, _, _ = await dial(peer, _Sink, None)
            except Error as err:
                assert err.etype is ErrorType.ConnectRefused and err.retry, err
                if "itself" in str(err.cause):
                    return attempt, 1
                if time.monotonic() > deadline:
                    break
                continue
            proto.transport.abort()
            raise AssertionError(f"dial {attempt} to a dead port returned a connection")
        return attempt, 0
    attempts, found = run(main(), timeout=_SWEEP_SECONDS + 20)
    if not found:
        pytest.skip(f"the kernel never picked the dead port as a source in {attempts} dials")


def test_a_tcp_health_check_of_a_dead_port_never_passes() -> None:
    async def main() -> tuple[int, int]:
        backend = Backend(f"127.0.0.1:{_dead_connect_port()}")
        check = TcpHealthCheck()
        deadline = time.monotonic() + _SWEEP_SECONDS
        for attempt in range(1, _SWEEP_ATTEMPTS + 1):
            try:
                await check.check(backend)
            except ConnectionRefusedError as exc:
                if "itself" in str(exc):
                    return attempt, 1
                if time.monotonic() > deadline:
                    break
                continue
            raise AssertionError(f"check {attempt} of a dead port passed")
        return attempt, 0
    attempts, found = run(main(), timeout=_SWEEP_SECONDS + 20)
    if not found:
        pytest.skip(f"the kernel never picked the dead port as a source in {attempts} checks")
