"""Access log lines: nginx's ``combined`` format, or one JSON object per line.

Called by the engine after ``logging``, only when ``log.access_enabled()`` (so nothing is
formatted when the access log is off). The line goes to ``log.ACCESS``.

combined (nginx's, plus the request time and the upstream, as many operators add)::

    127.0.0.1 - - [27/Nov/2026:03:25:09 +0000] "GET / HTTP/1.1" 200 5 "-" "curl/8.5.0" 0.001 "127.0.0.1:6189"

json: ``{"time", "remote_addr", "method", "uri", "protocol", "status", "body_bytes_sent",
"request_bytes", "request_time", "referer", "user_agent", "host", "upstream",
"upstream_status", "retries", "error", "service"}``.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Optional

from pyngora.services.http_exchange import request_clock

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.errors import Error
    from pyngora.proxy.session import Session

__all__ = ["format_line", "format_combined", "format_json"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_time_cache: list[Any] = [-1, ""]


def _time_local(now: float) -> str:
    """``27/Nov/2026:03:25:09 +0000`` (UTC), cached per second."""
    sec = int(now)
    if _time_cache[0] != sec:
        t = time.gmtime(sec)
        _time_cache[0] = sec
        _time_cache[1] = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                          f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
    return _time_cache[1]


def _quote(value: Optional[bytes]) -> str:
    """A header value or target for a quoted combined field: '-' when absent; ``"`` and
    ``\\`` backslash-escaped, and every byte outside printable ASCII as ``\\xHH`` (nginx's
    way), so the line stays one line of ASCII whatever the client sent. Bytes >= 0x80 (which
    HTTP/2 lets through in field values) used to be written as the Latin-1 characters they
    are not (``\\xff`` became ``ÿ``), while ``\\x80``-``\\x9f`` were escaped: now all are."""
    if not value:
        return "-"
    text = value.decode("latin-1")
    if value.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    # unicode_escape doubles a backslash, writes tab, LF and CR as backslash-t/n/r, and every
    # other byte outside printable ASCII (Latin-1's 0x7f-0xff included) as backslash-xHH.
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _fields(session: "Session") -> tuple[str, str, str, int, int, float]:
    ex = session.exchange
    head = ex.head
    addr = session.client_addr
    remote = addr[0] if isinstance(addr, tuple) and addr else (addr or "-")
    status = ex.status
    duration = max(request_clock() - ex.start_time, 0.0)
    request = (f"{head.method.decode('latin-1')} {_quote(head.target)} "
               f"HTTP/{head.version}")
    return remote, request, _time_local(time.time()), status, ex.resp_bytes, duration


def format_combined(session: "Session", err: Optional["Error"] = None) -> str:
    remote, request, when, status, sent, duration = _fields(session)
    h = session.exchange.head.headers
    peer = session.peer
    upstream = peer.address if peer is not None else "-"
    return (f'{remote} - - [{when}] "{request}" {status} {sent} '
            f'"{_quote(h.get(b"referer"))}" "{_quote(h.get(b"user-agent"))}" '
            f'{duration:.3f} "{upstream}"')


def format_json(session: "Session", err: Optional["Error"] = None) -> str:
    ex = session.exchange
    head = ex.head
    h = head.headers
    remote, _, _, status, sent, duration = _fields(session)
    peer = session.peer

    def txt(v: Optional[bytes]) -> Optional[str]:
        return v.decode("latin-1") if v is not None else None

    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "remote_addr": remote,
        "method": head.method.decode("latin-1"),
        "uri": head.target.decode("latin-1"),
        "protocol": f"HTTP/{head.version}",
        "status": status,
        "body_bytes_sent": sent,
        "request_bytes": ex.req_bytes,
        "request_time": round(duration, 6),
        "referer": txt(h.get(b"referer")),
        "user_agent": txt(h.get(b"user-agent")),
        "host": txt(h.get(b"host")),
        "upstream": peer.address if peer is not None else None,
        "upstream_status": session.upstream_status or None,
        "retries": session.retries,
        "error": str(err) if err is not None else None,
        "service": session.service,
    }, separators=(",", ":"))


def format_line(session: "Session", err: Optional["Error"] = None,
                fmt: str = "combined") -> str:
    """The access log line of a finished request in ``fmt`` ("combined" or "json")."""
    if fmt == "json":
        return format_json(session, err)
    return format_combined(session, err)
