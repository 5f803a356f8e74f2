"""Sans-IO HTTP/1.x: bytes in, events out (no asyncio here, by design).

``RequestParser`` (downstream side) and ``ResponseParser`` (upstream side) wrap httptools
(llhttp in strict mode, which already refuses bare LF, obs-fold, bad tokens, CL+TE, duplicate
Content-Length, bad chunk lines...). What llhttp lets through and a proxy must not forward is
checked here, once per message, on data the callbacks collected: Host rules, request-target
forms, Transfer-Encoding other than a single ``chunked``, framing headers in trailers, versions,
size limits. The callbacks only collect; no regex runs per request.

Rejections raise :class:`ProtocolError` carrying the status to answer (400, 413, 431, 501, 505 for
requests; 502 for a bad upstream response). The caller answers it and closes the connection.

Decisions where the RFCs leave room: OWS around a value is not part of it (``Content-Length:
5 `` is 5; leading zeros are fine); versions other than 1.0/1.1 get 505 (HTTP/0.9 lines 400);
methods llhttp does not know get 400; a fragment in the target is 400; ``Expect:
100-continue`` counts on HTTP/1.1 only; bytes after a request that closes the connection are
ignored; after an upgrade request the following bytes are not parsed (tunnel them, or close
the connection if the upstream refuses the upgrade), but an upgrade request with a body is an
ordinary request (its body parsed, its Upgrade dropped), and so is an HTTP/1.0 request that
asks for one (RFC 9110 7.8); an absolute-form target becomes
origin-form (its authority the Host when there is none); CONNECT gets 501; a Connection field
naming Content-Length, Transfer-Encoding or Host gets 400 (removing what Connection names would
strip the request of its framing or its Host).
"""
from __future__ import annotations

from typing import Optional

import httptools

from pyngora.headers import Headers
from pyngora.protocols.events import Data, Event, MessageEnd, RequestHead
from pyngora.protocols.h1_target import target_authority

__all__ = ["H1Limits", "Known", "ProtocolError", "RequestParser", "ResponseParser", "known_head",
           "serialize_request_head", "serialize_response_head", "encode_chunk",
           "encode_last_chunk", "remove_hop_by_hop", "origin_form", "HOP_BY_HOP",
           "H2_PREFACE"]


class H1Limits:
    """Size limits for one HTTP/1 connection's messages.

    ``max_header_bytes`` bounds the request line plus the header fields (over it: 431, or 502
    for a response); ``max_headers`` bounds their number (431); ``max_body_bytes`` bounds a
    request body, by Content-Length up front or while de-chunking (413). None = no body limit.
    """

    __slots__ = ("max_header_bytes", "max_headers", "max_body_bytes")

    def __init__(self, max_header_bytes: int = 65536, max_headers: int = 100,
                 max_body_bytes: Optional[int] = None) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes


_DEFAULT_LIMITS = H1Limits()


class ProtocolError(Exception):
    """A message the parser refuses. ``status`` is what to answer (400/413/431/505, or 502 for
    an upstream response); ``reason`` says why, for the log. ``events`` holds what the same
    ``feed`` produced before the error (earlier pipelined requests), which a caller may serve
    first or drop."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.events: list[Event] = []

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class _Stop(Exception):
    """Raised inside a callback to make llhttp stop where it is (not an error to report)."""


# Lowercased names that the request callbacks look at; everything else is only collected.
_HOST, _CL, _TE, _EXPECT = b"host", b"content-length", b"transfer-encoding", b"expect"
_CONNECTION = b"connection"
_SPECIAL = frozenset((_HOST, _CL, _TE, _EXPECT, _CONNECTION))
_FRAMING = frozenset((_CL, _TE))
# Connection values that name no field a proxy must keep (the usual ones: one dict lookup).
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade", b"te", b"te, close",
                               b"upgrade, http2-settings", b"keep-alive, upgrade",
                               b"upgrade, keep-alive"))
# Fields a Connection option must not name: a proxy removes what Connection names (RFC 9110
# 7.6.1), and without these the request it forwards would lose its framing or its Host.
_NOT_OPTIONS = frozenset((_HOST, _CL, _TE))
# RFC 9110 6.5.1: framing, routing and the like must not come in trailers.
_FORBIDDEN_TRAILERS = frozenset((_HOST, _CL, _TE, b"connection", b"keep-alive", b"upgrade",
                                 b"trailer", b"te", b"proxy-connection"))
_WS = (32, 9)  # SP, HTAB: trailing OWS that llhttp leaves on a value
_new_headers = object.__new__
_GOOD_HOSTS: set[bytes] = set()  # Host values already validated (per process, bounded)
# Requests already parsed: the exact bytes of a body-less HTTP/1.1 request that came alone in
# one read -> (limits, method, target, fields, lowercased names, keep-alive) as parsing them
# gave. Clients repeat their heads byte for byte (the same page, the same keep-alive client),
# and a verdict depends on the bytes and the limits alone, so a repeat skips llhttp and the
# callbacks (RequestParser.feed). Bounded in entries and in the size of what it keeps.
Known = tuple[tuple[int, int, Optional[int]], bytes, bytes, tuple[tuple[bytes, bytes], ...],
              tuple[bytes, ...], bool]
_SEEN: dict[bytes, Known] = {}
_SEEN_MAX = 512
_SEEN_BYTES = 2048
#: The HTTP/2 connection preface: sniff for it before feeding an h2c-capable listener's bytes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _asks_h2c(head: RequestHead) -> bool:
    """True when an upgrade request's Upgrade fields name h2c (alone or among others)."""
    return any(token.strip().lower() == b"h2c" for value in head.headers.get_all(b"upgrade")
               for token in value.split(b","))


def known_head(seen: Known, data: bytes) -> RequestHead:
    """A fresh RequestHead of a known request (see _SEEN): its own Headers, ``raw`` = data."""
    headers = _new_headers(Headers)
    headers._items = list(seen[3])
    headers._keys = list(seen[4])
    head = RequestHead(seen[1], seen[2], "1.1", headers, seen[5], "none", None)
    head.raw = data
    return head


def _is_chunked(te: bytes) -> bool:
    """True when a Transfer-Encoding value is exactly one ``chunked`` coding."""
    return te.lower().strip(b" \t") == b"chunked"


class RequestParser:
    """Parses the requests of one downstream connection, reused across keep-alive requests.

    ``feed`` returns, in order, ``RequestHead``, ``Data``* and ``MessageEnd`` for every
    request the bytes complete (pipelining: many per call). After a request whose
    ``upgrade`` is True (a WebSocket upgrade, with no body), ``upgraded`` is True, parsing stops,
    ``take_trailing()`` gives the bytes that followed the head, and later ``feed`` calls
    return their bytes as ``Data`` events (the tunnel). After a request that does not keep
    the connection alive, later bytes are ignored.
    """

    __slots__ = ("_max_head", "_max_headers", "_max_body", "_stopped",
                 "_p", "_events", "_url", "_items", "_keys", "_in_head",
                 "in_message", "_head_size", "_head_fed", "_uncertain", "_completed",
                 "_hosts", "_host", "_cl", "_te", "_expect", "_trailers", "_tkeys",
                 "_chunked", "_body_seen", "_keep_alive", "_error", "_closed", "upgraded",
                 "_trailing", "_stall", "_limits", "_boundary", "_rewritten", "_priming")

    def __init__(self, limits: Optional[H1Limits] = None) -> None:
        limits = limits or _DEFAULT_LIMITS
        self._max_head = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._max_body = limits.max_body_bytes
        self._stopped = False      # any of _error / upgraded / _closed is set
        self._p = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._url: list[bytes] = []
        self._items: list[tuple[bytes, bytes]] = []
        self._keys: list[bytes] = []
        self._in_head = False       # a request began and its head is not complete yet
        # A request began and has not ended yet (a timeout then means 408 / abort); written
        # by this parser only.
        self.in_message = False
        self._head_size = 0         # exact bytes of the head seen through the callbacks
        self._head_fed = 0          # bytes fed while a head stayed incomplete (see feed)
        self._uncertain = False     # the current head began after another request ended in the same feed
        self._completed = 0         # requests ended during the current feed
        self._hosts = 0
        self._host: Optional[bytes] = None
        self._cl: Optional[bytes] = None
        self._te: Optional[bytes] = None
        self._expect = False
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None  # of the current message
        self._tkeys: list[bytes] = []
        self._chunked = False
        self._body_seen = 0
        self._keep_alive = True
        self._error: Optional[ProtocolError] = None
        self._closed = False        # a request that closes the connection has ended
        self.upgraded = False
        self._trailing = b""
        self._stall = 0             # body-phase bytes fed in a row without any event
        self._limits = (self._max_head, self._max_headers, self._max_body)
        self._boundary = True       # llhttp is between requests with nothing buffered
        self._rewritten = False     # the current head's target is not the client's bytes
        self._priming = False       # a synthetic head goes through (_upgrade_with_body)

    # -- public API ------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data`` (any split); return the events it completes, in order.

        Raises ProtocolError for anything malformed; the parser is then dead and raises the
        same error again on every later call.
        """
        if self._stopped:  # dead, upgraded or closed: rare, so one flag on the fast path
            if self._error is not None:
                raise self._error
            if self.upgraded:
                return [Data(data)] if data else []
            return []
        if self._boundary:
            seen = _SEEN.get(data)
            if seen is not None and seen[0] == self._limits:
                if not seen[5]:
                    self.took_known()
                return [known_head(seen, data), MessageEnd(None)]
            self._boundary = False
        events: list[Event] = []
        self._events = events
        self._completed = 0
        fresh = not self.in_message
        fed: "bytes | memoryview" = data
        while True:  # more than one turn only after upgrade requests with a body
            try:
                self._p.feed_data(fed)
            except httptools.HttpParserUpgrade as exc:
                trailing = memoryview(fed)[exc.args[0]:]  # (no copy per pipelined request)
                head = events[-2] if len(events) >= 2 else None
                if head.__class__ is RequestHead and (
                        head.body == "chunked" or head.content_length):  # type: ignore[union-attr]
                    self._upgrade_with_body(events, head)  # type: ignore[arg-type]
                    if trailing:
                        fed = trailing
                        fresh = False
                        continue
                    return events
                if head.__class__ is RequestHead and (
                        head.version == "1.0" or _asks_h2c(head)):  # type: ignore[arg-type]
                    # RFC 9110 7.8: Upgrade in an HTTP/1.0 request is ignored (and no 101
                    # may go to a 1.0 client): an ordinary request. So is an upgrade to h2c
                    # (RFC 9113 3.1 deprecates it): tunnelled, it would let a client speak
                    # HTTP/2 to the origin past this proxy's routing and checks; HTTP/2 is
                    # served by the h2c listener. llhttp stopped as for any upgrade, so the
                    # bytes after it go to a fresh one, if anything may follow at all.
                    head.upgrade = False  # type: ignore[union-attr]
                    if not head.keep_alive:  # type: ignore[union-attr]
                        self._closed = self._stopped = True
                        return events
                    self._p = httptools.HttpRequestParser(self)
                    if trailing:
                        fed = trailing
                        fresh = False
                        continue
                    return events
                self.upgraded = self._stopped = True
                self._trailing = bytes(trailing)
                return events
            except httptools.HttpParserError as exc:
                if self._error is None and self._closed:
                    return events  # bytes after a request that closes the connection: ignored
                err = self._error or self._map_error(exc)
                err.events = events
                self._error = err
                self._stopped = True
                raise err from None
            break
        if fed is not data:
            data = bytes(fed)  # what the current llhttp was given (the accounting below)
        if self._in_head:
            # The head is incomplete: llhttp buffers the partial field, unseen by the
            # callbacks, so bound it by bytes fed. Exact when the head began in an earlier
            # feed or at the start of this one; when it began after another request ended in
            # this same feed its share is unknown and counts from the next feed on. (Whether
            # a head was pending when the feed began says nothing: with pipelining, that head
            # may have ended and a later one begun in this feed, whose share is not ``data``.)
            if not self._uncertain:
                self._head_fed += len(data)
                if self._head_fed > self._max_head:
                    self._reject_now(431, "request head too large", events)
            else:
                self._uncertain = False  # the same head in the next feed: count every byte
        elif events:
            self._stall = 0
            if fresh and self._completed == 1 and len(events) == 2:
                # One body-less request, alone in ``data``: keep its bytes (RequestHead.raw).
                head = events[0]
                if (head.body == "none" and head.version == "1.1"  # type: ignore[union-attr]
                        and not self._rewritten
                        # its request line as re-serialising would write it: llhttp takes
                        # "GET  /x HTTP/1.1" too, which an origin may split otherwise
                        and data.startswith(b"%s %s HTTP/1.1\r\n" % (
                            head.method, head.target))  # type: ignore[union-attr]
                        and data.find(b"\r\n\r\n") + 4 == len(data)):
                    head.raw = data  # type: ignore[union-attr]
                    self._boundary = True
                    if (not head.expect_continue and not head.upgrade  # type: ignore[union-attr]
                            and len(data) <= _SEEN_BYTES):
                        self._remember(data, head)  # type: ignore[arg-type]
        elif self.in_message:
            # Body bytes that produced nothing: chunk lines or trailers, which llhttp may be
            # buffering (a trailer value that never ends). Bounded like a head.
            self._stall += len(data)
            if self._stall > self._max_head:
                self._reject_now(431, "chunk lines or trailers too large", events)
        return events

    def feed_eof(self) -> list[Event]:
        """The client half-closed. Returns [] between requests; a partial request -> 400."""
        if self._error is not None:
            raise self._error
        if self.in_message and not self.upgraded and not self._closed:
            self._reject_now(400, "connection closed in the middle of a request", [])
        return []

    def known(self, data: bytes) -> Optional[Known]:
        """What ``feed(data)`` would give without llhttp (see _SEEN), or None: it would parse.

        Changes nothing: a caller that serves the request itself (the proxy's express lane)
        then calls :meth:`took_known` when the request closes the connection, as ``feed``
        would have noted."""
        if self._stopped or not self._boundary:
            return None
        seen = _SEEN.get(data)
        if seen is None or seen[0] != self._limits:
            return None
        return seen

    def took_known(self) -> None:
        """A known request that closes the connection was taken: as on_message_complete,
        later bytes are ignored."""
        self._keep_alive = False
        self._closed = self._stopped = True

    def take_trailing(self) -> bytes:
        """After an upgrade: the bytes that followed the request head (to tunnel); clears them."""
        data, self._trailing = self._trailing, b""
        return data

    def release(self) -> None:
        """The connection closed: drop llhttp's parser, which holds this object's callbacks
        (a reference cycle that would leave both to the garbage collector). Later feeds
        return nothing."""
        self._stopped = True
        self._p = None
        self._events = []

    # -- internals -------------------------------------------------------------------------
    def _remember(self, data: bytes, head: RequestHead) -> None:
        """Keep what parsing ``data`` gave, for its repeats (see _SEEN)."""
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()  # bounded: a client inventing heads only costs parsing them
        headers = head.headers
        _SEEN[data] = (self._limits, head.method, head.target, tuple(headers._items),
                       tuple(headers._keys), head.keep_alive)

    def _upgrade_with_body(self, events: list[Event], head: RequestHead) -> None:
        """An upgrade request with a body is served as an ordinary request: a server may
        ignore Upgrade (RFC 9110 7.8) and the body must reach the origin before any switch
        (nginx forwards such a request, body and all, as any other; ``curl --http2 -d``
        sends one). llhttp stops at the head of every upgrade request and reports it ended,
        so that end is taken back and a fresh llhttp is primed with a head of the same
        framing (which the callbacks pass over): ``feed`` then gives it the bytes after the
        head, the body and whatever follows it. (A ``Content-Length: 0`` is no body: llhttp
        upgrades such a request, a WebSocket handshake from some clients.)"""
        events.pop()  # the MessageEnd llhttp gave at the end of the head
        self._completed -= 1
        self._closed = self._stopped = False
        head.upgrade = False
        self._p = httptools.HttpRequestParser(self)
        self._priming = True
        framing = (b"Transfer-Encoding: chunked" if head.body == "chunked"
                   else b"Content-Length: %d" % (head.content_length or 0))
        close = b"" if head.keep_alive else b"Connection: close\r\n"
        self._p.feed_data(b"POST / HTTP/1.1\r\nHost: x\r\n" + close + framing + b"\r\n\r\n")

    def _reject(self, status: int, reason: str) -> None:
        """Inside a callback: remember the error and unwind through llhttp."""
        err = ProtocolError(status, reason)
        self._error = err
        self._stopped = True
        raise err

    def _reject_now(self, status: int, reason: str, events: list[Event]) -> None:
        err = ProtocolError(status, reason)
        err.events = events
        self._error = err
        self._stopped = True
        raise err

    def _map_error(self, exc: Exception) -> ProtocolError:
        msg = str(exc) or exc.__class__.__name__
        if "HTTP version" in msg:
            return ProtocolError(505, msg)
        if "PRI" in msg:  # llhttp pauses on the h2 preface
            return ProtocolError(505, "HTTP/2 connection preface on an HTTP/1 connection")
        return ProtocolError(400, msg)

    # -- httptools callbacks (collect, check cheaply) --------------------------------------
    def on_message_begin(self) -> None:
        if self._closed:
            raise _Stop()
        self._in_head = True
        self.in_message = True
        self._uncertain = self._completed > 0
        self._head_fed = 0
        self._head_size = 16  # request line overhead (method, spaces, version, CRLF)
        self._url = []
        self._items = []
        self._keys = []
        self._hosts = 0
        self._host = self._cl = self._te = None
        self._expect = False
        self._rewritten = False
        # _trailers is reset by on_message_complete, _chunked/_body_seen by on_headers_complete

    def on_url(self, part: bytes) -> None:
        self._url.append(part)
        self._head_size += len(part)
        if self._head_size > self._max_head:
            self._reject(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hot path: collect only. Sizes and counts are checked once in
        # on_headers_complete (until then memory is bounded by what one feed holds, and
        # incomplete heads by the bytes-fed count in feed()).
        if value and value[-1] in _WS:
            value = value.rstrip(b" \t")
        if self._in_head:
            key = name.lower()
            self._items.append((name, value))
            self._keys.append(key)
            self._head_size += len(name) + len(value)
            if key in _SPECIAL:
                self._special(key, value)
        else:
            self._on_trailer(name, value)

    def _special(self, key: bytes, value: bytes) -> None:
        """A header that decides framing or routing: remember it for on_headers_complete."""
        if key == _HOST:
            self._hosts += 1
            self._host = value
        elif key == _CL:
            self._cl = value
        elif key == _TE:
            if self._te is not None:
                self._reject(400, "more than one Transfer-Encoding field")
            self._te = value
        elif key == _CONNECTION:
            low = value.lower()
            if low not in _PLAIN_CONNECTION:
                for token in low.split(b","):
                    if token.strip(b" \t") in _NOT_OPTIONS:
                        self._reject(400, "Connection names a field that frames or routes "
                                          "the request")
        elif value.lower() == b"100-continue":
            self._expect = True

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in _FORBIDDEN_TRAILERS:
            self._reject(400, f"{name.decode('latin-1')} is not allowed in trailers")
        if self._trailers is None:
            self._trailers = []
            self._tkeys = []
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head or len(self._trailers) >= self._max_headers:
            self._reject(431, "trailers too large")
        self._trailers.append((name, value))
        self._tkeys.append(key)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._priming:
            self._priming = False  # the body's framing is the real head's, set already
            return
        items = self._items
        if len(items) > self._max_headers:
            self._reject(431, "too many header fields")
        self._head_size += 4 * len(items)
        if self._head_size > self._max_head:
            self._reject(431, "request head too large")
        p = self._p
        version = p.get_http_version()
        method = p.get_method()
        if version != "1.1" and version != "1.0":
            if version == "0.9":
                self._reject(400, "HTTP/0.9 request line")
            if method == b"PRI":
                self._reject(505, "HTTP/2 connection preface on an HTTP/1 connection")
            self._reject(505, f"HTTP/{version} is not supported over HTTP/1")
        url = self._url
        target = url[0] if len(url) == 1 else b"".join(url)
        if not target:
            self._reject(400, "empty request-target")
        if self._hosts != 1:
            if self._hosts > 1 or version == "1.1":
                self._reject(400, "missing Host" if self._hosts == 0 else "more than one Host field")
        elif self._host not in _GOOD_HOSTS:
            self._check_host(self._host)  # type: ignore[arg-type]
        if target[0] != 47:  # not "/": asterisk-, authority- or absolute-form
            authority = self._check_target_form(method, target)
            if authority is not None:
                # Absolute-form: routed, logged and sent upstream as origin-form (RFC 9112
                # 3.2.1: what an origin server gets), so no path rule can be bypassed by
                # spelling the target in full. Its authority is the Host (checked above).
                if method == b"OPTIONS" and target.partition(b"://")[2] == authority:
                    target = b"*"  # the server itself, not its root (RFC 9112 3.2.4)
                else:
                    target = origin_form(target)
                self._rewritten = True
                if self._host is None:  # HTTP/1.0 without Host: the target named the host
                    items.append((b"Host", authority))
                    self._keys.append(_HOST)
        elif 35 in target:  # "#"
            self._reject(400, "fragment in request-target")
        elif method == b"CONNECT":
            self._reject(400, "CONNECT needs an authority-form target")
        if method == b"CONNECT":
            # A reverse proxy tunnels no TCP for its clients (nginx refuses CONNECT too);
            # 501 as over HTTP/2 (h2_fields), once the request is known to be well-formed.
            self._reject(501, "CONNECT is not supported")
        if self._te is not None:
            if version == "1.0":
                self._reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if not _is_chunked(self._te):
                self._reject(400, "Transfer-Encoding other than a single chunked")
            body = "chunked"
            self._chunked = True
            self._body_seen = 0
            length = None
        elif self._cl is not None:
            self._chunked = False
            length = int(self._cl)  # llhttp accepted only digits
            limit = self._max_body
            if limit is not None and length > limit:
                self._reject(413, "Content-Length over max_body_bytes")
            body = "length"
        else:
            self._chunked = False
            body = "none"
            length = None
        keep_alive = p.should_keep_alive()
        self._keep_alive = keep_alive
        headers = _new_headers(Headers)  # Headers._from_parser, inlined: once per request
        headers._items = items
        headers._keys = self._keys
        self._events.append(RequestHead(
            method, target, version, headers,
            keep_alive, body, length, self._expect and version == "1.1", p.should_upgrade()))

    def _check_host(self, host: bytes) -> None:
        """Validate a Host value not seen before; remember it (hosts repeat on a proxy)."""
        if host.translate(None, HOST_CHARS):
            self._reject(400, "invalid Host")
        if len(_GOOD_HOSTS) >= 4096:
            _GOOD_HOSTS.clear()  # bounded: a client inventing hosts only costs re-checks
        _GOOD_HOSTS.add(host)

    def _check_target_form(self, method: bytes, target: bytes) -> Optional[bytes]:
        """Checks for a target that is not origin-form (``h1_target``). Returns the authority
        of an absolute-form target (None for ``*`` and authority-form)."""
        host = self._host
        try:
            given = target_authority(method, target, host)
        except ValueError as e:
            self._reject(400, str(e))
        if given is not None and host is None:
            self._check_host(given)  # HTTP/1.0 without Host: the only authority, as a Host
        return given

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            limit = self._max_body
            if limit is not None:
                self._body_seen += len(body)
                if self._body_seen > limit:
                    self._reject(413, "chunked body over max_body_bytes")
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self.in_message = False
        self._completed += 1
        trailers = self._trailers
        if trailers is None:
            self._events.append(MessageEnd(None))
        else:
            self._trailers = None
            self._events.append(MessageEnd(Headers._from_parser(trailers, self._tkeys)))
        if not self._keep_alive:
            self._closed = self._stopped = True


# -- responses -------------------------------------------------------------------------------
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


from pyngora.protocols.h1_wire import (HOP_BY_HOP, HOST_CHARS, encode_chunk,  # noqa: E402
                                       encode_last_chunk, origin_form, remove_hop_by_hop,
                                       serialize_request_head, serialize_response_head)


def __getattr__(name: str) -> object:
    # The response parser lives in h1_response.py, which builds on this module: load it on
    # first use so that either module may be imported first.
    if name == "ResponseParser":
        from pyngora.protocols.h1_response import ResponseParser
        return ResponseParser
    raise AttributeError(name)
