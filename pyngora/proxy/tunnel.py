"""The two-way byte pipe a proxied request becomes after a 101 Switching Protocols (WebSocket
and the like): the client's connection and the upstream's, copied both ways until both sides
are done or one fails. Run by the phase engine (``ProxyEngine._response``) in the request's
task, so a client that disconnects cancels it like any request."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pyngora.errors import Error, ErrorSource, ErrorType

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.services.http_app import Exchange
    from pyngora.upstreams.connector import UpstreamConnection

__all__ = ["tunnel"]


async def tunnel(ex: Exchange, conn: UpstreamConnection) -> None:
    """After a 101: copy bytes both ways until both sides are done (or one fails).

    Each side's silence is bounded by the peer's ``read_timeout``: the upstream's by its
    reads (as nginx's proxy_read_timeout for WebSockets), the client's once the upstream
    has half-closed (a silent client would otherwise hold both connections forever). A FIN
    from the client is forwarded as one; a client connection that is gone (reset, or
    aborted at the end of a drain) ends the tunnel at once. Returns when both sides are
    done or the client is gone; raises the Error of a side that failed."""
    down = ex.tunnel()
    for data in conn.into_tunnel():
        down.write(data)
    loop = asyncio.get_running_loop()
    # When the client last sent something, and whether its bytes wait on the upstream
    # (a stalled upstream is no silent client).
    heard = [loop.time()]
    pushing = [False]

    async def down_to_up() -> bool:
        # True: the client's connection is gone (reset, or aborted by us), not half-closed.
        while True:
            data = await down.read()
            heard[0] = loop.time()
            if not data:
                if down.conn.closed:
                    # A reset is no end of the client's data: a FIN would tell the origin
                    # the stream ended cleanly, and an origin that waits for more would hold
                    # its connection (and our task) for read_timeout. End both now.
                    return True
                conn.write_eof()
                return False
            conn.write_raw(data)
            pushing[0] = True
            await conn.drain()
            pushing[0] = False
            heard[0] = loop.time()

    async def up_to_down(client: "asyncio.Future[bool]") -> None:
        while True:
            data = await conn.read_raw()
            if not data:
                down.write_eof()
                break
            down.write(data)
            await down.drain()
        timeout = conn.peer.options.read_timeout
        heard[0] = max(heard[0], loop.time())  # the client's time starts at our EOF
        while timeout and not client.done():
            idle = 0.0 if pushing[0] else loop.time() - heard[0]
            if idle >= timeout:
                raise Error(ErrorType.ReadTimedout, ErrorSource.Downstream, None,
                            f"tunnel: nothing from the client within {timeout}s after "
                            "the upstream closed its side")
            await asyncio.wait((client,), timeout=timeout - idle)

    client: "asyncio.Future[bool]" = asyncio.ensure_future(down_to_up())
    tasks = [asyncio.ensure_future(up_to_down(client)), client]
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
                if t is client and t.result():
                    return  # the client is gone: nobody is left to tunnel to
    finally:
        for t in tasks:
            t.cancel()
        conn.close()
        down.close()
