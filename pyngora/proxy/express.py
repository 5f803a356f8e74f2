"""The express lane: the YAML proxy's most common request, proxied in two callbacks.

Most requests a proxy sees are GETs that a client repeats byte for byte (the parser already
keeps their verdict, ``h1._SEEN``), routed by Host and path to a group that hashes nothing,
whose backend has an idle pooled connection, and answered by a whole plain response in one
read (``h1_splice``). For such a request the fast path still builds the events, the exchange,
a Session and a forwarder, asks ``upstream_peer`` (four calls down to the balancer), and
writes at the end of the loop iteration: about 60 Python calls where the work is two lookups
and two writes.

Here the downstream connection offers the request's bytes before parsing them
(``HttpApp.express``); :meth:`Express.take` looks them up in a table of what it learnt about
them (the route's group, the bytes to send upstream), asks the group's balancer, takes a
pooled connection, sends, and waits for the first bytes of the response
(``UpstreamConnection.first_bytes_to``). A whole plain response goes to the client from that
callback (``Exchange.write_whole``, the path every proxied response ends on). Metrics and
keep-alive are the connection's and the exchange's own code, so they count the same.

Anything else is the fast path's, with nothing lost on the way:

- before sending (an unknown request, no pooled connection, ...):
  ``take`` returns False and the connection parses the bytes as always; a peer already chosen
  is handed over (``FastPath.preset``) so the balancer is not asked twice;
- after sending (a response in several reads or not plain, an error, EOF, read_timeout, the
  client gone): the request is *promoted* -- given a head of its own and a Session -- and
  adopted by a fast-path forwarder (``FastPath.adopt``), which then reads the response or
  fails the attempt under the engine's rules (retry, 502, 504), as if it had sent it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.protocols.events import RequestHead
from pyngora.protocols.h1 import Known, known_head
from pyngora.proxy import access
from pyngora.proxy.fast_path import WRITE_AT_ONCE
from pyngora.proxy.session import Session
from pyngora.proxy.wire import upstream_head

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.proxy.engine import ProxyEngine
    from pyngora.proxy.fast_path import _Forward
    from pyngora.services.http_app import Exchange, H1Connection
    from pyngora.upstreams.connector import UpstreamConnection
    from pyngora.upstreams.peer import HttpPeer

__all__ = ["Express"]

_GET = b"GET"
_UNKNOWN = object()
# Requests learnt (per worker): bounded as the parser's own table, and emptied when full.
_TABLE_MAX = 512

# What take() needs of a known request: (the parser's entry, a template head -- read-only;
# a promoted request gets its own --, the route's group, the bytes to send upstream, the
# group's metrics recorders or None).
_Entry = tuple[Known, RequestHead, Any, bytes, Any]


class Express:
    """One per ProxyEngine whose proxy is a DeclarativeProxy served by the fast path."""

    __slots__ = ("engine", "fast", "connector", "proxy", "service", "_table")

    @staticmethod
    def serves(engine: "ProxyEngine") -> bool:
        """True for the classes ``build_proxy`` assembles (their ``upstream_peer`` is the
        group's pick, nothing else) when the fast path serves them: no phase to run."""
        proxy = engine.proxy
        return (engine.fast is not None and getattr(proxy, "_shared_peers", False) is True
                and callable(getattr(proxy, "route_to", None)))

    def __init__(self, engine: "ProxyEngine") -> None:
        assert engine.fast is not None
        self.engine = engine
        self.fast = engine.fast
        self.connector = engine.connector
        self.proxy: Any = engine.proxy
        self.service = engine.service
        self._table: dict[bytes, Optional[_Entry]] = {}

    def take(self, conn: "H1Connection", data: bytes) -> bool:
        """Offered ``data``, the first read of a request on an idle connection: True when
        the request was taken (sent upstream), False to have the connection parse it."""
        # The engine's fast path may be switched off (tests compare the paths): the lane
        # is part of it.
        fast = self.engine.fast
        try:
            entry = self._table.get(data, _UNKNOWN)
            if entry is _UNKNOWN:
                self._learn(conn, data)
                return False
            if entry is None or fast is None:
                return False
            seen, head, group, raw, um = entry  # type: ignore[misc]
            parser = conn.parser
            known = parser.known(data)
            if known is not seen:  # not between requests, or other limits, or ...
                if known is not None:  # ... the parser forgot it and learnt it again
                    del self._table[data]
                return False
        except Exception:  # routing raised (learning): the fast path routes, and answers
            return False
        # From here the balancer has been asked: whatever it said goes to the fast path with
        # the request (FastPath.preset), which must not ask again (a balancer of the hook may
        # answer differently, or count its calls).
        try:
            addr = group.next_addr()
            if addr is None:  # no healthy backend: the fast path answers 503
                fast.preset = (data, None, group.max_retries(), group.no_backend())
                return False
            peer = group.peers.get(addr) or group.shared_peer(addr)
            up = self.connector.get_pooled(peer)
        except Exception as e:  # the balancer (a user's hook, perhaps) or the pool: 500
            fast.preset = (data, None, group.max_retries(), e)
            return False
        if up is None:  # the fast path dials this very peer
            fast.preset = (data, peer, group.max_retries(), None)
            return False
        if not head.keep_alive:
            parser.took_known()
        ex = conn.begin_known(head)
        ride = _Ride(self, ex, up, peer, group, um, seen, raw)
        ex.task = ride  # type: ignore[assignment]  # (the connection cancels it if the client goes)
        fast.schedule(ride)  # sent at the end of the loop iteration, with the fast path's
        return True

    def _learn(self, conn: "H1Connection", data: bytes) -> None:
        """Note what take() needs of ``data`` once the parser knows it (it parses a request
        the first time it sees it); None marks a request that is not for the express lane."""
        seen = conn.parser.known(data)
        if seen is None:
            return
        entry: Optional[_Entry] = None
        if seen[1] == _GET:
            head = known_head(seen, data)
            raw = upstream_head(head)
            group = self.proxy.route_to(head.headers.get(b"host") or b"",
                                        head.target.decode("latin-1"))
            if raw is not None and group is not None and group.plain():
                entry = (seen, head, group, raw, self.engine.umetrics_of(group.name))
        table = self._table
        if len(table) >= _TABLE_MAX:
            table.clear()
        table[data] = entry


class _Ride:
    """A request taken by the express lane, until its response is written or it is promoted.

    Stands in for the request task in ``Exchange.task`` (``done()`` / ``cancel()``), as the
    fast path's forwarder does. Its request head goes upstream, and its whole response to
    the client, at the end of the loop iteration (``FastPath.schedule``): ``raw`` and ``taken``
    hold them meanwhile."""

    __slots__ = ("express", "ex", "up", "peer", "group", "um", "seen", "raw", "taken")

    def __init__(self, express: Express, ex: "Exchange", up: "UpstreamConnection",
                 peer: "HttpPeer", group: Any, um: Any, seen: Known, raw: bytes) -> None:
        self.express = express
        self.ex = ex
        self.up: Optional[UpstreamConnection] = up  # None once released
        self.peer = peer
        self.group = group
        self.um = um
        self.seen = seen
        self.raw: Optional[bytes] = raw  # the request head, until sent
        self.taken: Optional[tuple[int, bytes, Any]] = None  # a whole response to write

    def done(self) -> bool:
        return False  # (once done, the ride is no longer the exchange's task)

    def cancel(self) -> None:
        """The client went away before its response was written: as the fast path does."""
        taken = self.taken
        if taken is not None:
            self.taken = None
            self._client_gone(taken[0])
            return
        sent = self.raw is None
        self.raw = None
        self._promote(sent).cancel()

    def run(self) -> None:
        """``FastPath._run``'s turn: send the request head, or write the response."""
        raw = self.raw
        if raw is not None:
            self.raw = None
            if not self.up.send_and_listen(  # type: ignore[union-attr]
                    _GET, raw, self.on_upstream, self.peer.options.read_timeout, self.whole):
                # The origin closed (or spoke on) the pooled connection in this iteration:
                # the fast path takes another one, or dials, as it would have.
                self._promote(False).run()
                return
            if self.um is not None:
                self.um.reused += 1  # (pool_reused(), inline)
            return
        taken = self.taken
        if taken is None:
            return  # the client went meanwhile (cancel)
        self.taken = None
        ex = self.ex
        if ex.conn.closed:  # aborted, its connection_lost still to come
            self._client_gone(taken[0])
            return
        ex.task = None  # (no ex <-> ride cycle left behind)
        ex.write_whole(*taken)
        if log._access_on:  # the Session the line is made of, made now (as few need it)
            session = self._session(own_head=False)
            session.upstream_status = taken[0]
            log.ACCESS.info(access.format_line(session, None, self.express.fast.access_format))

    def broken(self) -> None:
        """``run`` raised (a bug): the upstream connection is dropped, the client gets a 502."""
        self.raw = self.taken = None
        if self.up is not None:
            self.express.connector.release(self.up, False)
            self.up = None
        ex = self.ex
        if ex.task is self:
            ex.task = None
        if not ex.finished:
            ex.respond_error(502)

    def whole(self, data: bytes) -> bool:
        """The response's first bytes (``first_bytes_to``): a whole plain response is taken,
        to be written at the end of the iteration (at once when large: see fast_path);
        anything else is promoted (False: the connection parses ``data``)."""
        up = self.up
        taken = up.take_whole(data)  # type: ignore[union-attr]
        if taken is None:
            fwd = self._promote(True)
            # The wait's deadline stays the one armed at the send: a first read of a few
            # bytes must not start read_timeout over (a dribbling origin would stretch it).
            up.relisten(fwd.on_upstream)  # type: ignore[union-attr]
            return False
        express = self.express
        express.connector.release(up, True)  # type: ignore[arg-type]
        self.up = None
        if self.um is not None:
            self.um.request_done(self.peer.backend, taken[0])
        self.taken = taken
        if len(taken[1]) + len(taken[2]) > WRITE_AT_ONCE:
            try:
                self.run()
            except Exception as e:  # a bug: this request fails (502), not the upstream's read
                log.ERROR.error("express lane failed: %r", e, exc_info=e)
                self.broken()
        else:
            express.fast.schedule(self)
        return True

    def on_upstream(self, ready: bool) -> None:
        """The upstream connection's listener before any byte of the response: EOF, an
        error or close (``ready``), or read_timeout. The fast path's rules apply."""
        up = self.up
        fwd = self._promote(True)
        if ready:
            up.listen(fwd.on_upstream, None)  # type: ignore[union-attr]  # (its run listens again)
        fwd.on_upstream(ready)

    def _client_gone(self, status: int) -> None:
        """The client went after the response was taken (the upstream connection is pooled
        again): the engine logs and counts the request, as for the fast path."""
        ex = self.ex
        session = self._session()
        session.upstream_status = status
        ex.task = None
        ex.conn.run_task(ex, self.express.engine.run(ex, session, error=Error(
            ErrorType.ConnectionClosed, ErrorSource.Downstream, None, "client disconnected")))

    def _session(self, own_head: bool = True) -> Session:
        """The Session that the fast path would have made; with the request's own head, for
        code that may edit it, unless ``own_head`` is False (the access log only reads)."""
        ex = self.ex
        if own_head:
            ex.head = known_head(self.seen, ex.head.raw)  # type: ignore[arg-type]
        session = Session(ex, self.express.service)
        session.peer = self.peer
        session.max_retries = self.group.max_retries()
        return session

    def _promote(self, sent: bool) -> "_Forward":
        """Hand the request to a fast-path forwarder, as if it had taken it itself: waiting
        for the response head when ``sent``, else about to send it."""
        up = self.up
        fwd = self.express.fast.adopt(self.ex, self._session(), up,  # type: ignore[arg-type]
                                      self.um, sent)
        self.up = None  # (only now: broken() releases it if the lines above raised)
        up.first_bytes_to(None)  # type: ignore[union-attr]
        return fwd
