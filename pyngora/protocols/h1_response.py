"""Sans-IO HTTP/1.x responses (the upstream side); ``pyngora.protocols.h1`` re-exports it."""
from __future__ import annotations

from typing import Optional

import httptools

from pyngora.headers import Headers
from pyngora.protocols.events import (Data, Event, InformationalResponse, MessageEnd,
                                      ResponseHead)
from pyngora.protocols.h1 import (_BODY, _CL, _DEFAULT_LIMITS, _DONE, _FORBIDDEN_TRAILERS,
                                  _FRAMING, _HEAD, _IDLE, _WS, H1Limits, ProtocolError, _Stop,
                                  _is_chunked)


# Request methods whose responses need the head fed to llhttp alone (their body, if any,
# is not framed by the head: see _head_input).
_SPLIT_METHODS = frozenset((b"HEAD", b"CONNECT"))
# 1xx heads accepted before a final response: in all at most max_header_bytes of them (as
# Go's client bounds them), and few 100 Continue, which the proxy answers itself and passes
# on to nobody (a 102 Processing now and then is a long WebDAV request's keep-alive).
MAX_CONTINUES = 5


def _llhttp(target: "ResponseParser") -> httptools.HttpResponseParser:
    """A new llhttp response parser calling back ``target``.

    Whitespace between a chunk size and its extension (``5 ;ext``) is accepted: RFC 9112
    allows it (``chunk-ext = *( BWS ";" ... )``) and nginx takes it, where strict llhttp calls
    it an invalid chunk size (a 502 for a well-formed response). A size is still one hex
    number: ``5 5`` stays an error. Only upstream responses are parsed this way; requests keep
    llhttp's strict reading."""
    p = httptools.HttpResponseParser(target)
    p.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
    return p


class ResponseParser:
    """Parses the responses of one upstream connection, one per ``start()``.

    The head is found here (first CRLFCRLF) and fed to llhttp whole, so that the bytes after
    it are known exactly: a HEAD response or a 2xx to CONNECT has no body whatever its
    Content-Length says, a 101 or a CONNECT 2xx turns the connection into a tunnel
    (``upgraded``, ``take_trailing()``). ``ResponseHead.body`` is "none", "length",
    "chunked" or "close" (ends at EOF: call ``feed_eof``).
    """

    __slots__ = ("limits", "_p", "_method", "_state", "_buf", "_events", "_items", "_keys",
                 "_reason", "_cl", "_te", "_status", "_skip_body", "_tunnel", "_framing",
                 "_keep_alive", "_error", "_leftover", "_unsolicited", "response_started",
                 "upgraded", "_trailing", "_trailers", "_tkeys", "_head_done", "_stall",
                 "_interim", "_continues", "_tbytes")

    def __init__(self, limits: Optional[H1Limits] = None) -> None:
        # Read by the connection's take_whole; written by this parser only.
        self.limits = limits or _DEFAULT_LIMITS
        self._p: Optional[httptools.HttpResponseParser] = None
        self._method = b"GET"
        self._state = _IDLE
        self._buf = b""
        self._events: list[Event] = []
        self._items: list[tuple[bytes, bytes]] = []
        self._keys: list[bytes] = []
        self._reason = b""
        self._cl: Optional[bytes] = None
        self._te: Optional[bytes] = None
        self._status = 0
        self._skip_body = False
        self._tunnel = False
        self._framing = "none"
        self._keep_alive = True
        self._error: Optional[ProtocolError] = None
        self._leftover = b""
        self._unsolicited = False
        # True once any byte of the current response arrived (no safe retry after that);
        # written by this parser only.
        self.response_started = False
        self.upgraded = False
        self._trailing = b""
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None
        self._tkeys: list[bytes] = []
        self._head_done = False
        self._stall = 0
        self._interim = 0  # bytes of 1xx heads before the current response's final one
        self._continues = 0  # 100 Continue among them
        self._tbytes = 0  # bytes of the current response's trailers

    def start(self, request_method: bytes) -> None:
        """Expect the response to a request made with ``request_method`` (call before each)."""
        if self._error is not None:
            raise self._error
        if self.upgraded or self._state == _HEAD or self._state == _BODY:
            raise RuntimeError("ResponseParser.start() before the previous response ended")
        self._method = request_method.upper()
        self._state = _HEAD
        self._stall = self._interim = self._continues = 0
        self._buf = self._leftover
        self._leftover = b""
        self.response_started = bool(self._buf)
        if self._p is None:
            self._p = _llhttp(self)

    def taken_whole(self, keep_alive: bool) -> None:
        """The response was read whole elsewhere (``h1_splice.WholeResponses``, after
        ``start()`` and before any ``feed``): it ended, and the upstream keeps the connection
        alive or not."""
        self._state = _DONE
        self._keep_alive = keep_alive
        self.response_started = True

    @property
    def reusable(self) -> bool:
        """True when the last response ended cleanly and the connection can go back to the pool."""
        return (self._state == _DONE and self._keep_alive and not self._unsolicited
                and not self.upgraded and self._error is None and not self._leftover)

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; return the events it completes. Raises ProtocolError(502)."""
        if self._error is not None:
            raise self._error
        if self.upgraded:
            return [Data(data)] if data else []
        state = self._state
        if state == _IDLE or state == _DONE:
            if data:
                self._unsolicited = True  # bytes nobody asked for: do not reuse the connection
                if len(self._leftover) < self.limits.max_header_bytes:  # bounded
                    self._leftover += data
            return []
        events: list[Event] = []
        self._events = events
        if data:
            self.response_started = True
        try:
            if state == _HEAD:
                self._head_input(data)
            else:
                self._feed_llhttp(data, head=False)
                if events:
                    self._stall = 0
                else:  # chunk lines / trailers that llhttp may be buffering: bounded
                    self._stall += len(data)
                    if self._stall > self.limits.max_header_bytes:
                        raise ProtocolError(502, "upstream chunk lines or trailers too large")
        except ProtocolError as err:
            err.events = events
            self._error = err
            raise
        return events

    def feed_eof(self) -> list[Event]:
        """The upstream closed. Ends a "close"-framed body; anything else unfinished -> 502."""
        if self._error is not None:
            raise self._error
        state = self._state
        if self.upgraded or state == _IDLE or state == _DONE:
            return []
        if state == _BODY and self._framing == "close":
            self._state = _DONE
            self._keep_alive = False
            return [MessageEnd(None)]
        err = ProtocolError(502, "upstream closed before the response head" if state == _HEAD
                            else "upstream closed in the middle of the response body")
        self._error = err
        raise err

    def release(self) -> None:
        """The connection closed: drop llhttp's parser, which holds this object's callbacks
        (a reference cycle that would leave both to the garbage collector)."""
        self._p = None
        self._events = []

    def take_trailing(self) -> bytes:
        """After a 101 (or 2xx to CONNECT): the bytes after the head (to tunnel); clears them."""
        data, self._trailing = self._trailing, b""
        return data

    # -- internals -------------------------------------------------------------------------
    def _head_input(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        limit = self.limits.max_header_bytes
        pos = 0  # where the next head starts in buf (after 1xx heads)
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                rest = buf[pos:] if pos else buf
                if len(rest) > limit:
                    raise ProtocolError(502, "upstream response head too large")
                if rest.count(b"\n") != rest.count(b"\r\n"):
                    raise ProtocolError(502, "bare LF in upstream response head")
                self._buf = rest
                return
            end += 4
            if end - pos > limit:
                raise ProtocolError(502, "upstream response head too large")
            self._buf = b""
            if pos == 0 and buf[9:10] != b"1" and self._method not in _SPLIT_METHODS:
                # The common case: a final response (no 1xx/101: the status' first digit) to a
                # request whose response framing llhttp knows by itself (not HEAD, not
                # CONNECT). Head and body go to llhttp in one call; bytes after the response
                # end make it unsolicited, as in the split path below.
                self._feed_llhttp(buf, head=False)
                return
            view = memoryview(buf)  # llhttp reads views: the body after the head is not copied
            self._feed_llhttp(view[pos:end], head=True)
            pos = end
            if self._state == _HEAD:   # a 1xx came: the real head follows
                # A fresh llhttp for it: one that saw "Connection: close" on the 1xx would
                # refuse the final response (only the final one's Connection counts).
                self._p = _llhttp(self)
                continue
            if self.upgraded:
                self._trailing = buf[pos:]
            elif self._state == _DONE:
                if self._skip_body:
                    self._p = _llhttp(self)  # llhttp still waits for a body
                if pos < len(buf):
                    self._unsolicited = True
                    self._leftover = buf[pos:]
            elif pos < len(buf):
                self._feed_llhttp(view[pos:], head=False)
            return

    def _feed_llhttp(self, data: bytes | memoryview, head: bool) -> None:
        p = self._p
        assert p is not None
        try:
            p.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # only a complete head is fed, so nothing follows within ``data``
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            if self._status == 101 and self._head_done and head:
                pass  # llhttp pauses on any 101; the tunnel is decided in on_headers_complete
            elif self._state == _DONE and not head:
                self._p = None  # bytes after the end of the response
                self._unsolicited = True
                return
            else:
                raise ProtocolError(502, f"bad upstream response: {exc}") from None
        if head and self._status == 101 and self._head_done:
            self.upgraded = True
            self._state = _DONE
            self._keep_alive = False
            self._events.append(MessageEnd(None))

    def _reject(self, reason: str) -> None:
        err = ProtocolError(502, reason)
        self._error = err
        raise err

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state == _DONE:
            raise _Stop()  # a second response nobody asked for
        self._items = []
        self._keys = []
        self._reason = b""
        self._cl = self._te = None
        self._trailers = None
        self._head_done = False
        self._status = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in _WS:
            value = value.rstrip(b" \t")
        key = name.lower()
        if self._head_done:
            self._on_trailer(name, key, value)
            return
        # The head was fed whole (at most max_header_bytes), so the count is checked once,
        # in on_headers_complete.
        self._items.append((name, value))
        self._keys.append(key)
        if key in _FRAMING:
            if key == _CL:
                self._cl = value
            elif self._te is not None:
                self._reject("more than one Transfer-Encoding field in upstream response")
            else:
                self._te = value

    def _on_trailer(self, name: bytes, key: bytes, value: bytes) -> None:
        if key in _FORBIDDEN_TRAILERS:
            self._reject(f"{name.decode('latin-1')} in upstream trailers")
        if self._trailers is None:
            self._trailers = []
            self._tkeys = []
            self._tbytes = 0
        elif len(self._trailers) >= self.limits.max_headers:
            self._reject("too many trailer fields in upstream response")
        # Bounded as a head, however the trailers arrive (the read that ends the response
        # escapes the stall count in feed)
        self._tbytes += len(name) + len(value) + 4
        if self._tbytes > self.limits.max_header_bytes:
            self._reject("upstream trailers too large")
        self._trailers.append((name, value))
        self._tkeys.append(key)

    def on_headers_complete(self) -> None:
        self._head_done = True
        p = self._p
        assert p is not None
        if len(self._items) > self.limits.max_headers:
            self._reject("too many header fields in upstream response")
        status = p.get_status_code()
        self._status = status
        if status < 100:
            self._reject(f"bad upstream status {status}")
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject(f"upstream answered HTTP/{version}")
        headers = Headers._from_parser(self._items, self._keys)
        if status < 200 and status != 101:
            # Bounded: each restarts the read timeout, and goes to a client that may not
            # read, so an origin that flooded 103s would fill the worker's memory, and one
            # that trickled 100s (passed on to nobody) would hold the client, without limit.
            self._interim += 32 + sum(len(n) + len(v) + 4 for n, v in self._items)
            if self._interim > self.limits.max_header_bytes:
                self._reject("interim (1xx) responses from upstream larger than "
                             "max_header_bytes in all")
            if status == 100:
                self._continues += 1
                if self._continues > MAX_CONTINUES:
                    self._reject(f"more than {MAX_CONTINUES} 100 Continue from upstream")
            self._events.append(InformationalResponse(status, headers))
            return
        method = self._method
        length: Optional[int] = None
        self._skip_body = self._tunnel = False
        if self._te is not None and (version == "1.0" or not _is_chunked(self._te)):
            self._reject("upstream Transfer-Encoding other than a single chunked")
        if self._cl is not None:
            length = int(self._cl)
        if status == 101 or status == 204 or status == 304:
            body = "none"
        elif method == b"HEAD":
            body = "none"
            self._skip_body = True
        elif method == b"CONNECT" and status < 300:
            body = "none"
            self._skip_body = self._tunnel = True
        elif self._te is not None:
            body = "chunked"
        elif length is not None:
            body = "length"
        else:
            body = "close"
        self._framing = body
        keep_alive = p.should_keep_alive() and body != "close" and status != 101
        self._keep_alive = keep_alive
        self._events.append(ResponseHead(status, self._reason, version, headers, keep_alive,
                                         body, length))
        if body != "none" or status == 101:
            self._state = _BODY
            return
        if self._skip_body:
            self._end_message()
            if self._tunnel:
                self.upgraded = True
                self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        status = self._status
        if status < 200 and status != 101:
            return  # 1xx: stay in _HEAD for the real response
        if status == 101 or self._state == _DONE:
            return
        self._end_message()

    def _end_message(self) -> None:
        self._state = _DONE
        trailers = self._trailers
        self._events.append(MessageEnd(
            Headers._from_parser(trailers, self._tkeys) if trailers is not None else None))


# -- serialisation ---------------------------------------------------------------------------
