"""The tunnel side of an upstream HTTP/1.1 connection: after a 101 Switching Protocols (a
WebSocket) or a 2xx to CONNECT, the connection is a raw two-way byte pipe.

``UpstreamTunnel`` is mixed into ``h1_upstream.UpstreamConnection``, whose state it uses: the
protocol callbacks put tunnel bytes in ``_raw`` and wake the wait that :meth:`read_raw` is in.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from pyngora.errors import Error
from pyngora.protocols.h1_response import ResponseParser
from pyngora.upstreams.peer import HttpPeer

__all__ = ["UpstreamTunnel"]


class UpstreamTunnel:
    """Tunnel methods of ``UpstreamConnection`` (which provides the attributes and the
    waiting, timeout and error helpers named below)."""

    __slots__ = ()

    peer: HttpPeer
    transport: Any
    _parser: ResponseParser
    _events: deque
    _raw: deque[bytes]
    _buffered: int
    _tunnel: bool
    _closed: bool
    _eof: bool
    _error: Optional[Error]
    _reading_paused: bool

    if TYPE_CHECKING:  # pragma: no cover  (UpstreamConnection's own)
        async def _wait(self, timeout: Optional[float]) -> bool: ...
        def _resume_reading(self) -> None: ...
        def _dead_error(self) -> Error: ...
        def _read_timeout(self) -> Error: ...

    def into_tunnel(self) -> tuple[bytes, ...]:
        """Switch to a raw two-way byte pipe; returns the bytes that followed the 101 head.

        Call after read_event returned the 101 ResponseHead and its MessageEnd. Later input is
        read with :meth:`read_raw`, output written with :meth:`write_raw`.
        """
        self._tunnel = True
        trailing = self._parser.take_trailing()
        self._events.clear()
        return (trailing,) if trailing else ()

    def write_raw(self, data: bytes) -> None:
        """Write tunnel bytes as they are. Raises Error if the connection is closed."""
        if self._closed:
            raise self._dead_error()
        if data:
            self.transport.write(data)

    def write_eof(self) -> None:
        """Half-close the tunnel towards the upstream (TLS cannot: it closes instead)."""
        if self._closed:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    async def read_raw(self) -> bytes:
        """The next tunnel bytes (all that are buffered); b"" once the upstream closed.

        Waits at most ``read_timeout`` (Error ReadTimedout), as nginx's proxy_read_timeout
        does for WebSockets.
        """
        raw = self._raw
        while True:  # each turn returns, raises, or awaits new input
            if raw:
                data = raw.popleft() if len(raw) == 1 else b"".join(raw)
                raw.clear()
                self._buffered = 0
                if self._reading_paused:
                    self._resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self._eof or self._closed:
                return b""
            if not await self._wait(self.peer.options.read_timeout):
                raise self._read_timeout()
