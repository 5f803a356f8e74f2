"""How many connections a worker takes per loop iteration from one listening socket.

libuv accepts one connection per server handle per loop iteration (libuv pull request 3696).
With one handle, a worker under connection churn settles into one new connection per
iteration while the rest wait in the accept queue: nothing to batch, and each response and
each upstream request wakes a sleeping peer on its own (tests/bench/RESULTS.md, "accepting
four at a time": 80 us of CPU per churned request against 52 with four handles and 45 with
sixteen). But every handle of every worker also wakes for a connection that arrives alone,
and its accept() then finds the queue empty: ~3 us per extra handle per connection.

So a worker serves each listening socket through a set of uvloop server handles on
duplicates of it, sized by the accept queue (``AcceptHandles``): one while connections are
taken as they come, doubled (up to ``MAX_HANDLES``) each time a sample finds more queued than
one loop iteration of the workers on the socket takes, halved after ``SHRINK_AFTER`` samples in
a row found the queue empty. The
queue's length is the kernel's (``TCP_INFO`` of the listening socket); a socket that has no
such figure (a Unix socket) keeps ``FIXED_HANDLES``.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any, Callable, Optional

__all__ = ["AcceptHandles", "FdGuard", "keep_adjusting", "open_descriptors", "MAX_HANDLES",
           "FIXED_HANDLES", "SAMPLE_SECONDS", "SHRINK_AFTER"]

MAX_HANDLES = 16
FIXED_HANDLES = 4        # where the queue cannot be read
SAMPLE_SECONDS = 0.2
SHRINK_AFTER = 5         # empty samples in a row (1 s)

_TCP_LISTEN = 10
# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked (for a
# listening socket: its accept queue's length now), sacked (its backlog).
_QUEUE = struct.Struct("=I")
_QUEUE_OFFSET = 24


def accept_queue_length(sock: socket.socket) -> Optional[int]:
    """Connections waiting in ``sock``'s accept queue now (a listening TCP socket); None when
    the socket cannot say (a Unix socket, or not listening)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return None
    if len(info) < _QUEUE_OFFSET + 4 or info[0] != _TCP_LISTEN:
        return None
    return _QUEUE.unpack_from(info, _QUEUE_OFFSET)[0]


class AcceptHandles:
    """The server handles of one listening socket in one worker."""

    __slots__ = ("loop", "own", "factory", "backlog", "ssl", "handshake_timeout", "sharers", "handles", "adaptive",
                 "closed", "paused", "_empty")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], Any], backlog: int, ssl: Any = None,
                 sharers: int = 1, handshake_timeout: Optional[float] = None) -> None:
        self.loop = loop
        # Workers accepting from this same socket (work stealing): the queue is theirs too, so
        # it must outgrow all their handles (each worker sizes alike) before this one grows.
        self.sharers = max(1, sharers)
        # Our own descriptor of the listening socket: the queue is read and new handles are
        # duplicated from it (a closed handle takes its socket object with it), and the drain
        # takes the last queued connections through it.
        self.own = sock.dup()
        self.factory = factory
        self.backlog = backlog
        self.ssl = ssl
        # The bound on a TLS handshake (None: uvloop's 60 s). Workers pass the service's
        # header_read_timeout, as nginx bounds its handshakes by client_header_timeout: a
        # client that connects and sends no ClientHello is a slowloris of TLS.
        self.handshake_timeout = handshake_timeout if ssl is not None else None
        self.handles: list[Any] = []
        self.adaptive = self.queued() is not None
        self.closed = False
        self.paused = False  # out of descriptors soon: see FdGuard
        self._empty = 0

    async def open(self, sock: socket.socket) -> None:
        """Start serving ``sock`` (the listening socket itself goes to the first handle)."""
        self.handles.append(await self._serve(sock))
        if not self.adaptive:
            await self._grow(FIXED_HANDLES - 1)

    def queued(self) -> Optional[int]:
        """Connections waiting in the accept queue now; None when the socket cannot say."""
        return accept_queue_length(self.own)

    async def adjust(self) -> None:
        """One sample (every ``SAMPLE_SECONDS``): double the handles when more connections
        wait than one loop iteration of every worker on the socket takes; halve them after
        ``SHRINK_AFTER`` empty samples."""
        if not self.adaptive or self.closed or self.paused:
            return
        waiting = self.queued() or 0
        n = len(self.handles)
        if waiting > n * self.sharers:
            self._empty = 0
            if n < MAX_HANDLES:
                await self._grow(min(n, MAX_HANDLES - n))
        elif waiting == 0:
            self._empty += 1
            if self._empty >= SHRINK_AFTER and n > 1:
                self._empty = 0
                for srv in self.handles[n // 2:]:
                    srv.close()
                del self.handles[n // 2:]
        else:
            self._empty = 0

    async def _grow(self, more: int) -> None:
        for _ in range(more):
            srv = await self._serve(self.own.dup())
            if self.closed:  # the drain began while this one was being made
                srv.close()
                return
            self.handles.append(srv)

    async def _serve(self, sock: socket.socket) -> Any:
        return await self.loop.create_server(self.factory, sock=sock, backlog=self.backlog,
                                             ssl=self.ssl,
                                             ssl_handshake_timeout=self.handshake_timeout)

    def close(self) -> None:
        """Stop accepting (every handle); ``own`` stays open for the drain's last accepts."""
        self.closed = True
        self._stop()

    def pause(self) -> None:
        """Stop accepting for now: new connections wait in the kernel's queue (or another
        worker sharing it takes them)."""
        if not self.paused and not self.closed:
            self.paused = True
            self._stop()

    async def resume(self) -> None:
        """Accept again (one handle; the sampler grows more when the queue asks for them)."""
        if self.paused and not self.closed:
            self.paused = False
            await self._grow(1)

    def _stop(self) -> None:
        for srv in self.handles:
            srv.close()
        self.handles.clear()


class FdGuard:
    """Stops a worker's accepting before it runs out of file descriptors, and starts it again
    once enough are free (``ConnectionTracker.on_count``).

    At EMFILE, libuv accepts and closes every connection queued on the socket (its "EMFILE
    trick"): with work stealing that resets connections another worker of the same socket
    could have served, and alone it resets clients that could have waited. nginx stops
    accepting for a while instead; so does this, ``MARGIN`` descriptors before the limit
    (what upstream dials and files need meanwhile), and resumes ``3 * MARGIN`` below it.
    Descriptors are counted for real (/proc/self/fd), only from ``check_from`` connections
    on and every ``EVERY`` changes (each count reads the whole descriptor table)."""

    MARGIN = 32
    EVERY = 8

    __slots__ = ("loop", "sets", "limit", "tracker", "check_from", "paused", "_changes")

    def __init__(self, loop: asyncio.AbstractEventLoop, sets: list[AcceptHandles],
                 limit: int, tracker: Any) -> None:
        self.loop = loop
        self.sets = sets
        self.limit = limit
        self.tracker = tracker  # the worker's ConnectionTracker: it calls us
        self.check_from = max(1, (limit - 4 * self.MARGIN) // 2)
        self.paused = False
        self._changes = 0
        tracker.on_count = self
        tracker.count_from = self.check_from

    def __call__(self, connections: int) -> None:
        self._changes += 1
        if self._changes < self.EVERY:
            return
        self._changes = 0
        used = open_descriptors()
        if used is None:
            return
        if not self.paused and used >= self.limit - self.MARGIN:
            self.paused = True
            self.tracker.count_from = 0  # every close counts now: resume in time
            for h in self.sets:
                h.pause()
        elif self.paused and used <= self.limit - 3 * self.MARGIN:
            self.paused = False
            self.tracker.count_from = self.check_from
            for h in self.sets:
                self.loop.create_task(h.resume())


def open_descriptors() -> Optional[int]:
    """This process's open file descriptors now (None where /proc cannot say)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def keep_adjusting(sets: list[AcceptHandles]) -> None:
    """The worker's sampler: runs until cancelled (when the worker starts draining)."""
    while True:
        await asyncio.sleep(SAMPLE_SECONDS)
        for handles in sets:
            try:
                await handles.adjust()
            except OSError:  # out of descriptors, say: keep the handles there are
                pass
