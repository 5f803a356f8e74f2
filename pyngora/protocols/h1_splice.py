"""Whole plain responses, taken as bytes: the proxy's fast path forwards them as they came.

Most proxied responses are small, arrive in one read, and need one edit: the upstream's
``Connection: keep-alive`` removed. Parsing such a response into events, fields and a
``Headers`` object only to serialise the same bytes again is most of what a proxy spends on it
in Python (about 40 function calls). :func:`take_whole` recognises the plain case from the raw
bytes instead.

"Plain" is narrow on purpose, and anything else is declined (None, having changed nothing),
so the full ``ResponseParser`` handles it exactly as before: an HTTP/1.1 status line with a
final status that has a body (200-599 but 204 and 304), ``Content-Length`` framing and no
``Transfer-Encoding``, the head and the whole body in ``data`` with nothing after them, no
``TE``, ``Trailer``, ``Upgrade`` or ``Proxy-Connection`` field, ``Connection`` fields that
name nothing but ``keep-alive`` or ``close`` (and no field called ``Close``), a reason phrase,
and within the connection's limits. llhttp checks the head's
syntax (field names and values, a second ``Content-Length``) as it does for the full parser.

Judging a head costs a dozen byte scans and an llhttp pass (~5 us); an origin sends the same
head bytes again and again (nginx's change only with its one-second ``Date``), so the verdict
is kept per distinct head (bounded: heads up to 2 KiB, and the table is emptied when full) and
a repeated head costs one dictionary lookup. The verdict depends on the head's bytes and the limits alone.
"""
from __future__ import annotations

from typing import Optional, Union

import httptools

from pyngora.protocols.h1 import H1Limits
from pyngora.protocols.h1_wire import REASON_CHARS

__all__ = ["VIEW_ABOVE", "Whole", "take_whole"]

_HTTP11 = b"HTTP/1.1 "
_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_CL = b"\r\ncontent-length:"
_TE = b"\r\ntransfer-encoding:"
_CONNECTION = b"\r\nconnection:"
# Hop-by-hop fields cut from the head (Connection's tokens are checked first).
_CUT = (_CONNECTION, b"\r\nkeep-alive:")
# Hop-by-hop fields that make a response not plain (the full path handles them).
# Proxy-Connection too: llhttp reads its "close" as the end of the connection.
_DECLINE = (_TE, b"\r\nte:", b"\r\ntrailer:", b"\r\nupgrade:", b"\r\nproxy-connection:")
# A "close" token also names a field called Close, which the full path drops.
_CLOSE_FIELD = b"\r\nclose:"
_PLAIN_TOKENS = frozenset((b"keep-alive", b"close"))

# A judged head: (status, the head to send -- status line and fields less the hop-by-hop
# ones, and the blank line --, Content-Length, whether the upstream keeps the connection).
Verdict = tuple[int, bytes, int, bool]
# head bytes (up to the last field's CRLF) -> (max_header_bytes, max_headers, verdict or None)
_KNOWN: dict[bytes, tuple[int, int, Optional[Verdict]]] = {}
_KNOWN_MAX = 512
_KNOWN_BYTES = 2048  # longer heads are judged each time (what is kept stays ~1 MiB at most)
# Above this body length, the body is handed on as a view of the read, not copied: it goes out
# behind its head in one writev (``Exchange.write_whole``; measured, 64 KiB: 1.6 us of copying
# saved per response). Below it, a slice is cheaper than the view and the writev's bookkeeping.
VIEW_ABOVE = 4096


# A whole plain response, taken: (status, the head to send -- as in Verdict --, the body, whether
# the upstream keeps the connection alive). The body is bytes, or a memoryview of the read
# when longer than VIEW_ABOVE.
Whole = tuple[int, bytes, Union[bytes, memoryview], bool]


def take_whole(data: bytes, limits: H1Limits) -> Optional[Whole]:
    """``data`` is the first read of the response to a GET. When it is a whole plain
    response: a Whole, the head and body to send downstream. None: declined, ``data`` is for
    the full parser."""
    end = data.find(_END)
    if end < 0:
        return None
    head = data[:end + 2]  # the status line and every field line, each with its CRLF
    known = _KNOWN.get(head)
    if known is None or known[0] != limits.max_header_bytes or known[1] != limits.max_headers:
        verdict = _judge(head, limits)
        if len(head) <= _KNOWN_BYTES:
            if len(_KNOWN) >= _KNOWN_MAX:
                _KNOWN.clear()  # bounded: an origin inventing heads only costs re-judging
            _KNOWN[head] = (limits.max_header_bytes, limits.max_headers, verdict)
    else:
        verdict = known[2]
    if verdict is None or end + 4 + verdict[2] != len(data):
        return None  # not plain; or more to come, or bytes after it: the full parser's case
    status, out, length, keep_alive = verdict
    if length > VIEW_ABOVE:
        return status, out, memoryview(data)[end + 4:], keep_alive
    return status, out, data[end + 4:], keep_alive


def _judge(head: bytes, limits: H1Limits) -> Optional[Verdict]:
    """The verdict on one head (see the module doc)."""
    if not head.startswith(_HTTP11) or len(head) + 2 > limits.max_header_bytes:
        return None
    code = head[9:12]
    if not code.isdigit() or head[12:13] != b" " or head[13:15] == _CRLF:
        return None  # no reason phrase: the full path sends the standard one
    status = int(code)
    if status < 200 or status == 204 or status == 304:
        return None
    if head[13:head.find(_CRLF)].translate(None, REASON_CHARS):
        return None  # a reason phrase with control bytes: the full path sends the standard one
    low = head.lower()
    i = low.find(_CL)
    if i < 0:
        return None
    value = head[i + 17:low.find(_CRLF, i + 2)].strip(b" \t")
    if not value.isdigit():
        return None
    for name in _DECLINE:
        if name in low:
            return None
    if low.count(_CRLF) > limits.max_headers + 1 or head.count(b"\n") != low.count(_CRLF):
        return None  # too many fields, or a bare LF: the full parser gives its 502
    # HTTP/1.1 keeps the connection unless a Connection field says close.
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
    if not keep_alive and _CLOSE_FIELD in low:
        return None
    try:
        # A parser of its own: llhttp then waits for the body, and is dropped.
        httptools.HttpResponseParser(_NoCallbacks()).feed_data(head + _CRLF)
    except httptools.HttpParserError:
        return None  # malformed: the full parser says why (502)
    for name in _CUT:
        k = low.find(name)
        while k >= 0:
            e = low.find(_CRLF, k + 2)
            head = head[:k] + head[e:]
            low = low[:k] + low[e:]
            k = low.find(name, k)
    return status, head + _CRLF, int(value), keep_alive


class _NoCallbacks:
    """llhttp's callback target when only its verdict on the syntax matters."""

    __slots__ = ()
