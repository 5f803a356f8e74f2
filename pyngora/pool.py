"""ConnectionPool: idle upstream connections kept for reuse (Pingora's ``pingora-pool``).

One pool per worker process. Connections are grouped by the peer's *reuse key*; within a key
the most recently released connection is handed out first (a warm socket, and the cold ones
age out). The total number of idle connections is bounded: when full, the least recently
released connection *of any key* is evicted and closed. Every operation is O(1).

The pool does not know about sockets or asyncio. It holds any object implementing
:class:`Poolable`; the connector sweeps expired connections periodically
(:meth:`evict_expired`) and tells the pool (:meth:`remove`) when an idle connection must go
(it received bytes or EOF). As a second line
of defence, :meth:`get` also checks each candidate's deadline and ``is_idle_usable()``, so a
connection that is closing, or saw bytes while idle, is never handed out.

This module is a leaf: standard library only.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, Protocol, TypeVar


class Poolable(Protocol):
    """What a pooled connection offers the pool."""

    def is_idle_usable(self) -> bool:
        """True while the idle connection is open and has seen nothing since its release."""
        ...

    def close(self) -> None:
        """Close the connection for good (called by the pool on eviction or expiry)."""
        ...


C = TypeVar("C", bound=Poolable)


# Each idle connection is an entry (its key, the connection, when it stops being worth
# reusing): a tuple, not a class, because put() runs once per proxied request.


_NO_DEADLINE = float("inf")


class ConnectionPool(Generic[C]):
    """Per-key stacks of idle connections under one LRU bound.

    ``size`` is the most idle connections kept in total (``upstream_keepalive_pool_size``);
    0 disables pooling (every put closes the connection). ``clock`` is the monotonic clock the
    deadlines are measured with (a parameter so unit tests can move time by hand).
    """

    __slots__ = ("size", "_clock", "_lru", "_by_key")

    def __init__(self, size: int = 128, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 0:
            raise ValueError("pool size must be >= 0")
        self.size = size
        self._clock = clock
        # id(conn) -> entry, oldest release first: the global LRU order, for eviction.
        self._lru: OrderedDict[int, tuple[Hashable, C, float]] = OrderedDict()
        # key -> {id(conn): entry}, insertion ordered: the last item is the most recently used.
        # A dict (not a list) so that removing one connection from the middle is O(1).
        self._by_key: dict[Hashable, dict[int, tuple[Hashable, C, float]]] = {}

    def __len__(self) -> int:
        """How many idle connections the pool holds now."""
        return len(self._lru)

    def __contains__(self, conn: object) -> bool:
        return id(conn) in self._lru

    def count(self, key: Hashable) -> int:
        """How many idle connections the pool holds for ``key``."""
        stack = self._by_key.get(key)
        return len(stack) if stack else 0

    def put(self, key: Hashable, conn: C, idle_timeout: Optional[float] = None) -> bool:
        """Keep ``conn`` idle under ``key`` for at most ``idle_timeout`` seconds (None: no limit).

        Called when a request on ``conn`` finished cleanly. Returns True if the connection is
        now pooled, False if it was closed instead (pooling disabled, a zero timeout, or it is
        already unusable). Evicts (and closes) the least recently used connection when full.
        """
        if self.size == 0 or (idle_timeout is not None and idle_timeout <= 0) \
                or not conn.is_idle_usable():
            conn.close()
            return False
        ident = id(conn)
        lru = self._lru
        if ident in lru:  # released twice: keep one entry, refresh its place
            self._unlink(ident)
        deadline = _NO_DEADLINE if idle_timeout is None else self._clock() + idle_timeout
        entry = (key, conn, deadline)
        lru[ident] = entry
        stack = self._by_key.get(key)
        if stack is None:
            self._by_key[key] = {ident: entry}
        else:
            stack[ident] = entry
        if len(lru) > self.size:
            while len(lru) > self.size:
                _, (okey, oconn, _) = lru.popitem(last=False)
                self._drop_from_key(okey, id(oconn))
                oconn.close()
        return True

    def get(self, key: Hashable) -> Optional[C]:
        """Take the most recently released usable connection for ``key``, or None.

        Called by the connector before it dials. Candidates that expired or became unusable
        while idle are closed and skipped (the loop ends: each turn removes one entry).
        """
        stack = self._by_key.get(key)
        if not stack:
            return None
        now = self._clock()
        while stack:
            ident, (_, conn, deadline) = stack.popitem()
            del self._lru[ident]
            if deadline > now and conn.is_idle_usable():
                if not stack:
                    del self._by_key[key]
                return conn
            conn.close()
        del self._by_key[key]
        return None

    def remove(self, conn: C) -> bool:
        """Forget ``conn`` without closing it; True if it was pooled.

        Called by a pooled connection that received bytes or EOF, or whose idle timer fired,
        just before it closes itself.
        """
        ident = id(conn)
        if ident not in self._lru:
            return False
        self._unlink(ident)
        return True

    def evict_expired(self) -> int:
        """Close every connection past its idle deadline; returns how many.

        O(n) in pooled connections: for the connector's periodic sweep (one timer per worker,
        not one per release), never the request path.
        """
        now = self._clock()
        expired = [e[1] for e in self._lru.values() if e[2] <= now]
        for conn in expired:
            self._unlink(id(conn))
            conn.close()
        return len(expired)

    def close_all(self) -> None:
        """Close every idle connection (worker shutdown)."""
        entries = list(self._lru.values())
        self._lru.clear()
        self._by_key.clear()
        for entry in entries:
            entry[1].close()

    def _unlink(self, ident: int) -> None:
        entry = self._lru.pop(ident)
        self._drop_from_key(entry[0], ident)

    def _drop_from_key(self, key: Hashable, ident: int) -> None:
        stack = self._by_key[key]
        del stack[ident]
        if not stack:
            del self._by_key[key]


__all__ = ["ConnectionPool", "Poolable"]
