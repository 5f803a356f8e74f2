"""A draining worker's last look at its listening sockets (server/worker.py ``take_queued``,
``serve_queued``), on real sockets in-process: what is queued is accepted and served, the
listener is closed at once, and a TLS client that never says hello holds up no other."""
from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from pyngora.server.accepting import accept_queue_length
from pyngora.server.worker import serve_queued, take_queued

from tests.protocol.test_http_app_helpers import run
from tests.support import self_signed_cert


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok:" + data)


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    return s


async def _queued(lsock: socket.socket, n: int) -> None:
    """Until the kernel has ``n`` connections in ``lsock``'s accept queue (connect() returns
    once the handshake is done on the client's side; the queue may lag under load)."""
    for _ in range(1000):
        if accept_queue_length(lsock) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"accept queue: {accept_queue_length(lsock)} of {n}")


def test_queued_connections_are_served_and_the_listener_closed() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = _listener()
        addr = lsock.getsockname()
        clients = [socket.create_connection(addr) for _ in range(3)]  # queued, not accepted
        await _queued(lsock, 3)
        conns = take_queued(lsock)
        assert len(conns) == 3 and lsock.fileno() == -1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=5)
        await serve_queued(loop, conns, _Echo, None)
        for i, c in enumerate(clients):
            c.setblocking(False)
            await loop.sock_sendall(c, b"%d" % i)
            assert await asyncio.wait_for(loop.sock_recv(c, 100), 10) == b"ok:%d" % i
            c.close()
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")
def test_a_silent_tls_client_holds_up_no_other(tmp_path: Path) -> None:
    """The first queued connection never sends its ClientHello; the second, queued behind it,
    is served at once (the drain used to await each handshake in turn: up to 60 s each)."""
    cert, key = self_signed_cert(tmp_path)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.create_default_context(cafile=cert)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = _listener()
        silent = socket.create_connection(lsock.getsockname())
        talker = socket.create_connection(lsock.getsockname())
        await _queued(lsock, 2)
        conns = take_queued(lsock)
        assert len(conns) == 2
        serving = loop.create_task(serve_queued(loop, conns, _Echo, sctx))
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            sock=talker, ssl=cctx, server_hostname="localhost"), 10)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(8), 10) == b"ok:hello"
        assert not serving.done()  # the silent client's handshake is still pending
        silent.close()  # its handshake fails; serve_queued closes it and returns
        await asyncio.wait_for(serving, 10)
        writer.close()
    run(main())
