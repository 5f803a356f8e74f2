"""One client's pipelined requests against the worker's other clients: the connection answers
at most ``PIPELINE_BATCH`` of them per turn of the loop, and none once the client is gone.

Found against the metrics exporter: 2,000 pipelined scrapes sent and the connection reset
kept the exporter busy for minutes, every other scrape timing out, because writes to a
reset connection are dropped (no back-pressure) and the pipeline was answered in one go.
"""
from __future__ import annotations

import asyncio
import sys
import time

from pyngora.headers import Headers
from pyngora.services.http_app import PIPELINE_BATCH, Exchange, HttpApp

from tests.protocol.test_http_app_helpers import AppService, run, serving

N = 2000


class Busy(HttpApp):
    """Answers each request at once, after ~0.2 ms of CPU (an exporter's render, say), and
    records the targets in the order it handled them."""

    def __init__(self) -> None:
        self.handled: list[bytes] = []

    def handle(self, ex: Exchange) -> None:
        self.handled.append(ex.head.target)
        end = time.perf_counter() + 0.0002
        while time.perf_counter() < end:
            pass
        ex.respond(200, Headers(), b"ok")


# The clients: a separate process each, acting while the server's loop is busy (a thread
# of the test's own process would wait for the GIL until the pipeline is answered).
GONE = r"""
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"".join(b"GET /a/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(int(sys.argv[2]))))
s.recv(1)  # the server is answering the pipeline now
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()  # a reset: the rest of the answers can go nowhere
"""
BESIDE = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
a = socket.create_connection(("127.0.0.1", port))
a.sendall(b"".join(b"GET /a/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(n)))
got = a.recv(65536)  # the pipeline is being answered: now another client asks
b = socket.create_connection(("127.0.0.1", port))
b.sendall(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
assert b.recv(100).startswith(b"HTTP/1.1 200"), "no answer to /b"
while got.count(b"\r\n\r\nok") < n:
    data = a.recv(65536)
    assert data, "the pipeline's connection closed early"
    got += data
"""


async def _client(script: str, port: int) -> None:
    p = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(port), str(N))
    assert await asyncio.wait_for(p.wait(), 30) == 0


def test_a_client_gone_mid_pipeline_gets_no_more_answers() -> None:
    app = Busy()

    async def main() -> None:
        async with serving(AppService(app)) as (port, ctx):
            await _client(GONE, port)
            while len(ctx.connections):
                await asyncio.sleep(0.01)  # until the server dropped the connection
    run(main())
    assert 0 < len(app.handled) < N // 2, len(app.handled)


def test_another_client_is_answered_while_a_pipeline_is() -> None:
    app = Busy()

    async def main() -> None:
        async with serving(AppService(app)) as (port, _):
            await _client(BESIDE, port)
    run(main(), timeout=60)
    # /b came after the pipeline's first answers: it waited for some batches (how many
    # depends on when its client process ran), not for the 2,000 requests before it.
    position = app.handled.index(b"/b")
    assert PIPELINE_BATCH <= position < N // 2, position
