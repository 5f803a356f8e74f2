"""The request line of a request refused before its head was whole, for its access line.

nginx logs such a request with the line as far as it came (garbage included); the parser
(``h1.RequestParser``) holds what llhttp passed of it. Read only on the refused path.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["refused_line", "REFUSED_LINE_MAX"]

# Bytes of a refused request's line kept for its access line (a 431 head can be 64 KiB).
REFUSED_LINE_MAX = 4096


def refused_line(parser: Any, data: Optional[bytes]) -> Optional[bytes]:
    """The request line of a request refused before its head was whole; None: nothing of it.

    ``data``: bytes that begin with the request (the read it was refused in, when it began
    there): their first line, raw, garbage included, as nginx logs it. Else what ``parser``
    (an ``h1.RequestParser``: its private parts, read here, in its own package) collected of the
    request under way: method and target once llhttp passed them, the version once a header
    followed. Cut at REFUSED_LINE_MAX bytes."""
    if data:
        # (llhttp skips empty lines before a request too; a read can be 256 KiB: cut first)
        data = data[:2 * REFUSED_LINE_MAX].lstrip(b"\r\n")[:REFUSED_LINE_MAX]
        end = len(data)
        for eol in (b"\r", b"\n"):
            i = data.find(eol, 0, end)
            if i >= 0:
                end = i
        return data[:end] or None
    url = getattr(parser, "_url", None)
    p = getattr(parser, "_p", None)
    # in_message: the parts are this request's (the last one's stay until the next begins)
    if not url or p is None or not getattr(parser, "in_message", False):
        return None
    line = p.get_method() + b" " + b"".join(url)
    if getattr(parser, "_items", None) or not getattr(parser, "_in_head", True):
        line += b" HTTP/" + p.get_http_version().encode("ascii")
    return line[:REFUSED_LINE_MAX]

