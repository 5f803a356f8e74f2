"""nginx's ``send_timeout`` for one downstream connection (HTTP/1 or HTTP/2): a client that
takes nothing of what the connection has buffered for it, for that long, is let go."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from pyngora import log

__all__ = ["SendWatch"]


class SendWatch:
    """Armed by the protocol's ``pause_writing`` (the transport's write buffer is full),
    disarmed by ``resume_writing`` and ``connection_lost``. When ``timeout`` passes it looks
    at the buffer: smaller than when armed, the client took some (a slow reader, not a dead
    one) and the watch starts over; else it aborts the transport and calls ``on_abort``.
    Made on a connection's first pause only: most connections never pause."""

    __slots__ = ("loop", "timeout", "what", "on_abort", "_transport", "_timer", "_mark")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, what: str,
                 on_abort: Callable[[], None]) -> None:
        self.loop = loop
        self.timeout = timeout
        self.what = what  # for the log line: whose connection
        self.on_abort = on_abort
        self._transport: Optional[asyncio.Transport] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._mark = 0

    def paused(self, transport: Optional[asyncio.Transport]) -> None:
        if self._timer is not None or transport is None or not self.timeout or \
                self.timeout <= 0:
            return
        self._transport = transport
        self._mark = transport.get_write_buffer_size()
        self._timer = self.loop.call_later(self.timeout, self._expired)

    def resumed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def _expired(self) -> None:
        self._timer = None
        t = self._transport
        if t is None or t.is_closing() and not t.get_write_buffer_size():
            return
        size = t.get_write_buffer_size()
        if size < self._mark:
            self._mark = size
            self._timer = self.loop.call_later(self.timeout, self._expired)
            return
        log.ERROR.warning("%s took nothing for %ss: connection closed", self.what,
                          self.timeout)
        self._transport = None
        t.abort()
        self.on_abort()
