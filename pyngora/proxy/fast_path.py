"""The fast path: callback-level proxying of the requests that no phase needs to see.

When a ProxyHttp overrides no phase but a synchronous ``upstream_peer`` (and perhaps
``fail_to_connect``, which only a dial can call) -- the declarative ``http_proxy`` without
header edits, or a minimal load balancer in Python -- a body-less, non-upgrade request (on an
HTTP/1 connection, or an HTTP/2 stream) to an HTTP/1 peer is proxied with no Task, coroutine
or await once it has a connection (a pooled one, or one dialled for it: see below): the
upstream request is written from the client connection's ``data_received``, and the response
events are forwarded from the upstream connection's (``UpstreamConnection.listen``). That
saves the request task, four coroutine frames and their wake-ups per request.

Everything else goes to the phase engine, which stays the one place of SPEC sections 6-7:

- a request with a body or an upgrade, or an HTTP/2 peer: ``engine.run`` with the session
  and peer already chosen (the balancer is not asked twice);
- ``upstream_peer`` raising, or an attempt that fails: the engine's own rules decide
  (``_mark_retryable``, ``_may_retry``); a retry continues in ``engine.run`` with a new peer,
  anything else is answered and logged by ``engine.run(error=...)`` (502, 504, or the abort of
  a response already started).

A peer without a pooled connection is dialled from here too (the dial is the one task such a
request gets; HTTP/2 clients with many streams need it for most of theirs, as the pool holds
fewer idle connections than they have streams in flight). A dial that fails is handled as the
engine handles one of its own: counted, given to ``fail_to_connect`` (the YAML proxy's tells
the balancer), then retried on a new pick while ``max_retries`` allows, else answered (502,
504) -- by a coroutine, as that path is rare and ``fail_to_connect`` may await.

So the client sees the same bytes, statuses and retries either way, and the metrics and the
access log line are the same.

Writes are batched: a request taken, or upstream events arrived, only queue their forwarder,
and one callback per loop iteration (``FastPath._run``) does the writing, after every read of
that iteration. Writing from inside each ``data_received`` instead cost more CPU than the
engine's tasks (measured in one process, toggling the two: 55 us per request inline, 44 the
engine, 38 batched): each inline write wakes the origin or the client at once, so the loop
gets its events one or two at a time instead of in batches.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.protocols.events import Data, InformationalResponse, MessageEnd, ResponseHead
from pyngora.protocols.h1_wire import remove_hop_by_hop
from pyngora.proxy import access
from pyngora.proxy.phases import PHASES, not_a_peer, returned_error
from pyngora.proxy.session import Session
from pyngora.proxy.wire import informational_fields, reason_for, upstream_fields, upstream_head
from pyngora.services.http_app import Exchange
from pyngora.upstreams.connector import UpstreamConnection
from pyngora.upstreams.peer import HttpPeer

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.proxy.engine import Plan, ProxyEngine

__all__ = ["FastPath", "WRITE_AT_ONCE"]

# Phases the fast path serves: upstream_peer, and fail_to_connect after a dial that failed.
_ALLOWED = frozenset(("upstream_peer", "fail_to_connect"))

# _Forward states
_DIAL = -3      # a new connection is being dialled (the forwarder's ``dial`` task)
# A whole response longer than this is written at once rather than at the end of the loop
# iteration: measured (tests/bench/RESULTS.md), 64 KiB responses went 0.33 -> 0.43 x nginx
# written at once (their bytes are still in the CPU cache; fifty of them held to the end of
# an iteration are not), while small ones went 0.32 -> 0.28 (the batching of the module doc).
WRITE_AT_ONCE = 16384
_WHOLE = -2     # a whole response was taken (the upstream connection is pooled again): it
                # goes to the client at the end of this loop iteration
_SEND = -1      # taken: the request head goes upstream at the end of this loop iteration
_HEAD = 0       # waiting for the response head
_NO_BODY = 1    # a body-less head arrived: its MessageEnd comes next
_BODY = 2       # streaming the body
_DRAIN = 3      # the client's write buffer is full: wait for it (events stay queued upstream)
_DONE = 4


class FastPath:
    """One per ProxyEngine whose plan :meth:`serves`; ``start`` is its ``handle``."""

    __slots__ = ("engine", "connector", "service", "upstream_peer", "access_format", "loop",
                 "_queue", "preset")

    @staticmethod
    def serves(plan: "Plan") -> bool:
        """True when only a synchronous upstream_peer (and fail_to_connect) is overridden."""
        if plan.upstream_peer is not False:
            return False
        return all(getattr(plan, name) is None for name in PHASES if name not in _ALLOWED)

    def __init__(self, engine: "ProxyEngine") -> None:
        self.engine = engine
        self.connector = engine.connector
        self.service = engine.service
        self.upstream_peer = engine.proxy.upstream_peer
        self.access_format = engine.access_format
        self.loop: Any = None
        # forwarders (and express rides) with work for the end of this iteration
        self._queue: list[Any] = []
        # (the request's bytes, its peer, max_retries, or what picking one raised): what the
        # express lane's balancer said for the request it declines, so that it is not asked
        # twice (see proxy/express.py)
        self.preset: Optional[tuple[bytes, Any, Optional[int], Optional[BaseException]]] = None

    def start(self, ex: Exchange) -> Any:
        """Take ``ex`` (returns None: the response will be written by callbacks), or return
        the engine's coroutine for it (the connection runs it as the request task)."""
        engine = self.engine
        head = ex.head
        if head.body != "none" or head.upgrade:
            return engine.run(ex)
        session = Session(ex, self.service)
        preset = self.preset
        self.preset = None
        try:
            if preset is not None and preset[0] is head.raw:
                _, peer, session.max_retries, failure = preset
                if failure is not None:
                    raise failure
            else:
                peer = self.upstream_peer(session, None)
        except Error as e:  # 404 (no route), 503 (no healthy backend), ...
            return engine.run(ex, session, error=e)
        except Exception as e:  # a bug in upstream_peer: the engine answers 500 and logs it
            return engine.run(ex, session, error=Error(
                ErrorType.InternalError, ErrorSource.Internal, e, repr(e)))
        if peer.__class__ is not HttpPeer and not isinstance(peer, HttpPeer):
            return engine.run(ex, session, error=not_a_peer(peer))
        alpn = peer.options.alpn
        if alpn and alpn[0] == "h2":
            return engine.run(ex, session, peer)
        conn = self.connector.get_pooled(peer)
        session.peer = peer
        fwd = _Forward(self, ex, session, conn, engine._umetrics(peer))
        ex.task = fwd  # type: ignore[assignment]  # the connection cancels it if the client goes
        if conn is None:
            fwd.state = _DIAL
            fwd.queued = False
            fwd.dial = ex.conn.loop.create_task(self.connector.get(peer))
            fwd.dial.add_done_callback(fwd._dialled)
            return None
        self.schedule(fwd)
        return None

    def adopt(self, ex: Exchange, session: Session, conn: UpstreamConnection,
              um: Any, sent: bool) -> "_Forward":
        """A forwarder for a request that another took (the express lane, proxy/express.py)
        with ``conn`` from the pool: when ``sent``, the head went on it and the forwarder
        waits for the response (the caller has it listen); else, its ``run`` sends it."""
        fwd = _Forward(self, ex, session, conn, um)
        if sent:
            fwd.state = _HEAD
        fwd.queued = False
        ex.task = fwd  # type: ignore[assignment]
        return fwd

    def schedule(self, fwd: Any) -> None:
        """Have ``fwd`` do its writing at the end of this loop iteration (see the module doc).
        ``fwd`` is a forwarder, or a ride of the express lane: anything with ``ex``,
        ``run()`` and ``broken()``."""
        queue = self._queue
        if not queue:
            loop = self.loop
            if loop is None:
                loop = self.loop = fwd.ex.conn.loop
            loop.call_soon(self._run)
        queue.append(fwd)

    def _run(self) -> None:
        """Once per loop iteration with work: send the requests taken, forward what arrived.
        Work queued meanwhile (a pipelined request started by a response's end) schedules
        the next run."""
        queue, self._queue = self._queue, []
        for fwd in queue:
            try:
                fwd.run()
            except Exception as e:  # a bug in the failure path itself: the batch goes on
                log.ERROR.error("fast path failed: %r", e, exc_info=e)
                fwd.broken()


class _Forward:
    """One request on the fast path: forwards the upstream's response events to the client.

    Stands in for the request task in ``Exchange.task`` (``done()`` / ``cancel()``), so a
    client that disconnects stops it as it would stop the engine's task."""

    __slots__ = ("fast", "ex", "session", "conn", "um", "state", "queued", "head", "whole",
                 "dial")

    def __init__(self, fast: FastPath, ex: Exchange, session: Session,
                 conn: Optional[UpstreamConnection], um: Any) -> None:
        self.fast = fast
        self.ex = ex
        self.session = session
        self.conn: UpstreamConnection = conn  # type: ignore[assignment]  # (None while _DIAL)
        self.um = um
        self.dial: Optional[asyncio.Task[UpstreamConnection]] = None
        self.state = _SEND
        self.head: Optional[ResponseHead] = None  # a body-less head, until its MessageEnd
        self.queued = True   # in FastPath._queue (the constructor's caller queues it)
        self.whole: Optional[tuple[int, bytes, Any]] = None  # see _WHOLE

    def broken(self) -> None:
        """``run`` raised past its own handling (a bug): the upstream connection is dropped,
        the client gets a 502."""
        self.state = _DONE
        if self.conn is not None:
            self.fast.connector.release(self.conn, False)
        ex = self.ex
        if ex.task is self:
            ex.task = None  # (an HTTP/2 stream is released when its exchange ends task-less)
        if not ex.finished:
            ex.respond_error(502)

    # -- the request task's interface (H1Connection.connection_lost)
    def done(self) -> bool:
        return self.state == _DONE

    def cancel(self) -> None:
        """The client went away: close the upstream connection (or stop dialling it),
        answer nothing more."""
        if self.state == _DIAL and self.dial is not None:
            self.dial.cancel()
            self.dial = None
        if self.state == _WHOLE:
            self._client_gone()
        elif self.state != _DONE:
            self.fail(Error(ErrorType.ConnectionClosed, ErrorSource.Downstream, None,
                            "client disconnected"))

    def _client_gone(self) -> None:
        """The client went away after its whole response was taken (state _WHOLE), before it
        was written: the upstream side is done (the connection is pooled), so nothing is
        released; the engine logs and counts the request as it does for any client gone."""
        self.state = _DONE
        self.whole = None
        ex = self.ex
        if ex.task is self:
            ex.task = None
        ex.conn.run_task(ex, self.fast.engine.run(ex, self.session, error=Error(
            ErrorType.ConnectionClosed, ErrorSource.Downstream, None, "client disconnected")))

    # -- the dial
    def _dialled(self, task: "asyncio.Task[UpstreamConnection]") -> None:
        """The dial task ended: send on the new connection, or let the engine handle the
        failure as it handles its own dials' (counted, retried or answered)."""
        if task.cancelled() or self.state != _DIAL:
            if not task.cancelled() and task.exception() is None:
                task.result().close()  # (the client went as it connected)
            return
        self.dial = None
        exc = task.exception()
        if exc is None:
            conn = self.conn = task.result()
            if self.um is not None and not conn.reused:  # (get() may find one pooled meanwhile:
                self.um.connect_duration(conn.connect_duration)  # _send counts that one)
            self.state = _SEND
            self.queued = True
            self.fast.schedule(self)
            return
        e = exc if isinstance(exc, Error) else Error(ErrorType.InternalError,
                                                     ErrorSource.Internal, exc, repr(exc))
        self.state = _DONE
        ex = self.ex
        if ex.task is self:
            ex.task = None  # (run_task below sets the engine's own task)
        if self.um is not None:
            self.um.error(self.session.peer.backend, e.etype)  # type: ignore[union-attr]
        ex.conn.run_task(ex, self._dial_failed(e))

    async def _dial_failed(self, e: Error) -> None:
        """As the engine's own loop after a failed dial: ``fail_to_connect``, then a retry
        on a new pick or the answer (the fast path runs its phases with ctx None)."""
        engine, session = self.fast.engine, self.session
        proxy, plan = engine.proxy, engine.plan
        retry = True
        if plan.fail_to_connect is not None:
            # What escapes fail_to_connect ends the request as it would in the engine's loop:
            # an Error with its own status, a cancel as the client gone, a bug as a 500.
            try:
                r = proxy.fail_to_connect(session, session.peer, None, e)
                e = returned_error("fail_to_connect", (await r) if plan.fail_to_connect else r,
                                   e)  # (a forgotten ``return e``: e, and a log line)
            except Error as x:
                e, retry = x, False
            except asyncio.CancelledError:
                e, retry = Error(ErrorType.ConnectionClosed, ErrorSource.Downstream, None,
                                 "client disconnected"), False
            except Exception as x:
                e, retry = Error(ErrorType.InternalError, ErrorSource.Internal, x, repr(x)), False
        if retry and engine._may_retry(session, e):
            await engine.run(self.ex, session)
        else:
            await engine.run(self.ex, session, error=e)

    # -- upstream events
    def on_upstream(self, ready: bool) -> None:
        """UpstreamConnection's listener: events (or EOF/error) arrived, or, with ``ready``
        False, read_timeout passed without any."""
        if self.state >= _DRAIN:
            return  # waiting for the client (the events stay queued upstream), or done
        if not ready:
            self.fail(self.conn._read_timeout())
        elif not self.queued:
            self.queued = True
            self.fast.schedule(self)

    def run(self) -> None:
        """FastPath._run's turn: send the request head, or forward the queued events."""
        self.queued = False
        state = self.state
        if state >= _DRAIN or state == _DIAL:
            return
        try:
            if state == _WHOLE:
                self._write_whole()
            elif state == _SEND:
                self._send()
            else:
                self._forward()
        except Error as e:
            self.fail(e)
        except Exception as e:  # a bug: this request fails (500 / abort), the batch goes on
            self.fail(Error(ErrorType.InternalError, ErrorSource.Internal, e, repr(e)))

    def _send(self) -> None:
        head, conn, peer = self.ex.head, self.conn, self.session.peer
        if not conn.untouched():
            # The pooled connection was taken when the request was parsed; the origin closed
            # it (or spoke) in the same loop iteration, before we used it. The engine would
            # still have found it idle in the pool and dropped it: do as it would.
            connector = self.fast.connector
            connector.release(conn, False)
            conn = connector.get_pooled(peer)
            if conn is None:  # none left: the engine dials (no retry counted)
                self._hand_over(self.fast.engine.run(self.ex, self.session, peer))
                return
            self.conn = conn
        if self.um is not None and conn.reused:  # (a new one's dial was counted)
            self.um.pool_reused()
        self.state = _HEAD
        req = self.session._req_header
        raw = upstream_head(head) if req is None else None
        if raw is not None:  # the client's own bytes are what the engine would send
            conn.send_raw_head(head.method, raw)
        elif req is None:
            conn.send_head(head.method, head.target, upstream_fields(head.headers, peer))
        else:
            # upstream_peer looked at the request head, and may have edited it: what the
            # engine would send.
            conn.send_head(req.method.encode("latin-1"), req.uri.encode("latin-1"),
                           upstream_fields(req.headers, peer))
        conn.listen(self.on_upstream, peer.options.read_timeout)
        if head.method == b"GET":
            conn.first_bytes_to(self._whole)

    def _whole(self, data: bytes) -> bool:
        """The response's first bytes, before the connection parses them (see
        ``UpstreamConnection.first_bytes_to``): when they are a whole plain response, it goes
        to the client as it came, less its hop-by-hop fields, and the request ends here.
        False: the events path forwards it, as any other."""
        ex = self.ex
        if self.state != _HEAD or not ex.may_write_whole():
            return False
        taken = self.conn.take_whole(data)
        if taken is None:
            return False
        session = self.session
        session.upstream_status = taken[0]
        self.state = _WHOLE
        self.whole = taken
        # Pooled at once: the next request may take it; the client's bytes are written with
        # the loop iteration's other writes (see the module doc).
        self.fast.connector.release(self.conn, True)
        if self.um is not None:
            self.um.request_done(session.peer.backend, taken[0])
        if len(taken[1]) + len(taken[2]) > WRITE_AT_ONCE:
            self.run()
        elif not self.queued:
            self.queued = True
            self.fast.schedule(self)
        return True

    def _forward(self) -> None:
        """Take every queued event; re-arm the read timeout when more must come."""
        conn, ex = self.conn, self.ex
        while True:
            ev = conn.next_event_nowait()
            if ev is None:
                break
            cls = ev.__class__
            if cls is Data and self.state == _BODY:
                ex.write_body(ev.data)  # type: ignore[union-attr]
                if ex.conn._write_paused:
                    self._wait_for_client()
                    return
            elif cls is MessageEnd and self.state != _HEAD:
                self._finish(ev)  # type: ignore[arg-type]
                return
            elif self.state == _HEAD and cls is ResponseHead:
                self._head(ev)  # type: ignore[arg-type]
            elif self.state == _HEAD and cls is InformationalResponse:
                if ev.status != 100:  # type: ignore[union-attr]
                    ex.write_informational(ev.status,  # type: ignore[union-attr]
                                           informational_fields(ev.headers))  # type: ignore[union-attr]
            else:
                raise Error(ErrorType.InvalidHTTPHeader, ErrorSource.Upstream, None,
                            f"unexpected {cls.__name__} in a response")
        ex.flush_head()  # a head held for its body, when the body has not arrived yet
        conn.listen(self.on_upstream, conn.peer.options.read_timeout)

    def _write_whole(self) -> None:
        ex, session = self.ex, self.session
        if ex.conn.closed:  # the client went away meanwhile
            self._client_gone()
            return
        status, head, body = self.whole  # type: ignore[misc]
        self.whole = None
        self.state = _DONE
        ex.task = None  # (no ex <-> self cycle left behind)
        try:
            ex.write_whole(status, head, body)
            if log._access_on:
                log.ACCESS.info(access.format_line(session, None, self.fast.access_format))
        except Exception as e:  # a bug: the upstream side is done, so no engine retry; 502
            log.ERROR.error("fast path failed: %r", e, exc_info=e)
            if not ex.finished:
                ex.respond_error(502)

    def _head(self, rh: ResponseHead) -> None:
        if rh.status == 101:  # the fast path serves no upgrade request: as the engine, 502
            raise Error(ErrorType.InvalidHTTPHeader, ErrorSource.Upstream, None,
                        "101 Switching Protocols to a request that asked for no upgrade")
        self.session.upstream_status = rh.status
        headers = rh.headers
        remove_hop_by_hop(headers)
        if rh.body == "none":
            self.state = _NO_BODY  # written with its MessageEnd (end=True: one send)
            self.head = rh
        else:
            self.state = _BODY
            self.ex.write_head(rh.status, headers, reason_for(rh.status, rh.reason), hold=True)

    def _finish(self, end: MessageEnd) -> None:
        ex, session = self.ex, self.session
        no_body = self.state == _NO_BODY
        self.state = _DONE
        ex.task = None  # ex -> self -> ex: a cycle would leave both to the garbage collector
        # Pooled before the client's response ends: ending it may start the next pipelined
        # request, which may then reuse this very connection.
        self.fast.connector.release(self.conn, True)
        if self.um is not None:
            self.um.request_done(session.peer.backend, session.upstream_status)
        rh = self.head
        try:
            if no_body and rh is not None:  # the body-less head was kept for this moment
                ex.write_head(rh.status, rh.headers, reason_for(rh.status, rh.reason),
                              end=True)
            else:
                ex.write_end(end.trailers)
        except Error as e:  # the client's connection closed under us: the engine cleans up
            ex.conn.run_task(ex, self.fast.engine.run(ex, session, error=e))
            return
        if log._access_on:
            log.ACCESS.info(access.format_line(session, None, self.fast.access_format))
        if not ex.finished:  # as engine.run: a 101 to a request that asked for no upgrade
            ex.respond_error(502)

    # -- the client's write buffer
    def _wait_for_client(self) -> None:
        self.state = _DRAIN
        self.conn.listen(self.on_upstream, None)  # no read timeout while the client is slow
        self.ex.conn.on_drained(self._on_drained)

    def _on_drained(self, exc: Optional[BaseException]) -> None:
        if self.state != _DRAIN:
            return
        if exc is not None:
            self.fail(exc if isinstance(exc, Error) else Error(
                ErrorType.ConnectionClosed, ErrorSource.Downstream, exc, "client disconnected"))
            return
        self.state = _BODY
        self.run()

    # -- failures
    def _hand_over(self, coro: Any) -> None:
        """The engine takes the request from here, as the connection's request task."""
        self.state = _DONE
        ex = self.ex
        if ex.task is self:
            ex.task = None  # (and no ex <-> self cycle left behind)
        ex.conn.run_task(ex, coro)

    def fail(self, e: Error) -> None:
        """The attempt failed: the engine's rules decide between a retry and an answer."""
        if self.state == _DONE:
            return
        unused = self.state == _SEND  # nothing was sent on the connection: it may go back
        self.state = _DONE
        fast, ex, session, conn = self.fast, self.ex, self.session, self.conn
        if ex.task is self:
            ex.task = None  # (run_task below sets the engine's own task)
        engine = fast.engine
        if conn is None:  # the client went while the connection was being dialled
            ex.conn.run_task(ex, engine.run(ex, session, error=e))
            return
        fast.connector.release(conn, unused)
        if e.source is not ErrorSource.Downstream:
            if self.um is not None:
                self.um.error(session.peer.backend, e.etype)
            engine._mark_retryable(session, conn, e)
            if engine._may_retry(session, e):
                ex.conn.run_task(ex, engine.run(ex, session))
                return
        ex.conn.run_task(ex, engine.run(ex, session, error=e))
