"""Checks of the strings a configuration puts on the wire or into file names: header names
and values, request paths, route hosts, service names.

Each function returns what is wrong with its argument (a message for ``_Builder.fail``), or
None when it is fine. Standard library only: the engine's own checks (``pyngora.headers``)
run in the workers, too late for ``-t`` to name the file, line and key.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional

__all__ = ["header_name", "header_value", "request_path", "route_host", "route_prefix",
           "service_name", "MAX_NAME_BYTES"]

# RFC 9110 token: what a field name may be.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a field value may not hold: controls but HTAB (a CR or LF would split the field on
# the wire), DEL, and characters that are not one byte (values are sent latin-1).
_BAD_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]")
# What a request-target may not hold: it would end the request line's token or not be one
# byte on the wire (as pyngora.headers' set_uri).
_BAD_TARGET = re.compile("[\x00-\x20\x7f\u0100-\U0010ffff]")
# A service name goes into file names (a proxy's health table: "health-<12>-NAME.tbl" under
# NAME_MAX 255), socket keys (``service/address/slot``) and process titles.
MAX_NAME_BYTES = 128
_BAD_NAME = re.compile("[\x00-\x1f\x7f/]")


def header_name(name: Any) -> Optional[str]:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    return None


def header_value(value: Any) -> Optional[str]:
    if value is None:
        return "needs a value (write '' for an empty one)"
    if isinstance(value, (list, dict)):
        return f"expected a header value, got {type(value).__name__}"
    bad = _BAD_VALUE.search(str(value))
    if bad is not None:
        return (f"a header value cannot carry {bad.group()!r} (control characters, CR and "
                "LF included, and characters above U+00FF)")
    return None


def request_path(path: str) -> Optional[str]:
    """A path sent on a request line (health checks) or compared with one (metrics)."""
    if not path.startswith("/"):
        return f"must start with '/', got {path!r}"
    bad = _BAD_TARGET.search(path)
    if bad is not None:
        return (f"a request path cannot carry {bad.group()!r} (a space, a control character "
                "or one above U+00FF: percent-encode it)")
    return None


def route_prefix(prefix: str) -> Optional[str]:
    """A route's ``path_prefix``: every request path starts with '/' (empty: any path)."""
    if prefix and not prefix.startswith("/"):
        return f"must start with '/' (a request path always does), got {prefix!r}"
    return None


def route_host(host: str) -> Optional[str]:
    """A route's ``host``: matched against the request's Host without its port and final
    dot, lower-cased; IPv6 literals in brackets, as in a Host header."""
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return f"expected [V6] (an IPv6 address in brackets), got {host!r}"
        return None
    if ":" in host:
        return (f"the Host is matched without its port: write {host.partition(':')[0]!r}, "
                f"got {host!r}" if host.count(":") == 1
                else f"an IPv6 address is written in brackets, as in a Host: got {host!r}")
    if host.endswith("."):
        return f"the Host is matched without its final dot: write {host[:-1]!r}"
    if host == "*":
        return "'*' matches only a Host of '*': leave host out to match any"
    if not host.isascii():
        return (f"a request's Host is ASCII: write {host!r} in its punycode form"
                f" ({_punycode(host)!r})")
    if _BAD_TARGET.search(host) or "/" in host:  # ("" is no condition: any host)
        return f"{host!r} is no host name"
    return None


def _punycode(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return "xn--..."


def service_name(name: str) -> Optional[str]:
    if not name:
        return "must not be empty"
    if _BAD_NAME.search(name):
        return f"must not contain '/' or control characters, got {name!r}"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes long, got {size}"
    return None
