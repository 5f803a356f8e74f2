"""UpstreamConnection sends TCP_QUICKACK once per response that arrives in more than one read,
so an origin whose last short segment waits for our ACK (nginx's sendfile + tcp_nopush) is not
stalled by the 40 ms delayed-ACK timer; a response read whole costs nothing, and a Unix socket
is never asked. Real loopback sockets; the connection's socket is wrapped only to count the
setsockopt calls it makes (each still reaches the kernel)."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pyngora.headers import Headers
from pyngora.protocols.events import MessageEnd
from pyngora.upstreams.connector import Connector
from pyngora.upstreams.peer import HttpPeer

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
QUICK = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class Counting:
    """The connection's real socket, with its setsockopt calls counted."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.calls: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        self.calls.append((level, opt, value))
        self.sock.setsockopt(level, opt, value)


async def origin(pieces_per_response: list[list[bytes]], unix: str = "") -> tuple[Any, str]:
    """Answers the n-th request with the n-th list of pieces, each its own write, each one
    waiting until the client's connection has read the previous (see ``client_read``)."""
    responses = iter(pieces_per_response)
    gates: list[asyncio.Event] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            for piece in next(responses):
                gate = asyncio.Event()
                gates.append(gate)
                writer.write(piece)
                await writer.drain()
                await gate.wait()  # the proxy read this piece: send the next one apart
        writer.close()

    if unix:
        server = await asyncio.start_unix_server(handle, unix)
        return (server, gates), unix
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return (server, gates), f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


class GateReads(asyncio.Protocol):
    """Sits between the transport and the connection: after each read the connection gets,
    opens the origin's next gate, so the next piece is sent only once the previous one was
    read (each piece is a read of its own)."""

    def __init__(self, conn: Any, gates: list[asyncio.Event]) -> None:
        self.conn, self.gates = conn, gates
        conn.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)
        for gate in self.gates:
            if not gate.is_set():
                gate.set()
                break

    def eof_received(self) -> Any:
        return self.conn.eof_received()

    def connection_lost(self, exc: Any) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


async def exchange(conn: Any) -> None:
    """One GET on ``conn``, read to its end."""
    conn.send_head(b"GET", b"/", Headers([(b"Host", b"x")]))
    while (await conn.read_event()).__class__ is not MessageEnd:
        pass


def run(coro: Any) -> Any:
    return uvloop.run(asyncio.wait_for(coro, 20))


def test_one_quickack_per_response_read_in_pieces_none_when_whole() -> None:
    async def main() -> None:
        (server, gates), addr = await origin([
            [HEAD + b"01234", b"567", b"89"],          # three reads: one quick ACK
            [HEAD[:10], HEAD[10:] + b"0123456789"],    # a split head counts too
            [HEAD + b"0123456789"],                    # read whole: none
            [HEAD + b"0123456789"]])
        connector = Connector()
        conn = await connector.get(HttpPeer(addr))
        assert conn._sock is not None
        counting = conn._sock = Counting(conn._sock)
        GateReads(conn, gates)
        await exchange(conn)
        assert counting.calls == [QUICK]
        connector.release(conn, True)
        for expected in ([QUICK, QUICK], [QUICK, QUICK], [QUICK, QUICK]):
            again = connector.get_pooled(HttpPeer(addr))
            assert again is conn
            await exchange(conn)
            assert counting.calls == expected
            connector.release(conn, True)
        connector.close_all()
        server.close()
    run(main())


def test_unix_socket_never_asked(tmp_path: Path) -> None:
    async def main() -> None:
        path = str(tmp_path / "o.sock")
        (server, gates), _ = await origin([[HEAD + b"01234", b"56789"]], unix=path)
        connector = Connector()
        conn = await connector.get(HttpPeer("unix:" + path))
        assert conn._sock is None
        GateReads(conn, gates)
        await exchange(conn)
        connector.close_all()
        server.close()
    run(main())
