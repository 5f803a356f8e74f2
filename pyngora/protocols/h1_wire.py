"""HTTP/1.x on the wire: serialising heads and chunks, hop-by-hop fields, origin-form.

Split from h1.py (the parsers); ``pyngora.protocols.h1`` re-exports every name.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Optional

from pyngora.headers import Headers

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}


def _bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def serialize_request_head(method: bytes, target: bytes, headers: Headers,
                           version: bytes = b"1.1") -> bytes:
    """The wire form of a request head: request line, fields, blank line."""
    return (_bytes(method) + b" " + _bytes(target) + b" HTTP/" + _bytes(version) + b"\r\n"
            + headers.serialize() + b"\r\n")


def serialize_response_head(status: int, reason: Optional[bytes], headers: Headers,
                            version: bytes = b"1.1") -> bytes:
    """The wire form of a response head; ``reason`` None = the standard phrase for ``status``."""
    version = _bytes(version)
    if reason is None:
        line = _STATUS_LINES.get((version, status))
        if line is None:
            line = b"HTTP/%b %d %b\r\n" % (version, status, _REASONS.get(status, b"Unknown"))
            if len(_STATUS_LINES) < 4096:
                _STATUS_LINES[(version, status)] = line
    else:
        line = b"HTTP/%b %d %b\r\n" % (version, status, _bytes(reason))
    return line + headers.serialize() + b"\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data gives b"" (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Optional[Headers] = None) -> bytes:
    """The last chunk, with ``trailers`` if any: ends a chunked body."""
    if trailers:
        return b"0\r\n" + trailers.serialize() + b"\r\n"
    return b"0\r\n\r\n"


def origin_form(target: bytes) -> bytes:
    """The origin-form (path and query) of a request-target, for the request sent upstream.

    An absolute-form target (``http://host/p?q``) gives ``/p?q`` (``/`` when it has no path);
    origin-form, ``*`` and authority-form come back unchanged.
    """
    if not target or target[0] == 47 or target == b"*":
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        return target  # authority-form (CONNECT)
    for i, ch in enumerate(rest):
        if ch == 47 or ch == 63:  # "/" or "?"
            path = rest[i:]
            return path if ch == 47 else b"/" + path
    return b"/"


# HTTP2-Settings belongs to the connection it asks to upgrade (RFC 7540 3.2.1), whether or
# not Connection names it: an origin that got it could answer 101 and speak HTTP/2 with the
# client past every check of this proxy ("h2c smuggling").
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"http2-settings"))
# What a Host value may hold (RFC 3986 host [":" port], IP-literals included; no "," or "@"),
# over HTTP/1 and HTTP/2 alike; translate() deleting these leaves the offending bytes: one C
# call, no regex.
HOST_CHARS = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              b"-._~!$&'()*+;=:%[]")
# What a reason phrase may hold (RFC 9112 4: HTAB, SP, VCHAR, obs-text): an origin's other
# bytes (NUL, ESC, ...) are not passed on to clients, whose terminals and logs show them.
REASON_CHARS = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_CONNECTION = b"connection"
# Common Connection values (lowercased) -> every field name they make hop-by-hop, prebuilt so
# that the request path copies no set for them.
_KNOWN_CONNECTION: dict[bytes, frozenset[bytes]] = {
    b"keep-alive": HOP_BY_HOP, b"upgrade": HOP_BY_HOP, b"te": HOP_BY_HOP,
    b"close": HOP_BY_HOP | {b"close"}}


def _hop_names(headers: Headers) -> "frozenset[bytes] | set[bytes]":
    """The lowercased names that are hop-by-hop in ``headers``: HOP_BY_HOP plus what the
    Connection fields name (the shared frozenset when they name nothing new: no copy)."""
    keys = headers._keys  # already lowercased
    names: "frozenset[bytes] | set[bytes]" = HOP_BY_HOP
    if _CONNECTION in keys:
        items = headers._items
        for i, key in enumerate(keys):
            if key != _CONNECTION:
                continue
            value = items[i][1]
            known = _KNOWN_CONNECTION.get(value.lower())
            if known is not None:
                if not known <= names:
                    names = names | known
                continue
            for token in value.split(b","):
                token = token.strip(b" \t").lower()
                if token and token not in names:
                    if not isinstance(names, set):
                        names = set(names)
                    names.add(token)
    return names


def remove_hop_by_hop(headers: Headers) -> None:
    """Remove hop-by-hop fields (RFC 9110 7.6.1) and every field named in Connection.

    Runs on each proxied response head, so the common cases are cheap: no hop-by-hop field
    at all (one set test), and Connection naming only standard tokens such as ``keep-alive``
    or ``close`` (a prebuilt frozenset, no copy).
    """
    if HOP_BY_HOP.isdisjoint(headers._keys):
        return
    headers.remove_names(_hop_names(headers))


def without_hop_by_hop(headers: Headers, also: "frozenset[bytes]" = frozenset()) -> Headers:
    """A copy of ``headers`` without hop-by-hop fields and without the (lowercased) names in
    ``also``, made in one pass: the upstream request head of a proxied request."""
    keys = headers._keys
    if HOP_BY_HOP.isdisjoint(keys):
        if also.isdisjoint(keys):
            return headers.copy()
        names: "frozenset[bytes] | set[bytes]" = also
    else:
        names = _hop_names(headers)
        if also:
            names = names | also
    items = headers._items
    new_keys: list[bytes] = []
    new_items: list[tuple[bytes, bytes]] = []
    for i, key in enumerate(keys):
        if key not in names:
            new_keys.append(key)
            new_items.append(items[i])
    return Headers._from_parser(new_items, new_keys)
