"""HTTP/2 header fields, sans-IO: a request's header list checked and translated into the
RequestHead an HTTP/1 request would give, trailers checked, response fields made HTTP/2-legal.

Used by ``protocols/h2.py`` (:class:`H2Server`) when a HEADERS frame arrives, and by the
asyncio edge (``services/h2_app.py``) for every response head and trailer section. No asyncio
and no connection state here (DESIGN's one-way doors): plain functions of field lists.

Decisions where the RFCs leave a choice (documented in the report and tests):

- Translation: ``:method``/``:path`` -> method/target, ``:authority`` -> Host, version "2",
  cookies joined; a body without Content-Length is ``body == "chunked"`` (UNKNOWN_LENGTH_BODY:
  length unknown, ends with MessageEnd, must be chunked when re-sent as HTTP/1).

- A malformed request (RFC 9113 8.1.1: bad or misplaced pseudo-headers, upper-case or invalid
  field names, control characters or surrounding whitespace in values, connection-specific fields, TE
  other than ``trailers``, pseudo-headers or Content-Length/Transfer-Encoding/Host in trailers)
  is a stream error: RST_STREAM PROTOCOL_ERROR. We validate ourselves (the h2 library's own
  validation turns every such error into a connection error and walks values byte by byte).
- A well-formed request that HTTP/1 would answer with 400 (no ``:authority`` nor Host,
  ``:authority`` and Host that disagree, a target with bytes outside visible ASCII, a method
  in lower case, Content-Length repeated even with one value) gets 400;
  CONNECT (and extended CONNECT) gets 501; Content-Length above ``max_body_bytes`` gets 413.
- Methods: those pyngora's HTTP/1 parser takes (:data:`HTTP1_METHODS`, llhttp's list); any
  other token (``FOO``, ``PRI``, ``G!T``) gets 400, as over HTTP/1, where it is refused
  before routing: an operator's "methods llhttp does not know get 400" must not have an
  HTTP/2 way round it to the origins. (nginx and Pingora forward any method, over both
  versions; should HTTP/1 ever do so, this set goes with it: a unit test compares them.)
"""
from __future__ import annotations

from typing import Iterable, Optional

from pyngora.headers import Headers
from pyngora.protocols.events import RequestHead
from pyngora.protocols.h1_wire import HOST_CHARS, serialize_request_head

__all__ = ["CONNECTION_SPECIFIC", "UNKNOWN_LENGTH_BODY", "HTTP1_METHODS", "Reject",
           "check_field", "translate_request", "check_trailers", "response_fields"]

# Fields that only mean something to one HTTP/1 hop: malformed in an HTTP/2 request (RFC 9113
# 8.2.2), and never sent in an HTTP/2 response.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"))
# Fields a trailer section must not carry (SPEC section 7).
_TRAILER_FORBIDDEN = frozenset((b"content-length", b"transfer-encoding", b"host", b"te",
                                b"trailer"))
# What a lower-case HTTP/2 field name may contain: translate(None, this) leaves the bad bytes.
_NAME_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
# Visible ASCII: anything else in :path is refused (as non-ASCII targets are over HTTP/1).
_PATH_CHARS = bytes(range(0x21, 0x7F))
_WS = (0x20, 0x09)
# Control characters a field value must not hold (RFC 9110 5.5; HTAB is allowed): HTTP/1
# requests with one get 400 from llhttp, so HTTP/2 ones may not carry one upstream either.
_CTL = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
# What a method may hold: an upper-case token, as llhttp's methods (HTTP/1 refuses the rest).
_METHOD_CHARS = _NAME_CHARS.upper()
# The methods pyngora's HTTP/1 parser (llhttp) takes, CONNECT aside (501 over both).
HTTP1_METHODS = frozenset(m.encode() for m in (
    "DELETE GET HEAD POST PUT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH "
    "UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE "
    "UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY").split())
_PSEUDO_REQUEST = frozenset((b":method", b":scheme", b":authority", b":path"))
# ``RequestHead.body`` for a request body without Content-Length (its end is END_STREAM).
# "chunked" tells every consumer what it must know: the length is unknown, the body ends
# with MessageEnd, and re-serialised as HTTP/1 it must be chunked (the proxy engine does so
# for "chunked" only: "stream" would reach the origin unframed, a request-smuggling hazard).
UNKNOWN_LENGTH_BODY = "chunked"

# Header lists judged before (clients repeat theirs, and the HPACK decoder hands the same field
# objects back for a repeated block): (fields, end_stream, max_body_bytes) -> what
# ``translate_request`` made of them, with the positions of the fields kept, so that a repeat
# skips the checks and keeps its own field objects. Bounded as h1_splice's table.
_Judged = tuple[bytes, bytes, bytes, tuple[int, ...], Optional[bytes], tuple[bytes, ...], str,
                Optional[int], bool, Optional[bytes]]
_JUDGED: dict[tuple, _Judged] = {}
_JUDGED_MAX = 512
_JUDGED_BYTES = 2048  # larger lists (all their fields) are judged each time


class Reject(Exception):
    """A request (or trailer section) the adapter refuses itself: ``status`` 0 means
    malformed (reset the stream with PROTOCOL_ERROR), else the status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # 0 = malformed: RST_STREAM PROTOCOL_ERROR
        self.reason = reason


def check_field(name: bytes, value: bytes) -> None:
    """A regular field of a request or trailer section (RFC 9113 8.2.1); Reject(0) if bad."""
    if not name or name.translate(None, _NAME_CHARS):
        raise Reject(0, f"invalid field name {name!r}")
    if value:
        if len(value.translate(None, _CTL)) != len(value):
            raise Reject(0, f"a control character in the value of {name!r}")
        if value[0] in _WS or value[-1] in _WS:
            raise Reject(0, f"whitespace around the value of {name!r}")


def translate_request(fields: Iterable[tuple[bytes, bytes]], stream_id: int,
                      end_stream: bool, max_body_bytes: Optional[int] = None) -> RequestHead:
    """An HTTP/2 request header list -> the RequestHead an HTTP/1 request would give.

    ``:method`` -> method, ``:path`` -> target, ``:authority`` -> Host (first field), version
    "2", body "none" (END_STREAM on HEADERS), "length" (Content-Length) or
    UNKNOWN_LENGTH_BODY ("chunked": see there). Cookie
    fields are joined with "; " (RFC 9113 8.2.3). A body-less request gets ``raw``: the
    HTTP/1.1 head it makes, as the HTTP/1 parser gives for a request read whole (the proxy's
    fast path sends it upstream when no field must go). Raises Reject: status 0 for a
    malformed request (reset the stream), else the status to answer."""
    key = None
    if fields.__class__ is list and len(fields) <= 64:
        key = (tuple(fields), end_stream, max_body_bytes)
        judged = _JUDGED.get(key)
        if judged is not None:
            method, path, host, keep, cookie, keys, body, length, expect, raw = judged
            items = [(b"host", host)]
            items += [fields[i] for i in keep]  # (this request's own field objects)
            if cookie is not None:
                items.append((b"cookie", cookie))
            head = RequestHead(method, path, "2", Headers._from_parser(items, list(keys)),
                               True, body, length, expect, False, stream_id)
            head.raw = raw
            return head
    head, keep = _translate(fields, stream_id, end_stream, max_body_bytes)
    if key is not None:
        items = head.headers._items
        # (the key holds every field, the path twice more with raw: all of them count)
        if sum(len(n) + len(v) for n, v in key[0]) <= _JUDGED_BYTES:
            cookie = items[-1][1] if head.headers._keys[-1] == b"cookie" and \
                len(keep) + 1 < len(items) else None
            raw = None
            if head.body == "none":
                raw = head.raw = serialize_request_head(head.method, head.target, head.headers)
            if len(_JUDGED) >= _JUDGED_MAX:
                _JUDGED.clear()
            _JUDGED[key] = (head.method, head.target, items[0][1], keep, cookie,
                            tuple(head.headers._keys), head.body, head.content_length,
                            head.expect_continue, raw)
    return head


def _translate(fields: Iterable[tuple[bytes, bytes]], stream_id: int, end_stream: bool,
               max_body_bytes: Optional[int]) -> tuple[RequestHead, tuple[int, ...]]:
    """translate_request's checks and translation; also the positions of the fields kept."""
    method = path = authority = None
    scheme = False
    regular = False
    items: list[tuple[bytes, bytes]] = []
    keys: list[bytes] = []
    kept: list[int] = []
    cookies: list[bytes] = []
    hosts: list[bytes] = []
    expect = False
    for i, field in enumerate(fields):
        name, value = field
        if name[:1] == b":":
            if regular:
                raise Reject(0, "pseudo-header after a regular field")
            if name not in _PSEUDO_REQUEST:
                if name == b":protocol":
                    raise Reject(501, "extended CONNECT is not supported")
                raise Reject(0, f"unknown pseudo-header {name!r}")
            if b"\r" in value or b"\n" in value or b"\0" in value:
                raise Reject(0, f"CR, LF or NUL in {name!r}")
            if name == b":method":
                if method is not None:
                    raise Reject(0, "duplicate :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise Reject(0, "duplicate :path")
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise Reject(0, "duplicate :authority")
                authority = value
            else:
                if scheme:
                    raise Reject(0, "duplicate :scheme")
                scheme = True
            continue
        regular = True
        check_field(name, value)
        if name in CONNECTION_SPECIFIC:
            raise Reject(0, f"connection-specific field {name!r}")
        if name == b"te":
            if value.lower() != b"trailers":
                raise Reject(0, "TE other than trailers")
        elif name == b"cookie":
            cookies.append(value)
            continue
        elif name == b"host":
            hosts.append(value)
            continue
        elif name == b"expect":
            expect = value.lower() == b"100-continue"
        items.append(field)
        keys.append(name)
        kept.append(i)
    if not method or method.translate(None, _NAME_CHARS.upper() + _NAME_CHARS):
        raise Reject(0, "missing or invalid :method")
    if method.translate(None, _METHOD_CHARS):
        raise Reject(400, "a method in lower case")  # as over HTTP/1: "get" is no GET
    if method not in HTTP1_METHODS:
        if method == b"CONNECT":
            raise Reject(501, "CONNECT is not supported over HTTP/2")
        raise Reject(400, "a method HTTP/1 does not take")  # (see the module docstring)
    if not scheme or not path:
        raise Reject(0, "missing :scheme or :path")
    if path.translate(None, _PATH_CHARS):
        raise Reject(400, "invalid character in :path")
    if b"#" in path:  # as over HTTP/1: a fragment is no part of a request target
        raise Reject(400, "a fragment in :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise Reject(400, "request target is not origin-form")
    if len(hosts) > 1:
        raise Reject(400, "duplicate Host")
    if authority is not None:
        # As HTTP/1 checks a Host (RFC 3986 host and port: no "/", ",", "@" or space): it
        # is routed on, and the origin's Host
        if not authority or authority.translate(None, HOST_CHARS):
            raise Reject(400, "invalid :authority")
        if hosts and hosts[0].lower() != authority.lower():
            raise Reject(400, ":authority and Host disagree")
        host = authority
    elif hosts:
        host = hosts[0]
        if host.translate(None, HOST_CHARS):
            raise Reject(400, "invalid Host")
    else:
        raise Reject(400, "no :authority and no Host")
    items.insert(0, (b"host", host))
    keys.insert(0, b"host")
    if cookies:
        items.append((b"cookie", b"; ".join(cookies)))
        keys.append(b"cookie")
    content_length: Optional[int] = None
    if b"content-length" in keys:
        # Repeats, even equal, are refused as HTTP/1 refuses them (an origin may read them
        # otherwise); a value other than plain digits is malformed (RFC 9110 8.6: "-1",
        # "+5" or "5_0" would each be read differently by someone downstream).
        if keys.count(b"content-length") > 1:
            raise Reject(400, "duplicate Content-Length")
        value = items[keys.index(b"content-length")][1]
        if not value.isdigit() or len(value) > 18:
            raise Reject(0, "invalid content-length")
        content_length = int(value)
        if end_stream and content_length:
            # RFC 9113 8.1.1: the DATA (none) must add up to it. ``H2Server`` checks DATA
            # frames only; sent on as it stands, the origin would read the next request on
            # the pooled connection as this one's body.
            raise Reject(0, "content-length on a request that ended with its headers")
        if max_body_bytes is not None and content_length > max_body_bytes:
            raise Reject(413, "Content-Length above max_body_bytes")
    if end_stream:
        body = "none"
    elif content_length is not None:
        body = "length"
    else:
        body = UNKNOWN_LENGTH_BODY
    return (RequestHead(method, path, "2", Headers._from_parser(items, keys), True, body,
                        content_length, expect and body != "none", False, stream_id),
            tuple(kept))


def check_trailers(fields: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A trailer section -> Headers; raises Reject(0) when it is malformed (pseudo-headers,
    invalid fields, or fields a trailer section must not carry)."""
    items: list[tuple[bytes, bytes]] = []
    keys: list[bytes] = []
    for name, value in fields:
        if name[:1] == b":":
            raise Reject(0, "pseudo-header in trailers")
        check_field(name, value)
        if name in CONNECTION_SPECIFIC or name in _TRAILER_FORBIDDEN:
            raise Reject(0, f"{name!r} in trailers")
        items.append((name, value))
        keys.append(name)
    return Headers._from_parser(items, keys)


def response_fields(headers: Iterable[tuple[bytes, bytes]], drop_length: bool = False
                    ) -> list[tuple[bytes, bytes]]:
    """HTTP/1-style response fields -> HTTP/2 ones: names lower-cased, connection-specific
    fields (and ``Content-Length`` when ``drop_length``) left out. Repeats of one
    Content-Length are sent once; differing ones (a filter added one) not at all: a client
    fails the stream on them (RFC 9113 8.1.1)."""
    out = []
    lengths = 0
    for name, value in headers:
        lname = name.lower()
        if lname in CONNECTION_SPECIFIC:
            continue
        if lname == b"content-length":
            if drop_length:
                continue
            lengths += 1
        out.append((lname, value))
    if lengths > 1:
        values = {v.strip(b" \t") for n, v in out if n == b"content-length"}
        out = [f for f in out if f[0] != b"content-length"]
        if len(values) == 1:
            out.append((b"content-length", values.pop()))
    return out
