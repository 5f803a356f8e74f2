"""Selection algorithms: which backend serves this request. Pingora's `selection` module.

Each algorithm is a class built once per backend set (``RoundRobin(backends)``) that precomputes
its arrays; ``select(key, ok, max_iterations)`` then runs per request and returns the index of
the chosen backend, or -1. ``ok(i)`` is the load balancer's health test; the algorithm calls it
on its first choice and, when that one is down, on further candidates until one passes or
``max_iterations`` candidates have been tried.

- `RoundRobin`, `Random`, `FnvHash` share one weighted array: backend i appears weight_i times
  (weights divided by their gcd, and scaled down when the total passes 8192), spread out in
  stride order (smooth, like nginx's weighted round robin, not ``AAAABBC``). The first pick is
  one array read. When it is down, the fallback walks the unweighted backends with a stride
  coprime to their count, chosen from the key: every backend is tried at most once, and the
  load of a dead backend spreads over the others instead of landing on its neighbour.
- `Consistent` is a Ketama ring (libketama/nginx layout): 160 points per weight unit, each
  md5("ADDR-J") giving four little-endian u32 points; a key's md5 picks the first point at or
  after it. Removing one of N backends moves only that backend's keys (~1/N); the fallback walks
  the ring clockwise, so a dead backend's keys spread over the others too.

An empty key (a request without the header or cookie its ``hash_key`` names) has no affinity
to keep: `FnvHash` and `Consistent` spread those over the backends as round robin would.

Keys are bytes. Hash choices are stable across processes (never Python's salted ``hash()``),
so every worker maps a key to the same backend.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import struct
from typing import Callable, Optional, Sequence

from pyngora.lb.backend import Backend

__all__ = ["Selection", "RoundRobin", "Random", "FnvHash", "Consistent", "fnv1a64",
           "HashKey", "SELECTIONS"]

OkFn = Callable[[int], bool]

_WEIGHTED_CAP = 8192          # bounded array size whatever the weights (SRV weights reach 65535)
_KETAMA_POINTS = 160          # per weight unit, as libketama and nginx
_KETAMA_MAX_WEIGHT = 100      # bounds ring build time; heavier backends count as 100
_U32 = struct.Struct("<I").unpack_from
_md5 = hashlib.md5


def _weighted_order(weights: Sequence[int]) -> list[int]:
    """The weighted array: index i repeated w_i times, spread out. Built once per backend set."""
    if not weights:
        return []
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    ws = [w // g for w in weights]
    total = sum(ws)
    if total > _WEIGHTED_CAP:
        ws = [max(1, round(w * _WEIGHTED_CAP / total)) for w in ws]
    # Stride scheduling: the k-th copy of backend i sits at (k + 1/2) / w_i in [0, 1).
    entries = sorted(((k + 0.5) / w, i) for i, w in enumerate(ws) for k in range(w))
    return [i for _, i in entries]


def _coprime_steps(n: int) -> list[int]:
    """Strides that visit all n indices once each (gcd(step, n) == 1)."""
    if n <= 1:
        return [1]
    steps = [s for s in range(1, n) if math.gcd(s, n) == 1]
    return steps[:64]


class Selection:
    """Base of the array-based algorithms. Subclasses define `select`."""

    __slots__ = ("backends", "n", "weighted", "total", "_steps", "_nsteps")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.n = len(self.backends)
        self.weighted: list[int] = _weighted_order([b.weight for b in self.backends])
        self.total = len(self.weighted)
        self._steps = _coprime_steps(self.n)
        self._nsteps = len(self._steps)

    def _fallback(self, first: int, h: int, ok: OkFn, max_iterations: int) -> int:
        """After ``first`` failed ``ok``: try the other backends once each. Both the starting
        point and the stride come from ``h``, so a dead backend's keys spread over all others."""
        n = self.n
        if n < 2:
            return -1
        step = self._steps[h % self._nsteps]
        i = (first + 1 + (h >> 6) % (n - 1)) % n
        tries = min(n, max_iterations) - 1
        for _ in range(n):
            if tries <= 0:
                break
            if i != first:
                if ok(i):
                    return i
                tries -= 1
            i += step
            if i >= n:
                i -= n
        return -1

    def select(self, key: bytes, ok: OkFn, max_iterations: int = 256) -> int:  # pragma: no cover
        """Index of the chosen backend, or -1. Runs per request."""
        raise NotImplementedError


class RoundRobin(Selection):
    """Weighted round robin. A lock-free counter (``itertools.count`` is atomic under the GIL)."""

    __slots__ = ("_counter",)

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._counter = itertools.count()

    def select(self, key: bytes, ok: OkFn, max_iterations: int = 256) -> int:
        if not self.total or max_iterations < 1:
            return -1
        c = next(self._counter)
        i = self.weighted[c % self.total]
        if ok(i):
            return i
        return self._fallback(i, c, ok, max_iterations)


class Random(Selection):
    """Weighted random (Mersenne Twister; not for secrets, only for spreading load)."""

    __slots__ = ("_random",)

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._random = random.random

    def select(self, key: bytes, ok: OkFn, max_iterations: int = 256) -> int:
        if not self.total or max_iterations < 1:
            return -1
        pos = int(self._random() * self.total)
        i = self.weighted[pos]
        if ok(i):
            return i
        return self._fallback(i, pos, ok, max_iterations)


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_M64 = 0xFFFFFFFFFFFFFFFF


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bit (what Pingora's FnvHash uses). Pure Python: ~50 ns per byte."""
    h = _FNV_OFFSET
    for c in data:
        h = ((h ^ c) * _FNV_PRIME) & _M64
    return h


class FnvHash(Selection):
    """Weighted hashing: ``fnv1a64(key) % total`` on the weighted array. The same key always
    picks the same backend while the set is unchanged (any change remaps ~all keys: use
    `Consistent` when that matters). An empty key (a request without the header or cookie
    of its ``hash_key``) has no affinity to keep: those are spread (see ``_spread``)."""

    __slots__ = ("_empty",)

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._empty = itertools.count()

    def select(self, key: bytes, ok: OkFn, max_iterations: int = 256) -> int:
        if not self.total or max_iterations < 1:
            return -1
        h = fnv1a64(key or _spread(self._empty))
        i = self.weighted[h % self.total]
        if ok(i):
            return i
        return self._fallback(i, h >> 17, ok, max_iterations)


def _spread(counter: "itertools.count[int]") -> bytes:
    """The key to hash in place of an empty one: the next of a counter, so keyless requests
    go round the backends (weighted, as hashed keys do) instead of all hashing b"" to one
    backend. nginx's ``hash`` falls back to round robin for an empty key too."""
    return b"%d" % next(counter)


def _ketama_hash(key: bytes) -> int:
    return _U32(_md5(key).digest())[0]


class Consistent:
    """Ketama consistent hashing (160 md5 points per weight unit). Per request: one md5 and one
    bisect over the sorted points."""

    __slots__ = ("backends", "n", "points", "owners", "_len", "_empty")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        self.n = len(self.backends)
        self._empty = itertools.count()  # the keys of keyless requests (see _spread)
        ring: list[tuple[int, int]] = []
        for i, b in enumerate(self.backends):
            prefix = b.addr.encode()
            for j in range(_KETAMA_POINTS // 4 * min(b.weight, _KETAMA_MAX_WEIGHT)):
                d = _md5(prefix + b"-%d" % j).digest()
                # Four points per digest; ties broken by address so every worker agrees.
                ring.append((_U32(d, 0)[0], i))
                ring.append((_U32(d, 4)[0], i))
                ring.append((_U32(d, 8)[0], i))
                ring.append((_U32(d, 12)[0], i))
        ring.sort(key=lambda p: (p[0], self.backends[p[1]].addr))
        self.points: list[int] = [p for p, _ in ring]
        self.owners: list[int] = [i for _, i in ring]
        self._len = len(ring)

    def select(self, key: bytes, ok: OkFn, max_iterations: int = 256) -> int:
        """Index of the owner of the first ring point at or after md5(key); when it is down, the
        next distinct owners clockwise. -1 when none passes. An empty key is spread (see
        ``_spread``)."""
        length = self._len
        if not length or max_iterations < 1:
            return -1
        pos = bisect.bisect_left(self.points, _ketama_hash(key or _spread(self._empty)))
        if pos == length:
            pos = 0
        owners = self.owners
        i = owners[pos]
        if ok(i):
            return i
        tried = 1 << i
        count = 1
        limit = min(self.n, max_iterations)
        for step in range(1, length):
            j = owners[(pos + step) % length]
            if (tried >> j) & 1:
                continue
            if count >= limit:
                return -1
            if ok(j):
                return j
            tried |= 1 << j
            count += 1
        return -1


SELECTIONS: dict[str, type] = {
    "round_robin": RoundRobin,
    "random": Random,
    "fnv": FnvHash,
    "consistent": Consistent,
}


class HashKey:
    """A compiled ``hash_key`` spec of SPEC section 5: ``uri`` | ``path`` | ``client_ip`` |
    ``header:NAME`` | ``cookie:NAME``. Parsed once at config load; ``extract`` runs per request
    and returns the bytes to hash (b"" when the header/cookie is absent)."""

    __slots__ = ("kind", "name", "_cookie_prefix")

    KINDS = ("uri", "path", "client_ip", "header", "cookie")

    def __init__(self, spec: str) -> None:
        kind, _, name = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in self.KINDS:
            raise ValueError(f"hash_key {spec!r}: expected one of uri, path, client_ip, "
                             f"header:NAME, cookie:NAME")
        if kind in ("header", "cookie") and not name.strip():
            raise ValueError(f"hash_key {spec!r}: {kind} needs a name, e.g. {kind}:x-user")
        if kind not in ("header", "cookie") and name:
            raise ValueError(f"hash_key {spec!r}: {kind} takes no name")
        self.kind = kind
        self.name = name.strip().lower().encode() if kind == "header" else name.strip().encode()
        self._cookie_prefix = self.name + b"="

    def extract(self, target: bytes, client_ip: str,
                get_header: Callable[[bytes], Optional[bytes]]) -> bytes:
        """The key for one request. ``target`` is the request target (path + query),
        ``get_header(lowercase_name)`` returns a header's value or None."""
        kind = self.kind
        if kind == "uri":
            return target
        if kind == "path":
            q = target.find(b"?")
            return target if q < 0 else target[:q]
        if kind == "client_ip":
            return client_ip.encode()
        if kind == "header":
            return get_header(self.name) or b""
        cookies = get_header(b"cookie")
        if not cookies:
            return b""
        prefix = self._cookie_prefix
        for part in cookies.split(b";"):
            part = part.strip()
            if part.startswith(prefix):
                return part[len(prefix):]
        return b""

    def __repr__(self) -> str:
        return f"HashKey({self.kind}{':' + self.name.decode() if self.name else ''})"
