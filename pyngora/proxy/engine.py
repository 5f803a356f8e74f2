"""The phase engine: runs a ProxyHttp's phases for each request, in Pingora's order.

- Only the phases a subclass overrides are called; which ones is decided once per class
  (:func:`plan_for`), comparing its functions with ProxyHttp's. Defaults that do something
  (``fail_to_proxy`` answering the error) run inline when not overridden.
- Retries (SPEC section 7): ``upstream_peer`` is called again on each attempt, at most
  ``max_retries`` more times, and only when the error says ``retry`` (a connect failure, or a
  pooled connection that failed before any response byte), no response byte went to the
  client, and the body can be sent again (nothing sent yet, or an idempotent request whose
  body is still in the 64 KiB retry buffer): never a non-idempotent request whose body was sent.
- Bodies stream piece by piece both ways with back-pressure (``drain`` on each side), so
  memory per request is bounded whatever the size. A 101 turns into a two-way tunnel.
- The upstream connection goes back to the pool only after a clean, complete exchange; a
  client that disconnects mid-response (the request task is cancelled, or a write fails)
  makes the engine close it instead.
- ``logging`` runs last, always; then the access log line (when enabled).
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import Headers, RequestHeader, ResponseHeader
from pyngora.protocols.events import Data, InformationalResponse, MessageEnd, ResponseHead
from pyngora.protocols.h1_wire import remove_hop_by_hop
from pyngora.proxy import access
from pyngora.proxy.express import Express
from pyngora.proxy.fast_path import FastPath
from pyngora.proxy.phases import PHASES, ProxyHttp, body_piece, not_a_peer, returned_error
from pyngora.proxy.request_body_up import send_request_body
from pyngora.proxy.session import Session
from pyngora.proxy.tunnel import tunnel
from pyngora.proxy.wire import (check_target, informational_fields, method_token, reason_for,
                                set_framing, upstream_fields)
from pyngora.services.h2_exchange import H2Exchange
from pyngora.services.http_app import Exchange, HttpApp
from pyngora.upstreams.connector import Connector, UpstreamConnection
from pyngora.upstreams.h2_connector import H2Connector, H2UpstreamStream, Unprocessed
from pyngora.upstreams.peer import HttpPeer

try:  # metrics are optional: the engine works (and is tested) without them
    from pyngora.metrics import registry as _registry
except Exception:  # pragma: no cover - only when the metrics package is broken or absent
    _registry = None  # type: ignore[assignment]

__all__ = ["ProxyEngine", "plan_for", "Plan"]

_LOST = (ErrorType.ConnectionClosed, ErrorType.ReadError)  # the upstream went away


class Plan:
    """For one ProxyHttp class: for each phase, None (not overridden: skip it) or True/False
    (overridden; True = ``async def``, its result must be awaited)."""

    __slots__ = PHASES

    def __init__(self, cls: type) -> None:
        for name in PHASES:
            fn = getattr(cls, name, None)
            base = getattr(ProxyHttp, name)
            if fn is None or fn is base:
                setattr(self, name, None)
            else:
                # unwrap: an ``async def`` under a decorator made with functools.wraps (a
                # timing or tracing wrapper) still returns a coroutine to await.
                setattr(self, name, inspect.iscoroutinefunction(fn)
                        or inspect.iscoroutinefunction(inspect.unwrap(fn)))


_PLANS: dict[type, Plan] = {}


def plan_for(cls: type) -> Plan:
    """The (cached) plan of ``cls``: which phases it overrides."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = Plan(cls)
    return plan


def _te_trailers(headers: Any) -> bool:
    """True when the client's TE field lists ``trailers``."""
    for value in headers.get_all(b"te"):
        for token in value.split(b","):
            if token.split(b";", 1)[0].strip(b" \t").lower() == b"trailers":
                return True
    return False


_METHODS: dict[bytes, str] = {}


def _ascii(method: bytes) -> str:
    """``method`` as the str the Session shows (cached: a handful of methods in practice)."""
    text = _METHODS.get(method)
    if text is None:
        text = method.decode("latin-1")
        if len(_METHODS) < 64:
            _METHODS[method] = text
    return text


def _no_event() -> None:
    """poll_event of a connection that has none (HTTP/2 streams): always wait."""
    return None


def _downstream_closed() -> Error:
    return Error(ErrorType.ConnectionClosed, ErrorSource.Downstream, None,
                 "client disconnected")


def _mark_retryable(session: Session, conn: Any, e: Error) -> None:
    """Mark ``e`` retryable when HTTP allows it although the connection layer did not."""
    if (not e.retry and session.is_idempotent
            and ((e.etype in _LOST and not conn.response_bytes_seen)
                 or (e.source is ErrorSource.Upstream
                     and getattr(conn, "stray_response", False)))):
        # A fresh connection lost before any response byte (an origin that died with our
        # request in its accept queue, say), or a reused one whose first bytes were the
        # previous exchange's leftovers: RFC 9110 9.2.2 lets an idempotent request be
        # retried automatically, as nginx does.
        e.set_retry(True)


class ProxyEngine(HttpApp):
    """The HttpApp of a proxy service: one per worker, wrapping the user's ProxyHttp."""

    def __init__(self, proxy: ProxyHttp, connector: Connector, max_retries: int = 16,
                 service: str = "", access_format: str = "combined") -> None:
        self.proxy = proxy
        self.connector = connector
        self.max_retries = max_retries
        self.service = service
        self.access_format = access_format
        self.plan = plan_for(type(proxy))
        if self.plan.upstream_peer is None:
            raise TypeError(f"{type(proxy).__name__} must implement upstream_peer")
        self._upstream_metrics: dict[str, Any] = {}
        # HTTP/2 upstreams (peers whose ALPN list starts with "h2"), made on first use.
        self.h2_connector: Optional[H2Connector] = None
        # Callback-level proxying when no phase but a synchronous upstream_peer needs to run.
        self.fast: Optional[FastPath] = FastPath(self) if FastPath.serves(self.plan) else None
        self.express: Optional[Express] = Express(self) if Express.serves(self) else None

    _mark_retryable = staticmethod(_mark_retryable)  # the fast path's failures use it too
    log_refused = access.log_refused  # a request's line when refused before any phase ran

    def handle(self, exchange: Exchange) -> Any:
        fast = self.fast
        if fast is not None and (exchange.__class__ is Exchange
                                 or exchange.__class__ is H2Exchange):
            return fast.start(exchange)  # None when it took the request, else run()'s coroutine
        return self.run(exchange)

    def _umetrics(self, peer: HttpPeer) -> Any:
        return self.umetrics_of(peer.upstream)

    def umetrics_of(self, upstream: str) -> Any:
        """The recorders of upstream group ``upstream`` (None: no metrics)."""
        if _registry is None:
            return None
        name = upstream or "default"
        m = self._upstream_metrics.get(name)
        if m is None:
            m = self._upstream_metrics[name] = _registry.upstream_metrics(name)
        return m

    # ------------------------------------------------------------------ one request
    async def run(self, ex: Exchange, session: Optional[Session] = None,
                  peer: Optional[HttpPeer] = None, error: Optional[Error] = None) -> None:
        """The whole life of one request (runs as the connection's request task).

        The fast path hands requests over part-way: with the ``session`` it built and the
        ``peer`` upstream_peer already gave for the first attempt (no pooled connection), or
        with the ``error`` that ended its attempt (the engine's failure handling runs)."""
        proxy, plan = self.proxy, self.plan
        if session is None:
            session = Session(ex, self.service)
        err: Optional[Error] = error
        ctx: Any = None
        code = 502
        if err is None:  # (else a fast-path attempt failed for good: straight to _fail)
            err, ctx = await self._phases(session, ex, peer)
        if err is not None:
            code = await self._fail(session, err, ctx)
        if plan.logging is not None:
            try:
                r = proxy.logging(session, err, ctx)
                if plan.logging:
                    await r
            except (Exception, asyncio.CancelledError) as e:  # never break the connection
                log.ERROR.error("logging phase failed: %r", e)
        if log._access_on:  # a module flag, not a call: this runs once per request
            log.ACCESS.info(access.format_line(session, err, self.access_format))
        if not ex.finished:
            # Whatever happened, the connection must not wait for a response forever: the
            # status fail_to_proxy said it sent (it sent nothing), else 502; "none" closes.
            if code == 0:
                session.abort()
            else:
                ex.respond_error(code if 400 <= code < 600 else 502)

    async def _phases(self, session: Session, ex: Exchange, peer: Optional[HttpPeer]
                      ) -> tuple[Optional[Error], Any]:
        """The request phases and the upstream attempts (the first to ``peer`` when given).
        Returns the error that ended them (None: the request was answered) and the ctx."""
        proxy, plan = self.proxy, self.plan
        err: Optional[Error] = None
        ctx: Any = None
        try:
            if plan.new_ctx is not None:
                made = proxy.new_ctx()
                if plan.new_ctx:
                    made = await made  # (raising: later phases get None, not the coroutine)
                ctx = made
            if plan.early_request_filter is not None:
                r = proxy.early_request_filter(session, ctx)
                if plan.early_request_filter:
                    await r
            done = False
            if plan.request_filter is not None:
                done = proxy.request_filter(session, ctx)
                if plan.request_filter:
                    done = await done
            if done:
                self._finish_answered(ex)
            else:
                go = True
                if plan.proxy_upstream_filter is not None:
                    go = proxy.proxy_upstream_filter(session, ctx)
                    if plan.proxy_upstream_filter:
                        go = await go
                if not go:
                    if not ex.head_sent:
                        ex.respond_error(502)
                    self._finish_answered(ex)
                elif ex.head_sent:
                    # A phase answered and then said "proxy it": the client has its response,
                    # so the upstream gets no request it could act on (POST, an upgrade).
                    log.ERROR.error("request_filter (or an earlier phase) sent a response and "
                                    "returned False: not proxied: %s",
                                    ex.head.target.decode("latin-1"))
                    self._finish_answered(ex)
                else:
                    await self._proxy_to_upstream(session, ctx, peer)
        except Error as e:
            err = e
        except asyncio.CancelledError:
            err = _downstream_closed()  # the connection cancelled us: the client is gone
        except Exception as e:  # a bug in a phase: answer 500, log it
            err = Error(ErrorType.InternalError, ErrorSource.Internal, e, repr(e))
        return err, ctx

    def _finish_answered(self, ex: Exchange) -> None:
        """After request_filter said 'answered': make sure the response is complete."""
        if ex.finished:
            return
        if ex.head_sent:
            ex.write_end()
        else:
            log.ERROR.error("request_filter returned True without a response: %s",
                            ex.head.target.decode("latin-1"))
            ex.respond_error(500)

    async def _fail(self, session: Session, err: Error, ctx: Any) -> int:
        """fail_to_proxy (the user's, or the default inline), and the error log line. Returns
        the status fail_to_proxy says it sent (0: none)."""
        proxy, plan, ex = self.proxy, self.plan, session.exchange
        try:
            if plan.fail_to_proxy is not None:
                code = proxy.fail_to_proxy(session, err, ctx)
                if plan.fail_to_proxy:
                    code = await code
                if not isinstance(code, int) or isinstance(code, bool):
                    code = err.status  # (a phase that returned nothing)
            else:
                code = err.status
                if code > 999:  # (Error.http_status(1000)): no status; the bug's answer is 500
                    code = 500
                if ex.finished:
                    pass
                elif code > 0 and not ex.conn.closed:
                    ex.respond_error(code)  # aborts instead when a response already started
                else:
                    session.abort()
        except asyncio.CancelledError:  # the client went away meanwhile: nothing to send
            code = 0
        except Exception as e:
            log.ERROR.error("fail_to_proxy failed: %r", e)
            code = 500
            if not ex.finished:
                ex.respond_error(500)
        if err.source is not ErrorSource.Downstream or (code or 0) >= 500:
            try:
                summary = (proxy.request_summary(session, ctx)
                           if plan.request_summary is not None else session.request_summary())
            except Exception as e:  # a phase's bug must not cost the request its logging
                summary = f"(request_summary failed: {e!r})"
            log.ERROR.warning("Fail to proxy: %s, status: %s, tries: %d, %s", err, code,
                              session.retries + 1, summary)
        return code

    # ------------------------------------------------------------------ upstream attempts
    async def _proxy_to_upstream(self, session: Session, ctx: Any,
                                 first_peer: Optional[HttpPeer] = None) -> None:
        proxy, plan = self.proxy, self.plan
        while True:
            if first_peer is not None:  # chosen by the fast path before it handed over
                peer, first_peer = first_peer, None
            else:
                peer = proxy.upstream_peer(session, ctx)
                if plan.upstream_peer:
                    peer = await peer
            if peer.__class__ is not HttpPeer and not isinstance(peer, HttpPeer):
                raise not_a_peer(peer)
            session.peer = peer
            um = self._umetrics(peer)
            connector: Any = self.connector
            alpn = peer.options.alpn
            if alpn and alpn[0] == "h2":
                connector = self.h2_connector
                if connector is None:
                    connector = self.h2_connector = H2Connector(self.connector)
            try:
                conn = None
                if connector.__class__ is Connector:
                    conn = connector.get_pooled(peer)  # a pooled one: no coroutine to await
                if conn is None:
                    conn = await connector.get(peer)
            except Error as e:
                if um is not None:
                    um.error(peer.backend, e.etype)
                if plan.fail_to_connect is not None:
                    r = proxy.fail_to_connect(session, peer, ctx, e)
                    r = (await r) if plan.fail_to_connect else r
                    e = r if r.__class__ is Error else returned_error("fail_to_connect", r, e)
                if self._may_retry(session, e):
                    continue
                raise e
            reused = conn.reused
            if um is not None:
                if reused:
                    um.pool_reused()
                else:
                    um.connect_duration(conn.connect_duration)
            clean = False
            try:
                if plan.connected_to_upstream is not None:
                    r = proxy.connected_to_upstream(session, reused, peer, ctx)
                    if plan.connected_to_upstream:
                        await r
                clean = await self._proxy_h1(session, conn, ctx)
                if um is not None:
                    um.request_done(peer.backend, session.upstream_status)
                return
            except Error as e:
                if e.source is not ErrorSource.Downstream and um is not None:
                    um.error(peer.backend, e.etype)
                if plan.error_while_proxy is not None and e.source is not ErrorSource.Downstream:
                    r = proxy.error_while_proxy(peer, session, e, ctx, reused)
                    r = (await r) if plan.error_while_proxy else r
                    e = r if r.__class__ is Error else returned_error("error_while_proxy", r, e)
                _mark_retryable(session, conn, e)
                if e.source is not ErrorSource.Downstream and self._may_retry(session, e):
                    continue
                raise e
            finally:
                # Pooled only after a clean, complete exchange; closed otherwise (a client
                # that left mid-response, an error, a cancelled task).
                connector.release(conn, clean)

    def _may_retry(self, session: Session, e: Error) -> bool:
        """True when ``e`` allows another attempt (counted in ``session.retries``)."""
        if not isinstance(e, Error):  # (the fast path's fail_to_connect returned None, say)
            raise TypeError(f"fail_to_connect returned {type(e).__name__}, not an Error")
        limit = self.max_retries  # the server-wide cap; a phase may lower it per request
        if session.max_retries is not None and session.max_retries < limit:
            limit = session.max_retries
        if not e.retry or session.retries >= limit:
            return False
        if session.exchange.head_sent:
            return False
        if not session._body_replayable() and (e.__class__ is not Unprocessed
                                               or session._retry_truncated):
            # An HTTP/2 upstream that refused the stream unprocessed may get it again.
            return False
        session.retries += 1
        return True

    async def _proxy_h1(self, session: Session, conn: UpstreamConnection, ctx: Any) -> bool:
        """One attempt on ``conn``: send the request, stream the response. Returns True when
        the exchange completed cleanly (the connection may be pooled)."""
        proxy, plan = self.proxy, self.plan
        ex = session.exchange
        head = ex.head
        req = session.req_header
        up_headers = upstream_fields(req.headers, conn.peer)
        upgrade = head.upgrade
        if upgrade:
            value = req.headers.get(b"upgrade")
            if value is not None:
                up_headers.add(b"Connection", b"upgrade")
                up_headers.add(b"Upgrade", value)
        has_body = head.body != "none"
        chunked = has_body and (head.body == "chunked" or plan.request_body_filter is not None)
        # The framing that goes up is the parsed head's, whatever a phase did to the client's
        # fields (request_filter may edit req_header): a Content-Length that disagreed with
        # the bytes sent would leave some of them on the pooled connection, read there as the
        # next client's request, or have the origin read the next client's as this body.
        set_framing(up_headers, head, chunked)
        if plan.upstream_request_filter is not None:
            up_req = RequestHeader._trusted(req.method, req.uri, "1.1", up_headers)
            r = proxy.upstream_request_filter(session, up_req, ctx)
            if plan.upstream_request_filter:
                await r
            method, uri, up_headers = up_req.method, up_req.uri, up_req.headers
            # The body goes up as decided above, whatever the filter did to its framing: a
            # Content-Length that disagreed with the bytes sent would leave some of them on
            # the pooled connection, read there as the next client's request (SPEC 7: what
            # goes up is what pyngora parsed and frames itself).
            set_framing(up_headers, head, chunked)
        else:  # nobody edits the upstream head: no RequestHeader to build
            method, uri = req.method, req.uri
        # The client's own bytes when the phases kept its method and target (no re-encoding);
        # else what a phase set, checked: a CR, LF or space would split the request line.
        method_b = head.method if method == _ascii(head.method) else method_token(method)
        try:
            uri_b = uri.encode("latin-1")
        except UnicodeEncodeError:
            uri_b = b""
        if uri_b != head.target:
            check_target(uri_b)
        if has_body and session._ahead_size < 0:  # (after every phase that may read it)
            raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                        "a phase read more of the request body than is kept to send "
                        f"upstream ({session.READ_AHEAD_LIMIT} bytes) and then proxied it")
        if conn.__class__ is H2UpstreamStream:
            # gRPC: "te: trailers" is hop-by-hop for HTTP/1 (removed above) but must reach an
            # HTTP/2 upstream when the client sent it (RFC 9113 8.2.2 allows that value only).
            conn.send_head(method_b, uri_b, up_headers, te_trailers=_te_trailers(req.headers))
        else:
            conn.send_head(method_b, uri_b, up_headers)
        if not has_body:
            return await self._response(session, conn, upgrade, ctx)
        # Full duplex: the body goes up in its own task while the response is read, so an
        # upstream that answers (or streams) before it has read the whole body cannot
        # deadlock against a proxy that only reads once it has written everything.
        conn.body_sending = True  # read_timeout starts once the body is up (body_done)
        sender = asyncio.ensure_future(
            send_request_body(self.proxy, self.plan, session, conn, chunked, ctx))
        # Its error is reported through the response reader (or the client is already gone
        # and answered): mark it retrieved whatever path we leave by, cancellation included.
        sender.add_done_callback(_retrieved)
        try:
            clean = await self._response(session, conn, upgrade, ctx)
        except Error as e:
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                raise sender.exception() from e  # type: ignore[misc]  # the real cause
            raise
        finally:
            if not sender.done():
                # The upstream answered before reading the whole body (or we failed): stop
                # sending; the connection cannot be reused, the client's rest is discarded.
                clean = False
                sender.cancel()
                try:
                    await sender
                except (asyncio.CancelledError, Exception):
                    pass
        if sender.cancelled() or sender.exception() is not None:
            return False  # (exception() of a cancelled task raises CancelledError)
        return clean

    async def _response(self, session: Session, conn: UpstreamConnection, upgrade: bool,
                        ctx: Any) -> bool:
        """Read the response from ``conn`` and stream it to the client. Returns True when the
        exchange completed cleanly."""
        proxy, plan = self.proxy, self.plan
        ex = session.exchange
        # Events already queued (a small response arrives whole, in one data_received) are
        # taken without a coroutine; read_event (which may wait) only when none is.
        poll = conn.poll_event if conn.__class__ is UpstreamConnection else _no_event
        # -- the response head (1xx first)
        while True:
            ev = poll()
            if ev is None:
                ev = await conn.read_event()
            if ev.__class__ is InformationalResponse:
                if ev.status != 100:  # type: ignore[union-attr]
                    ex.write_informational(ev.status,  # type: ignore[union-attr]
                                           informational_fields(ev.headers))  # type: ignore[union-attr]
                continue
            break
        if ev.__class__ is not ResponseHead:
            raise Error(ErrorType.InvalidHTTPHeader, ErrorSource.Upstream, None,
                        "no response head from upstream")
        rh: ResponseHead = ev  # type: ignore[assignment]
        session.upstream_status = rh.status
        headers = rh.headers
        if rh.status == 101 and not upgrade:
            raise Error(ErrorType.InvalidHTTPHeader, ErrorSource.Upstream, None,
                        "101 Switching Protocols to a request that asked for no upgrade")
        switching = rh.status == 101
        upgrade_value = headers.get(b"upgrade") if switching else None
        remove_hop_by_hop(headers)
        if switching:
            # A 1xx has no body, so no framing field (RFC 9110 8.6): what follows is the tunnel.
            headers.remove(b"content-length")
            headers.add(b"Connection", b"upgrade")
            if upgrade_value is not None:
                headers.add(b"Upgrade", upgrade_value)
        if plan.upstream_response_filter is None and plan.response_filter is None:
            # Nobody edits the response head: no ResponseHeader, and the upstream's reason
            # phrase as bytes (None when standard, so the status line comes from a cache).
            status, out_headers = rh.status, headers
            out_reason: Optional[bytes | str] = reason_for(status, rh.reason)
        else:
            reason = rh.reason.decode("latin-1") if rh.reason else None
            resp = ResponseHeader(rh.status, reason, rh.version, headers)
            if plan.upstream_response_filter is not None:
                r = proxy.upstream_response_filter(session, resp, ctx)
                if plan.upstream_response_filter:
                    await r
            if plan.response_filter is not None:
                r = proxy.response_filter(session, resp, ctx)
                if plan.response_filter:
                    await r
            status, out_headers, out_reason = resp.status, resp.headers, resp.reason
            if out_headers.__class__ is not Headers and not isinstance(out_headers, Headers):
                raise TypeError("a response filter set headers to a "
                                f"{type(out_headers).__name__}, not a Headers")
        if switching:
            ev = await conn.read_event()  # the 101's (empty) MessageEnd
            ex.write_head(101, out_headers, out_reason)
            await tunnel(ex, conn)
            return False
        filtered = (plan.upstream_response_body_filter is not None
                    or plan.response_body_filter is not None)
        if rh.body == "none" and not filtered:
            ev = poll()
            if ev is None:
                ev = await conn.read_event()  # MessageEnd
            ex.write_head(status, out_headers, out_reason, end=True)
            return True
        ex.write_head(status, out_headers, out_reason)
        # An HTTP/1 client connection whose transport is not paused needs no drain() call
        # (drain would return at once; write_body already flushed the head).
        h1_down = ex.__class__ is Exchange
        # -- the response body
        while True:
            ev = poll()
            if ev is None:
                ev = await conn.read_event()
            if ev.__class__ is Data:
                data: Optional[bytes] = ev.data  # type: ignore[union-attr]
                if filtered:
                    data = await self._body_filters(session, data, False, ctx)
                if data:
                    ex.write_body(data)
                    if not h1_down or ex._head_buf is not None or ex.conn._write_paused \
                            or ex.conn.closed:
                        await ex.drain()
            elif ev.__class__ is MessageEnd:
                if filtered:
                    data = await self._body_filters(session, None, True, ctx)
                    if data:
                        ex.write_body(data)
                ex.write_end(ev.trailers)  # type: ignore[union-attr]
                return True
            else:
                raise Error(ErrorType.InvalidHTTPHeader, ErrorSource.Upstream, None,
                            f"unexpected {ev.__class__.__name__} in a response body")

    async def _body_filters(self, session: Session, data: Optional[bytes], end: bool,
                            ctx: Any) -> Optional[bytes]:
        proxy, plan = self.proxy, self.plan
        if plan.upstream_response_body_filter is not None:
            r = proxy.upstream_response_body_filter(session, data, end, ctx)
            data = (await r) if plan.upstream_response_body_filter else r
            if data is not None and data.__class__ is not bytes:
                data = body_piece("upstream_response_body_filter", data)
        if plan.response_body_filter is not None:
            r = proxy.response_body_filter(session, data, end, ctx)
            data = (await r) if plan.response_body_filter else r
            if data is not None and data.__class__ is not bytes:
                data = body_piece("response_body_filter", data)
        return data

def _retrieved(task: "asyncio.Future[None]") -> None:
    """Done callback: consume a task's exception so asyncio never logs it as lost."""
    if not task.cancelled():
        task.exception()
