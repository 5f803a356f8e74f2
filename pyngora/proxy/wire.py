"""What the phase engine and the fast path both put on the wire: the upstream request's fields
and the reason phrase passed to the client. One place, so the two paths cannot drift apart.
"""
from __future__ import annotations

from typing import Optional

from pyngora.errors import Error, ErrorSource, ErrorType
from pyngora.headers import _TOKEN_CHARS, Headers
from pyngora.protocols.events import RequestHead
from pyngora.protocols.h1_wire import HOP_BY_HOP, remove_hop_by_hop, without_hop_by_hop
from pyngora.services.http_exchange import status_line
from pyngora.upstreams.peer import HttpPeer

__all__ = ["upstream_fields", "upstream_head", "reason_for", "informational_fields",
           "set_framing", "method_token", "check_target",
           "NOT_SENT_ON"]

_ALSO_DROP = frozenset((b"expect",))
# Every (lowercased) field name upstream_fields may drop: a head with none of them, and a
# Host, goes upstream as the client sent it (the fast path sends its raw bytes then).
NOT_SENT_ON = HOP_BY_HOP | _ALSO_DROP
_HOST = b"host"


def upstream_fields(client_fields: Headers, peer: HttpPeer) -> Headers:
    """The client's fields for the upstream request, in one pass: hop-by-hop ones and Expect
    dropped (100-continue is the downstream connection's business), Host added when the
    client sent none (an HTTP/1.0 client; HTTP/1.1 upstreams require one: nginx sends the
    upstream's address, as here)."""
    fields = without_hop_by_hop(client_fields, _ALSO_DROP)
    if _HOST not in fields._keys:  # the keys are lowercased
        fields.add(b"Host", b"localhost" if peer.unix_path else peer.address.encode("latin-1"))
    return fields


def informational_fields(headers: Headers) -> Headers:
    """A 1xx response's fields as the client gets them (edited in place): the hop-by-hop ones
    removed (RFC 9110 7.6.1), and no Content-Length (a 1xx has no content, 15.2)."""
    remove_hop_by_hop(headers)
    headers.remove(b"content-length")
    return headers


_CONNECTION = b"connection"
_CLOSE = b"close"
_CONNECTION_LINE = b"\r\nconnection:"
_PLAIN_CONNECTION = frozenset((b"close", b"keep-alive"))


def upstream_head(head: RequestHead) -> Optional[bytes]:
    """The upstream request head as the client's own bytes (``head.raw``), when they are what
    ``upstream_fields`` would give once serialised, or become it by cutting lines that say
    nothing but ``Connection: keep-alive`` or ``close`` (browsers send one with every request);
    None: serialise the fields instead (any other hop-by-hop field or ``Expect``)."""
    raw = head.raw
    if raw is None:
        return None
    headers = head.headers
    keys = headers._keys  # lowercased
    if NOT_SENT_ON.isdisjoint(keys):
        return raw
    if _CLOSE in keys:
        return None  # "Connection: close" also names a field called Close, which goes
    for key, (_, value) in zip(keys, headers._items):
        if key in NOT_SENT_ON and (key != _CONNECTION or value.lower() not in _PLAIN_CONNECTION):
            return None
    low = raw.lower()
    k = low.find(_CONNECTION_LINE)
    while k >= 0:
        e = low.find(b"\r\n", k + 2)
        raw = raw[:k] + raw[e:]
        low = low[:k] + low[e:]
        k = low.find(_CONNECTION_LINE, k)
    return raw


# (status, reason bytes) -> the reason to pass to write_head: None when it is the standard
# phrase (the connection then uses its cached status line), else the upstream's own.
_REASON_CACHE: dict[tuple[int, bytes], Optional[bytes]] = {}


def reason_for(status: int, reason: bytes) -> Optional[bytes]:
    """The reason phrase to send with ``status``: None for the standard one (cached lines)."""
    if not reason:
        return None
    key = (status, reason)
    try:
        return _REASON_CACHE[key]
    except KeyError:
        pass
    same = status_line(status) == status_line(status, reason)
    value = None if same else reason
    if len(_REASON_CACHE) < 256:
        _REASON_CACHE[key] = value
    return value


def set_framing(fields: Headers, head: RequestHead, chunked: bool) -> None:
    """Set the upstream request's framing fields from the parsed ``head``, whatever a phase
    did to them (chunked when the body is re-framed, as by a request_body_filter): a
    Content-Length that disagreed with the bytes sent would leave some on the pooled
    connection, read there as the next client's request."""
    fields.remove_names(_FRAMING)
    if chunked:
        fields.add(b"Transfer-Encoding", b"chunked")
    elif head.content_length is not None:  # a body, or an explicit 0 (an empty HTTP/2 POST)
        fields.add(b"Content-Length", b"%d" % head.content_length)


def method_token(method: str) -> bytes:
    """A method a phase set, as bytes; Error (500) unless it is an RFC 9110 token."""
    b = method.encode("latin-1") if method.isascii() else b""
    if not b or b.translate(None, _TOKEN_CHARS):
        raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                    f"invalid method set by a phase: {method!r}")
    return b


def check_target(target: bytes) -> None:
    """Error (500) unless ``target`` (set by a phase) stays one token on the request line:
    no space, CR, LF or other control byte (bytes above 0x7f pass, as from clients)."""
    if not target or target.translate(None, _VCHAR):
        raise Error(ErrorType.InternalError, ErrorSource.Internal, None,
                    f"invalid request target set by a phase: {target!r}")


_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_VCHAR = bytes(range(0x21, 0x7f)) + bytes(range(0x80, 0x100))
