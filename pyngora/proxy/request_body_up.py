"""The request body's way up, in its own task beside the response reader (full duplex: an
upstream that answers before it read the whole body cannot deadlock a proxy that only reads
once it has written everything). Run by the phase engine (``ProxyEngine._proxy_h1``) for each
attempt that sends a body."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.proxy.phases import body_piece

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.proxy.engine import Plan
    from pyngora.proxy.phases import ProxyHttp
    from pyngora.proxy.session import Session
    from pyngora.upstreams.connector import UpstreamConnection

__all__ = ["send_request_body"]


async def send_request_body(proxy: "ProxyHttp", plan: "Plan", session: "Session",
                            conn: "UpstreamConnection", chunked: bool, ctx: Any) -> None:
    """One attempt's body, sent on ``conn`` (chunked or as the head's Content-Length says).
    A failure closes ``conn``, which wakes the response reader that reports it; cancelled
    (the attempt ended), what it held is kept for the next attempt."""
    try:
        await _send(proxy, plan, session, conn, chunked, ctx)
    except asyncio.CancelledError:
        raise
    except BaseException:
        conn.close()  # wakes the response reader, which then reports our error
        raise
    finally:
        conn.body_done()


async def _send(proxy: "ProxyHttp", plan: "Plan", session: "Session",
                conn: "UpstreamConnection", chunked: bool, ctx: Any) -> None:
    """Stream the request body up: first what a failed attempt already sent (the retry
    buffer), then what a phase read, then the rest from the client, with back-pressure on
    both sides."""
    ex = session.exchange
    sent = 0
    if session.body_bytes_sent_upstream:
        for data in session._retry_buf:
            conn.send_body(data, chunked)
            sent += len(data)
            await conn.drain()
    filt = plan.request_body_filter
    ahead = session._read_ahead
    while True:
        # First what a phase read (or an attempt took and did not send), then the client.
        if ahead:
            data = ahead.popleft()
        elif session._body_finished:
            break
        else:
            data = await ex.read_body()
            if data is None:
                session._body_finished = True
        end = data is None
        piece = data
        if filt is not None:
            try:
                r = proxy.request_body_filter(session, data, end, ctx)
                piece = (await r) if filt else r
                if piece is not None and piece.__class__ is not bytes:
                    piece = body_piece("request_body_filter", piece)
            except asyncio.CancelledError:
                # The attempt ended while the filter held this piece: the next one
                # sends it (it is in neither the retry buffer nor the upstream stream).
                session._unread(data)
                raise
        if piece:
            session._remember_body(piece)
            conn.send_body(piece, chunked)
            sent += len(piece)
            await conn.drain()
        if end:
            break
    if not chunked and sent != ex.head.content_length:
        # Never expected (both parsers end a body at its length or fail the request), and
        # checked because a body short of its Content-Length on a connection that is then
        # pooled makes the next client's request the rest of this one (the desync of
        # request smuggling): the connection is closed instead, and the request fails.
        raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                    f"the request body sent upstream was {sent} bytes, its Content-Length "
                    f"{ex.head.content_length}: the upstream connection is closed")
    conn.send_end(chunked, ex.trailers if chunked else None)
