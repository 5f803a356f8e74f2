"""Backends: one upstream server (`Backend`) and the discovered set of them (`Backends`).

Pingora's `pingora-load-balancing::Backend` / `Backends`. A `Backend` is an immutable value
(address, weight, free-form `ext`), hashable on (addr, weight) so it can live in sets and be a
dict key; `ext` carries per-backend extras (TLS, SNI, verify) and takes no part in equality, as in
Pingora. `Backends` owns a discovery object and keeps the last set it returned.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union

log = logging.getLogger("pyngora.lb")

__all__ = ["Backend", "Backends", "Discovery", "parse_addr", "as_backend"]


def parse_addr(addr: str) -> tuple[str, int, str]:
    """Split ``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path`` into (host, port, canonical addr).

    Called when a Backend is built. The canonical form brackets IPv6 literals, so
    ``::1`` with port 80 always reads ``[::1]:80``. A Unix socket has port 0 and host = path.
    Raises ValueError on anything else.
    """
    addr = addr.strip()
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {addr!r}")
        return path, 0, "unix:" + path
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or addr[end + 1:end + 2] != ":":
            raise ValueError(f"bad IPv6 address {addr!r}: expected [V6]:PORT")
        host, port_s = addr[1:end], addr[end + 2:]
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {addr!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"bad address {addr!r}: IPv6 literals need brackets, [V6]:PORT")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in {addr!r}")
    port = int(port_s)
    canon = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, canon


class Backend:
    """One upstream server. Built at config load or by discovery; never mutated afterwards.

    ``addr`` is canonical (``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path``); ``host``/``port`` are
    its parts; ``weight`` (>= 1) scales its share in every selection algorithm; ``ext`` is the
    user's (Pingora's Extensions) and is ignored by ``==`` and ``hash``.
    """

    __slots__ = ("addr", "host", "port", "weight", "ext", "_hash")

    addr: str
    host: str
    port: int
    weight: int
    ext: dict[str, Any]

    def __init__(self, addr: str, weight: int = 1, ext: Optional[dict[str, Any]] = None) -> None:
        host, port, canon = parse_addr(addr)
        if not isinstance(weight, int) or weight < 1:
            raise ValueError(f"backend {addr!r}: weight must be an integer >= 1, not {weight!r}")
        object.__setattr__(self, "addr", canon)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "ext", dict(ext) if ext else {})
        object.__setattr__(self, "_hash", hash((canon, weight)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Backend is immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self.addr == other.addr and self.weight == other.weight

    def __lt__(self, other: "Backend") -> bool:
        # Sorted order makes every worker build identical selection arrays from the same set.
        return (self.addr, self.weight) < (other.addr, other.weight)

    def __repr__(self) -> str:
        w = f", weight={self.weight}" if self.weight != 1 else ""
        return f"Backend({self.addr!r}{w})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Backend, (self.addr, self.weight, self.ext))

    @property
    def is_unix(self) -> bool:
        """True for ``unix:/path`` backends."""
        return self.port == 0


BackendLike = Union[Backend, str, Mapping[str, Any]]


def as_backend(item: BackendLike) -> Backend:
    """Turn ``"host:port"``, ``{"addr": ..., "weight": ..., ...}`` or a Backend into a Backend.

    Mapping keys other than ``addr`` and ``weight`` go to ``ext`` (so YAML's ``tls``, ``sni``,
    ``verify`` ride along).
    """
    if isinstance(item, Backend):
        return item
    if isinstance(item, str):
        return Backend(item)
    d = dict(item)
    addr = d.pop("addr")
    weight = int(d.pop("weight", 1))
    return Backend(addr, weight, d or None)


class Discovery(Protocol):
    """What `Backends` needs from a discovery: ``await discover()`` returns the current set or
    raises. Pingora's ServiceDiscovery."""

    async def discover(self) -> Sequence[Backend]:
        ...


class Backends:
    """The current set of backends of one upstream group, as its discovery last returned it.

    ``get()`` is cheap (a tuple kept sorted); ``await update()`` asks discovery again and returns
    True when the set changed. A failing discovery keeps the last good set (and logs), so a DNS
    outage never empties a group.
    """

    __slots__ = ("discovery", "_items", "_version")

    def __init__(self, discovery: Discovery | Iterable[BackendLike]) -> None:
        if not hasattr(discovery, "discover"):
            from pyngora.lb.discovery import StaticDiscovery  # local: discovery imports us

            discovery = StaticDiscovery(discovery)  # type: ignore[arg-type]
        self.discovery: Discovery = discovery  # type: ignore[assignment]
        self._items: tuple[Backend, ...] = ()
        self._version = 0
        initial = getattr(discovery, "initial", None)
        if initial is not None:
            # Static sets are known now: no need to wait for an event loop to select.
            self._set(initial())

    @property
    def version(self) -> int:
        """Bumped on every change of the set: selection arrays are rebuilt when it moves."""
        return self._version

    def get(self) -> tuple[Backend, ...]:
        """The current backends, sorted. Runs per rebuild, not per request."""
        return self._items

    def _set(self, items: Iterable[Backend]) -> bool:
        new = tuple(sorted(set(items)))
        if new == self._items:
            return False
        self._items = new
        self._version += 1
        return True

    def replace(self, items: Iterable[BackendLike]) -> bool:
        """Set the backends directly (a worker following the shared table does this).
        Returns True when the set changed."""
        return self._set(as_backend(b) for b in items)

    async def update(self) -> bool:
        """Run discovery once. True when the set changed; False when unchanged or when discovery
        failed (then the last good set stays)."""
        try:
            found = await self.discovery.discover()
        except Exception as exc:  # discovery errors must never take the group down
            log.warning("discovery %r failed, keeping %d backends: %s",
                        self.discovery, len(self._items), exc)
            return False
        if not found and self._items:
            log.warning("discovery %r returned no backend, keeping the last %d",
                        self.discovery, len(self._items))
            return False
        return self._set(found)

    def __repr__(self) -> str:
        return f"Backends({list(self._items)!r})"
