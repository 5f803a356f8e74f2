"""pyngora.pool.ConnectionPool: per-key MRU stacks, a global LRU bound, idle deadlines, and
connections that became unusable while idle. No event loop: time is a hand-moved clock."""
from __future__ import annotations

import pytest

from pyngora.pool import ConnectionPool


class FakeConn:
    """A pooled object: the pool only calls is_idle_usable() and close()."""

    __slots__ = ("name", "usable", "closed")

    def __init__(self, name: str) -> None:
        self.name = name
        self.usable = True
        self.closed = 0

    def is_idle_usable(self) -> bool:
        return self.usable and not self.closed

    def close(self) -> None:
        self.closed += 1

    def __repr__(self) -> str:
        return f"FakeConn({self.name})"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_get_empty() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(4)
    assert pool.get("a") is None
    assert len(pool) == 0


def test_per_key_most_recent_first() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    a1, a2, a3, b1 = FakeConn("a1"), FakeConn("a2"), FakeConn("a3"), FakeConn("b1")
    for key, conn in (("a", a1), ("a", a2), ("b", b1), ("a", a3)):
        assert pool.put(key, conn)
    assert len(pool) == 4 and pool.count("a") == 3 and pool.count("b") == 1
    assert a1 in pool
    assert pool.get("a") is a3
    assert pool.get("a") is a2
    assert pool.get("b") is b1
    assert pool.get("b") is None
    assert pool.get("a") is a1
    assert pool.get("a") is None
    assert len(pool) == 0
    assert not any(c.closed for c in (a1, a2, a3, b1))


def test_lru_eviction_over_total_bound() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(3)
    conns = [FakeConn(f"c{i}") for i in range(5)]
    keys = ["a", "b", "a", "c", "b"]
    for key, conn in zip(keys, conns):
        pool.put(key, conn)
    # c0 (a) and c1 (b) were the least recently released: evicted and closed.
    assert len(pool) == 3
    assert conns[0].closed == 1 and conns[1].closed == 1
    assert [c.closed for c in conns[2:]] == [0, 0, 0]
    assert pool.count("a") == 1 and pool.count("b") == 1 and pool.count("c") == 1
    assert pool.get("a") is conns[2]
    assert pool.get("b") is conns[4]


def test_lru_order_refreshed_by_reuse() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(2)
    x, y, z = FakeConn("x"), FakeConn("y"), FakeConn("z")
    pool.put("k1", x)
    pool.put("k2", y)
    got = pool.get("k1")
    assert got is x
    pool.put("k1", x)  # released again: now the most recent
    pool.put("k3", z)  # evicts y, the least recently released
    assert y.closed == 1 and x.closed == 0
    assert pool.get("k2") is None
    assert pool.get("k1") is x and pool.get("k3") is z


def test_size_zero_disables_pooling() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(0)
    conn = FakeConn("c")
    assert pool.put("a", conn) is False
    assert conn.closed == 1 and len(pool) == 0
    with pytest.raises(ValueError):
        ConnectionPool(-1)


def test_idle_expiry_checked_on_get() -> None:
    clock = Clock()
    pool: ConnectionPool[FakeConn] = ConnectionPool(10, clock=clock)
    old, new = FakeConn("old"), FakeConn("new")
    pool.put("a", old, idle_timeout=5.0)
    clock.now += 3.0
    pool.put("a", new, idle_timeout=5.0)
    clock.now += 3.0  # old is 6 s idle (expired), new 3 s
    assert pool.get("a") is new
    assert pool.get("a") is None  # old is expired: closed, not handed out
    assert old.closed == 1 and len(pool) == 0


def test_idle_expiry_sweep_and_no_timeout() -> None:
    clock = Clock()
    pool: ConnectionPool[FakeConn] = ConnectionPool(10, clock=clock)
    short, forever = FakeConn("short"), FakeConn("forever")
    pool.put("a", short, idle_timeout=1.0)
    pool.put("a", forever, idle_timeout=None)
    clock.now += 10_000.0
    assert pool.evict_expired() == 1
    assert short.closed == 1 and forever.closed == 0
    assert pool.get("a") is forever


def test_zero_idle_timeout_closes() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    conn = FakeConn("c")
    assert pool.put("a", conn, idle_timeout=0) is False
    assert conn.closed == 1


def test_unusable_while_idle_is_never_handed_out() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    good, bad = FakeConn("good"), FakeConn("bad")
    pool.put("a", good)
    pool.put("a", bad)
    bad.usable = False  # it received bytes or EOF while idle
    assert pool.get("a") is good
    assert bad.closed == 1
    assert pool.get("a") is None


def test_unusable_at_put_is_closed() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    conn = FakeConn("c")
    conn.usable = False
    assert pool.put("a", conn) is False and conn.closed == 1 and len(pool) == 0


def test_remove_from_the_middle() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    a1, a2, a3 = FakeConn("a1"), FakeConn("a2"), FakeConn("a3")
    for conn in (a1, a2, a3):
        pool.put("a", conn)
    assert pool.remove(a2) is True
    assert pool.remove(a2) is False
    assert a2.closed == 0  # remove() forgets, the connection closes itself
    assert len(pool) == 2 and a2 not in pool
    assert pool.get("a") is a3 and pool.get("a") is a1 and pool.get("a") is None
    pool.put("b", a2)
    assert pool.remove(a2) is True and pool.count("b") == 0 and len(pool) == 0


def test_double_put_keeps_one_entry() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    conn = FakeConn("c")
    pool.put("a", conn)
    pool.put("a", conn)
    assert len(pool) == 1
    assert pool.get("a") is conn and pool.get("a") is None


def test_close_all() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(10)
    conns = [FakeConn(str(i)) for i in range(4)]
    for i, conn in enumerate(conns):
        pool.put(i % 2, conn)
    pool.close_all()
    assert len(pool) == 0 and all(c.closed == 1 for c in conns)
    assert pool.get(0) is None


def test_eviction_when_close_calls_back_into_pool() -> None:
    """A connection's close() calls pool.remove(self), as the real one does: no corruption."""
    pool: ConnectionPool["Reentrant"] = ConnectionPool(1)

    class Reentrant(FakeConn):
        __slots__ = ()

        def close(self) -> None:
            super().close()
            pool.remove(self)

    first, second = Reentrant("1"), Reentrant("2")
    pool.put("a", first)
    pool.put("a", second)
    assert first.closed == 1 and len(pool) == 1 and pool.get("a") is second


def test_many_keys_stay_bounded() -> None:
    pool: ConnectionPool[FakeConn] = ConnectionPool(50)
    conns = [FakeConn(str(i)) for i in range(1000)]
    for i, conn in enumerate(conns):
        pool.put(i % 97, conn)
    assert len(pool) == 50
    assert sum(c.closed for c in conns) == 950
    assert all(conns[i].closed == 0 for i in range(950, 1000))
