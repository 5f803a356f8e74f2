"""Access log lines: nginx's ``combined`` format, or one JSON object per line.

Called by the engine after ``logging``, only when ``log.access_enabled()`` (so nothing is
formatted when the access log is off). The line goes to ``log.ACCESS``.

combined (nginx's, plus the request time and the upstream, as many operators add)::

    127.0.0.1 - - [27/Nov/2026:03:25:09 +0000] "GET / HTTP/1.1" 200 5 "-" "curl/8.5.0" 0.001 "127.0.0.1:6189"

json: ``{"time", "remote_addr", "method", "uri", "protocol", "status", "body_bytes_sent",
"request_bytes", "request_time", "referer", "user_agent", "host", "upstream",
"upstream_status", "retries", "error", "service"}``.

A request the connection refused before any phase ran (a malformed head, a 408, an HTTP/2
stream refused for its headers) gets a line too, from :func:`log_refused` (the engine's
``log_refused``, called by the connection through ``services.base.report_refused``): the same
format, ``-`` (null in JSON) where nothing is known, the request line as far as it was read.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.services.base import RefusedRequest
from pyngora.services.http_exchange import request_clock

if TYPE_CHECKING:  # pragma: no cover
    from pyngora.errors import Error
    from pyngora.proxy.session import Session

__all__ = ["format_line", "format_combined", "format_json", "format_refused", "log_refused"]

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


def _remote(addr: Any) -> str:
    return addr[0] if isinstance(addr, tuple) and addr else (addr or "-")


def format_refused(refused: RefusedRequest, fmt: str = "combined", service: str = "") -> str:
    """The access line of a request refused before any phase ran, in ``fmt``: no body was
    sent, no upstream or header is known. In JSON, a line of the form ``METHOD target
    [HTTP/x]`` gives method, uri and protocol; any other (garbage) is the uri, method null."""
    line = refused.line
    if fmt != "json":
        return (f'{_remote(refused.client_addr)} - - [{_time_local(time.time())}] '
                f'"{_quote(line)}" {refused.status} 0 "-" "-" {refused.duration:.3f} "-"')
    method = uri = protocol = None
    if line:
        parts = line.split(b" ")
        if len(parts) == 2 or (len(parts) == 3 and parts[2].startswith(b"HTTP/")):
            method, uri = parts[0].decode("latin-1"), parts[1].decode("latin-1")
            protocol = parts[2].decode("latin-1") if len(parts) == 3 else None
        else:
            uri = line.decode("latin-1")
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "remote_addr": _remote(refused.client_addr),
        "method": method,
        "uri": uri,
        "protocol": refused.protocol or protocol,
        "status": refused.status,
        "body_bytes_sent": 0,
        "request_bytes": 0,
        "request_time": round(refused.duration, 6),
        "referer": None,
        "user_agent": None,
        "host": None,
        "upstream": None,
        "upstream_status": None,
        "retries": 0,
        "error": refused.reason or None,
        "service": service,
    }, separators=(",", ":"))


def log_refused(engine: Any, refused: RefusedRequest) -> None:
    """``ProxyEngine.log_refused``: writes the access line of ``refused`` in the engine's
    format. Runs only on the refused path, and only while the access log is on."""
    log.ACCESS.info(format_refused(refused, engine.access_format, engine.service))
