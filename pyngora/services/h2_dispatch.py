"""Choosing HTTP/1 or HTTP/2 for a new downstream connection.

``HttpService.protocol_factory`` calls :func:`protocol_factory` (and ``ssl_context`` calls
``protocols.tls.server_context``). Per listener:

- TLS with ``h2`` in its ALPN list: after the handshake (asyncio calls ``connection_made``
  only then), the ALPN result picks :class:`H2Connection` or ``H1Connection``;
- plaintext with ``h2c: true``: the first bytes are compared with the HTTP/2 client preface
  (``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n``, prior knowledge, RFC 9113 3.3); HTTP/2 if they
  match, else HTTP/1 (with the bytes already read);
- otherwise plain HTTP/1, with no dispatcher in the way.

The chosen protocol replaces the dispatcher on the transport (``transport.set_protocol``) and
gets ``connection_made`` as if it had been there from the start.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from pyngora.config.schema import ListenerConf
from pyngora.protocols.h2 import H2Limits, PREFACE
from pyngora.services.base import ConnectionTracker
from pyngora.services.h2_app import H2Connection, h2_limits
from pyngora.services.http_app import H1Connection, HttpApp, HttpSettings

__all__ = ["protocol_factory", "wants_h2"]


def wants_h2(listener: ListenerConf) -> bool:
    """True when the listener may speak HTTP/2 (ALPN h2 over TLS, or h2c)."""
    tls = listener.tls
    if tls is not None:
        return "h2" in tuple(getattr(tls, "alpn", ()) or ())
    return bool(getattr(listener, "h2c", False))


class _Sniffer(asyncio.Protocol):
    """Holds a fresh connection until its protocol is known, then hands it over."""

    __slots__ = ("make_h1", "make_h2", "tls", "loop", "timeout", "tracker", "transport", "buf",
                 "timer", "done")

    def __init__(self, make_h1: Callable[[], asyncio.Protocol],
                 make_h2: Callable[[bytes], asyncio.Protocol], tls: bool,
                 loop: asyncio.AbstractEventLoop, timeout: float,
                 tracker: Optional[ConnectionTracker] = None) -> None:
        self.make_h1 = make_h1
        self.tracker = tracker
        self.make_h2 = make_h2
        self.tls = tls
        self.loop = loop
        self.timeout = timeout
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""
        self.timer: Optional[asyncio.TimerHandle] = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.tls:
            ssl_obj = transport.get_extra_info("ssl_object")
            alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
            self._switch(self.make_h2(b"") if alpn == "h2" else self.make_h1(), b"")
            return
        # h2c: a client that says nothing is closed like an idle HTTP/1 one. Meanwhile the
        # worker's tracker knows it, so draining waits for its first request as for HTTP/1.
        if self.timeout and self.timeout > 0:
            self.timer = self.loop.call_later(self.timeout, self._give_up)
        if self.tracker is not None:
            self.tracker.add(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        buf = self.buf + data
        n = min(len(buf), len(PREFACE))
        if buf[:n] != PREFACE[:n]:
            self._switch(self.make_h1(), buf)
        elif n == len(PREFACE):
            self._switch(self.make_h2(buf), b"")
        else:
            self.buf = buf  # a prefix of the preface so far: wait for more

    def eof_received(self) -> Optional[bool]:
        if not self.done:
            self.done = True
            self._cancel()
        return None  # close

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.done = True
        self._cancel()

    def close_when_idle(self) -> None:
        """Draining: nothing to do yet (the protocol chosen next is told by the tracker)."""

    def abort(self) -> None:
        self.done = True
        self._cancel()
        if self.transport is not None:
            self.transport.abort()

    def _give_up(self) -> None:
        self.timer = None
        if not self.done and self.transport is not None:
            self.done = True
            self.transport.close()

    def _cancel(self, untrack: bool = True) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if untrack and self.tracker is not None:
            self.tracker.discard(self)

    def _switch(self, proto: asyncio.Protocol, data: bytes) -> None:
        self.done = True
        self._cancel(untrack=False)
        t = self.transport
        assert t is not None
        t.set_protocol(proto)
        proto.connection_made(t)  # tracks itself first: the tracker never looks empty
        if self.tracker is not None:
            self.tracker.discard(self)
        if data:
            proto.data_received(data)


def protocol_factory(app: HttpApp, settings: HttpSettings, listener: ListenerConf,
                     tracker: Optional[ConnectionTracker] = None, metrics: Any = None,
                     loop: Optional[asyncio.AbstractEventLoop] = None,
                     limits: Optional[H2Limits] = None) -> Callable[[], asyncio.BaseProtocol]:
    """The factory ``loop.create_server`` needs for ``listener`` (see the module docstring).
    ``metrics`` is ``ctx.state.get("service_metrics")``; ``limits`` overrides the HTTP/2
    limits derived from ``settings``."""
    loop = loop or asyncio.get_event_loop()
    tls = listener.tls is not None
    scheme = "https" if tls else "http"
    h2lim = limits or h2_limits(settings)

    def make_h1() -> asyncio.Protocol:
        return H1Connection(app, settings, tracker, scheme, metrics, loop)

    if not wants_h2(listener):
        return make_h1

    def make_h2(initial: bytes) -> asyncio.Protocol:
        return H2Connection(app, settings, tracker, scheme, metrics, loop, h2lim, initial)

    timeout = settings.header_read_timeout

    def factory() -> asyncio.BaseProtocol:
        return _Sniffer(make_h1, make_h2, tls, loop, timeout, tracker)

    return factory
