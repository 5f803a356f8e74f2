"""The path a route's ``path_prefix`` is matched against: the request's, normalised.

A route that sends ``/admin`` to a protected upstream must also get ``//admin``, ``/./admin``,
``/%61dmin`` and ``/public/../admin``: the origin behind the other route would resolve them to
``/admin`` (most frameworks do) and serve what the route was meant to keep away. So, as nginx
does for ``location``: the query is left out, ``%XX`` is decoded once (``%2F`` included),
dot-segments are resolved (RFC 3986 5.2.4, never above the root) and runs of ``/`` merged.
The request still goes upstream with the client's own target; only the choice of route
uses this form.
"""
from __future__ import annotations

from urllib.parse import unquote

__all__ = ["route_path"]

_CACHE: dict[str, str] = {}
_CACHE_MAX = 1024


def route_path(target: str) -> str:
    """``target``'s path as routes see it (see the module doc); an ordinary path, without
    ``%``, ``//`` or ``/.``, is returned as it is after three substring checks."""
    path = target.partition("?")[0]
    if "%" not in path and "//" not in path and "/." not in path:
        return path
    normal = _CACHE.get(path)
    if normal is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()  # bounded: a client inventing paths only costs normalising them
        normal = _CACHE[path] = _normalise(path)
    return normal


def _normalise(path: str) -> str:
    decoded = unquote(path, encoding="latin-1")  # one byte, one character: nothing merges
    segments: list[str] = []
    for seg in decoded.split("/"):
        if seg == "..":
            if segments:
                segments.pop()
        elif seg and seg != ".":
            segments.append(seg)
    normal = "/" + "/".join(segments)
    last = decoded.rsplit("/", 1)[-1]
    if segments and (decoded.endswith("/") or last in (".", "..")):
        normal += "/"  # "/admin/." is the directory "/admin/"
    return normal
