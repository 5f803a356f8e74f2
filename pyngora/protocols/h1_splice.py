"""Whole plain responses, taken as bytes: the proxy's fast path forwards them as they came.

Most proxied responses are small, arrive in one read, and need one edit: the upstream's
``Connection: keep-alive`` removed. Parsing such a response into events, fields and a
``Headers`` object only to serialise the same bytes again is most of what a proxy spends on it
in Python (about 40 function calls). :class:`WholeResponses` recognises the plain case from the
raw bytes instead, with C-level byte operations and one llhttp pass that has a single
callback, and cuts the hop-by-hop fields out of the head in place.

"Plain" is narrow on purpose, and anything else is declined (``take`` returns None, having
changed nothing the caller can see), so the full ``ResponseParser`` handles it exactly as
before: an HTTP/1.1 status line with a final status that has a body (200-599 but 204 and
304), ``Content-Length`` framing and no ``Transfer-Encoding``, the head and the whole body
in ``data`` with nothing after them, no ``TE``, ``Trailer`` or ``Upgrade`` field, and
``Connection`` fields that name nothing but ``keep-alive`` or ``close``. llhttp checks the
rest (field syntax, a second ``Content-Length``) as it does for the full parser.
"""
from __future__ import annotations

from typing import Optional

import httptools

from pyngora.protocols.h1 import H1Limits

__all__ = ["WholeResponses"]

_HTTP11 = b"HTTP/1.1 "
_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_CL = b"\r\ncontent-length:"
_TE = b"\r\ntransfer-encoding:"
_CONNECTION = b"\r\nconnection:"
# Hop-by-hop fields cut from the head (Connection's tokens are checked first).
_CUT = (_CONNECTION, b"\r\nkeep-alive:", b"\r\nproxy-connection:")
# Hop-by-hop fields that make a response not plain (the full path handles them).
_DECLINE = (_TE, b"\r\nte:", b"\r\ntrailer:", b"\r\nupgrade:")
_PLAIN_TOKENS = frozenset((b"keep-alive", b"close"))


class _Ended:
    """llhttp's only callback target: no reference back to the parser (no cycle)."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = False

    def on_message_complete(self) -> None:
        self.ended = True


class WholeResponses:
    """One per upstream connection, beside its ResponseParser; keeps an llhttp parser across
    the responses it takes (a declined response that llhttp saw part of gets a fresh one)."""

    __slots__ = ("_max_head", "_max_fields", "_p", "_ended")

    def __init__(self, limits: H1Limits) -> None:
        self._max_head = limits.max_header_bytes
        self._max_fields = limits.max_headers
        self._ended = _Ended()
        self._p = httptools.HttpResponseParser(self._ended)

    def take(self, data: bytes) -> Optional[tuple[int, bytes, int, bool]]:
        """``data`` is the first read of the response to a GET. When it is a whole plain
        response: (status, the bytes to send downstream, body length, whether the upstream
        keeps the connection alive). None: declined, ``data`` is for the full parser."""
        if not data.startswith(_HTTP11):
            return None
        end = data.find(_END)
        if end < 0 or end + 4 > self._max_head:
            return None
        code = data[9:12]
        if not code.isdigit() or data[12:13] not in (b" ", b"\r"):
            return None
        status = int(code)
        if status < 200 or status == 204 or status == 304:
            return None
        head = data[:end + 2]  # the status line and every field line, each with its CRLF
        low = head.lower()
        i = low.find(_CL)
        if i < 0:
            return None
        j = low.find(_CRLF, i + 2)
        value = head[i + 17:j].strip(b" \t")
        if not value.isdigit():
            return None
        length = int(value)
        if end + 4 + length != len(data):
            return None  # more to come, or bytes after the response: the full parser's case
        for name in _DECLINE:
            if name in low:
                return None
        if low.count(_CRLF) > self._max_fields + 1 or head.count(b"\n") != low.count(_CRLF):
            return None  # too many fields, or a bare LF: the full parser gives its 502
        # HTTP/1.1 keeps the connection unless a Connection field says close (llhttp's own
        # answer is gone once the message completes).
        keep_alive = True
        k = low.find(_CONNECTION)
        while k >= 0:
            e = low.find(_CRLF, k + 2)
            for token in low[k + 13:e].split(b","):
                token = token.strip(b" \t")
                if token not in _PLAIN_TOKENS:
                    return None  # names other fields as hop-by-hop
                if token == b"close":
                    keep_alive = False
            k = low.find(_CONNECTION, e)
        ended = self._ended
        ended.ended = False
        p = self._p
        try:
            p.feed_data(data)
        except httptools.HttpParserError:
            self._p = httptools.HttpResponseParser(ended)
            return None  # malformed: the full parser says why (502)
        if not ended.ended:  # cannot happen with the length checked above; stay safe
            self._p = httptools.HttpResponseParser(ended)
            return None
        if not keep_alive:
            self._p = httptools.HttpResponseParser(ended)  # llhttp stops after a close
        for name in _CUT:
            k = low.find(name)
            while k >= 0:
                e = low.find(_CRLF, k + 2)
                data = data[:k] + data[e:]
                low = low[:k] + low[e:]
                k = low.find(name, k)
        return status, data, length, keep_alive
