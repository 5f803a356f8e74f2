"""Request-targets that are not origin-form (RFC 9112 3.2): ``*``, authority-form and
absolute-form, checked once per such request by ``h1.RequestParser`` (sans-IO, no regex)."""
from __future__ import annotations

from typing import Optional

__all__ = ["target_authority"]


def _default_port(scheme: bytes) -> bytes:
    return b":443" if scheme == b"https" else b":80"


def target_authority(method: bytes, target: bytes, host: Optional[bytes]) -> Optional[bytes]:
    """The authority of an absolute-form ``target`` as given (None for ``*`` and for
    authority-form), for a request whose Host field is ``host`` (None when it has none).

    Raises ValueError(reason) for a target the request must get 400 for: ``*`` but not
    OPTIONS, a CONNECT target that is not exactly host:port, a scheme other than http(s),
    userinfo or a fragment, or an authority that disagrees with Host (a default port on
    either side does not count as a difference)."""
    if target == b"*":
        if method != b"OPTIONS":
            raise ValueError("'*' target is only for OPTIONS")
        return None
    if method == b"CONNECT":
        # authority-form = host ":" port, nothing else (RFC 9112 3.2.3)
        name, sep, port = target.rpartition(b":")
        if (not sep or not name or not port.isdigit() or b"/" in target
                or b"@" in target or b"?" in target or b"#" in target):
            raise ValueError("bad authority-form target")
        return None
    scheme, sep, rest = target.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"https"):
        raise ValueError("bad request-target")
    end = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    given = rest[:end]
    authority = given.lower()
    if not authority or b"@" in authority or b"#" in rest:
        raise ValueError("bad absolute-form target")
    if host is None:
        return given
    host = host.lower()
    if authority != host:
        port = _default_port(scheme)
        if authority.removesuffix(port) != host.removesuffix(port):
            raise ValueError("absolute-form target disagrees with Host")
    return given
