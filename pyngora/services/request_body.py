"""The request-body half of an exchange, shared by HTTP/1 (``http_exchange.Exchange``) and
HTTP/2 (``h2_exchange.H2Exchange``): the connection queues the body's pieces as they arrive
(``_feed``, ``_end``, ``_fail``) and the handler reads them (``read_body``,
``read_full_body``). What differs between the two protocols is what reading a piece gives
back (HTTP/1 resumes reading the socket, HTTP/2 returns flow-control window: ``_took``) and how
``100 Continue`` goes out (``_send_continue``); ``_feed`` is each protocol's own.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Optional

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers
from pyngora.protocols.events import RequestHead

__all__ = ["RequestBody", "read_full_body"]


class RequestBody:
    """Base of the exchanges; the subclass declares the slots (``BODY_SLOTS``) and sets
    ``conn`` (with a ``loop``) and ``head_sent``."""

    __slots__ = ()
    BODY_SLOTS = ("req_bytes", "trailers", "_chunks", "_buffered", "_body_done", "_error",
                  "_waiter", "_continue_pending")

    conn: Any
    head_sent: bool
    req_bytes: int
    trailers: Optional[Headers]
    _chunks: deque[bytes]
    _buffered: int
    _body_done: bool
    _error: Optional[Error]
    _waiter: Optional[asyncio.Future[None]]
    _continue_pending: bool

    def _init_body(self, head: RequestHead) -> None:
        """Called by the subclass's constructor: nothing received yet."""
        self.req_bytes = 0
        self.trailers = None
        self._chunks = deque()
        self._buffered = 0
        self._body_done = head.body == "none"
        self._error = None
        self._waiter = None
        self._continue_pending = head.expect_continue and not self._body_done

    @property
    def body_done(self) -> bool:
        """True once the whole request body has been received (not necessarily read)."""
        return self._body_done

    async def read_body(self) -> Optional[bytes]:
        """The next piece of the request body, ``None`` at its end. Sends ``100 Continue`` the
        first time when the client asked for it. Raises Error (Downstream) when the body is
        malformed or too large (its ``status`` says 400/413), or the client (or, on HTTP/2,
        the stream) went away."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft()
                self._buffered -= len(data)
                self._took(len(data))
                return data
            if self._body_done:
                return None
            if self._error is not None:
                raise self._error
            if self._continue_pending:
                self._continue_pending = False
                if not self.head_sent:
                    self._send_continue()
            waiter = self._waiter = self.conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read_full_body(self, limit: Optional[int] = None) -> bytes:
        """The whole request body (``limit`` bytes at most: Error 413 beyond)."""
        return await read_full_body(self, limit)

    def _took(self, n: int) -> None:
        """``n`` bytes were read from the queue (back-pressure or flow control)."""
        raise NotImplementedError

    def _send_continue(self) -> None:
        """Send ``100 Continue``: the handler wants the body the client holds back."""
        raise NotImplementedError

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _end(self, trailers: Optional[Headers]) -> None:
        self.trailers = trailers
        self._body_done = True
        self._continue_pending = False
        self._wake()

    def _fail_body(self, err: Error) -> None:
        """The body cannot complete: the reader gets ``err`` (the first one kept)."""
        if self._error is None:
            self._error = err
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(err)


async def read_full_body(exchange: Any, limit: Optional[int] = None) -> bytes:
    """Collect a request body through ``exchange.read_body()`` (HTTP/1 or HTTP/2 alike),
    ``limit`` bytes at most: Error 413 beyond."""
    parts = []
    total = 0
    while True:
        data = await exchange.read_body()
        if data is None:
            return b"".join(parts)
        total += len(data)
        if limit is not None and total > limit:
            raise Error(ErrorType.BodyTooLarge, ErrorSource.Downstream, None,
                        "request body too large", status=413)
        parts.append(data)
