"""Connector: HTTP/1.1 client connections to upstreams, pooled per worker (Pingora's connector).

The request path uses it as::

    conn = await connector.get(peer)            # pooled first (conn.reused), else dial
    conn.send_head(b"GET", b"/", headers)       # then send_body/send_end, await drain()
    ev = await conn.read_event()                # InformationalResponse*, ResponseHead, Data*, MessageEnd
    connector.release(conn, reusable=True)      # back to the pool when the exchange was clean

:class:`UpstreamConnection` (one connection, the protocol and its back-pressure) lives in
``h1_upstream.py`` and is re-exported here. Idle connections wait in a ``ConnectionPool``; one
periodic sweep per connector closes those past their idle timeout.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from typing import Hashable, Optional

from pyngora.pool import ConnectionPool
from pyngora.upstreams.dial import dial
from pyngora.upstreams.h1_upstream import HIGH_WATER, LOW_WATER, UpstreamConnection
from pyngora.upstreams.peer import HttpPeer

__all__ = ["Connector", "UpstreamConnection", "HIGH_WATER", "LOW_WATER"]

# Longest period of the connector's idle-pool sweep, in seconds.
SWEEP_TICK = 1.0


class Connector:
    """Dials upstreams and keeps their idle connections (one per worker process).

    ``pool_size`` is ``upstream_keepalive_pool_size``; ``ca_file`` the server-wide CA bundle
    used when a peer names none (None: the system's).
    """

    __slots__ = ("pool", "ca_file", "_ssl_contexts", "_sweep", "_sweep_loop", "_tick")

    def __init__(self, pool_size: int = 128, ca_file: Optional[str] = None) -> None:
        self.pool: ConnectionPool[UpstreamConnection] = ConnectionPool(pool_size)
        self.ca_file = ca_file
        self._ssl_contexts: dict[Hashable, ssl.SSLContext] = {}
        # One periodic sweep per connector (= per worker) closes idle connections past their
        # deadline, instead of a call_later per release; get() never hands out an expired one
        # whatever the sweep's lag. ``_tick`` is the period: at most SWEEP_TICK, shorter when
        # a peer's idle_timeout is (so an idle connection is closed within 1.5 x its timeout).
        self._sweep: Optional[asyncio.TimerHandle] = None
        self._sweep_loop: Optional[asyncio.AbstractEventLoop] = None
        self._tick = SWEEP_TICK

    async def get(self, peer: HttpPeer) -> UpstreamConnection:
        """A connection to ``peer``: a pooled one (``reused``) if any, else a new one.

        Raises Error (retry=True): ConnectRefused, ConnectTimedout, ConnectNoRoute,
        ConnectError, TLSHandshakeFailure, TLSHandshakeTimedout.
        """
        conn = self.get_pooled(peer)
        if conn is not None:
            return conn
        return await self._connect(peer)

    def get_pooled(self, peer: HttpPeer) -> Optional[UpstreamConnection]:
        """A pooled connection to ``peer`` (``reused``), or None: get() without a coroutine,
        for the request path, which awaits get() only when this gives None."""
        conn = self.pool.get(peer.reuse_key)
        if conn is not None:
            # The new peer's timeouts apply (they are not part of the reuse key).
            conn.peer = peer
            conn._reactivate()
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Called when a request is done with ``conn``: pooled if the caller and the connection
        both say it is reusable, closed otherwise."""
        conn._listener = None
        conn._sink = None
        if not reusable or not conn.can_reuse():
            conn.close()
            return
        peer = conn.peer
        idle_timeout = peer.options.idle_timeout
        conn._make_idle()
        if self.pool.put(conn.pool_key, conn, idle_timeout) and idle_timeout:
            if idle_timeout < self._tick * 2:
                self._tick = max(idle_timeout / 2, 0.01)
            # The connection's own loop: asyncio.get_running_loop() costs a getpid() syscall.
            loop = conn._loop
            if self._sweep is None or self._sweep_loop is not loop:
                self._arm_sweep(loop)

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_loop = loop
        self._sweep = loop.call_later(self._tick, self._on_sweep)

    def _on_sweep(self) -> None:
        """The periodic idle sweep: close what expired; stays armed while anything is pooled."""
        self._sweep = None
        self.pool.evict_expired()
        loop = self._sweep_loop
        if len(self.pool) and loop is not None and not loop.is_closed():
            self._arm_sweep(loop)

    def close_all(self) -> None:
        """Close every idle connection (worker draining or exiting)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.pool.close_all()

    def ssl_context(self, peer: HttpPeer) -> ssl.SSLContext:
        """The client TLS context for ``peer`` (built once per distinct TLS setting)."""
        opts = peer.options
        ca_file = opts.ca_file or self.ca_file
        key = (ca_file, opts.verify_cert, opts.verify_hostname, opts.alpn)
        ctx = self._ssl_contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=ca_file)
            if not opts.verify_cert:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif not opts.verify_hostname:
                ctx.check_hostname = False
            if opts.alpn:
                ctx.set_alpn_protocols(list(opts.alpn))
            self._ssl_contexts[key] = ctx
        return ctx

    async def _connect(self, peer: HttpPeer) -> UpstreamConnection:
        """Dial ``peer`` (see :func:`dial`) for an HTTP/1 connection."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()  # (loop.time() is in whole milliseconds)
        conn, _, _ = await dial(peer, lambda: UpstreamConnection(peer, self, loop),
                                self.ssl_context(peer) if peer.tls else None)
        conn.connect_duration = time.perf_counter() - started
        return conn
