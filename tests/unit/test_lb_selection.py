"""Selection algorithms and LoadBalancer.select, with no event loop."""
from __future__ import annotations

import collections

import pytest

from pyngora.lb import (Backend, Consistent, FnvHash, HashKey, LoadBalancer, Random, RoundRobin,
                        fnv1a64, parse_addr)

ADDRS = [f"10.0.0.{i}:80" for i in range(1, 11)]


def counts(lb: LoadBalancer, n: int, key=lambda k: b"") -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for k in range(n):
        b = lb.select(key(k))
        assert b is not None
        c[b.addr] += 1
    return c


def test_parse_addr_forms() -> None:
    assert parse_addr("1.2.3.4:80") == ("1.2.3.4", 80, "1.2.3.4:80")
    assert parse_addr("[::1]:8080") == ("::1", 8080, "[::1]:8080")
    assert parse_addr("example.com:443")[2] == "example.com:443"
    assert parse_addr("unix:/run/x.sock") == ("/run/x.sock", 0, "unix:/run/x.sock")
    for bad in ("1.2.3.4", "::1:80", "a:0", "a:70000", "[::1]80", ":80"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_backend_value_semantics() -> None:
    a = Backend("1.1.1.1:80", 2, {"tls": True})
    b = Backend("1.1.1.1:80", 2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Backend("1.1.1.1:80") != a
    assert (a.host, a.port, a.weight, a.ext) == ("1.1.1.1", 80, 2, {"tls": True})
    with pytest.raises(AttributeError):
        a.weight = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        Backend("1.1.1.1:80", 0)


def test_round_robin_exact() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS[:3])
    picks = [lb.select(b"").addr for _ in range(9)]
    assert picks == ADDRS[:3] * 3


@pytest.mark.parametrize("algo", [RoundRobin, Random, FnvHash, Consistent])
def test_weighted_distribution_within_5_percent(algo: type) -> None:
    backends = [Backend("10.0.0.1:80", 1), Backend("10.0.0.2:80", 2), Backend("10.0.0.3:80", 5)]
    lb = LoadBalancer(backends, algo)
    n = 100_000 if algo is not Consistent else 40_000
    c = counts(lb, n, key=lambda k: b"key-%d" % k)
    for b in backends:
        share = c[b.addr] / n
        want = b.weight / 8
        assert abs(share - want) <= 0.05 * want + (0.01 if algo is Consistent else 0), \
            (algo.__name__, b, share, want)


def test_round_robin_weighted_is_smooth() -> None:
    lb = LoadBalancer([Backend("10.0.0.1:80", 3), Backend("10.0.0.2:80", 1)])
    picks = [lb.select(b"").addr for _ in range(8)]
    # never all of one backend's turns in a row: A A B A A ... style spread
    assert picks.count("10.0.0.2:80") == 2
    assert "10.0.0.1:80,10.0.0.1:80,10.0.0.1:80,10.0.0.1:80" not in ",".join(picks * 2)


@pytest.mark.parametrize("algo", [FnvHash, Consistent])
def test_hash_same_key_same_backend(algo: type) -> None:
    lb = LoadBalancer.try_from_iter(ADDRS, algo)
    other = LoadBalancer.try_from_iter(list(reversed(ADDRS)), algo)  # another worker
    for k in range(500):
        key = b"user-%d" % k
        first = lb.select(key)
        assert all(lb.select(key) == first for _ in range(3))
        assert other.select(key) == first


def test_fnv1a64_reference_values() -> None:
    # Published FNV-1a 64 test vectors.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_consistent_minimal_movement() -> None:
    full = LoadBalancer.try_from_iter(ADDRS, Consistent)
    removed = ADDRS[3]
    less = LoadBalancer.try_from_iter([a for a in ADDRS if a != removed], Consistent)
    keys = [b"k%d" % i for i in range(10_000)]
    before = {k: full.select(k).addr for k in keys}
    after = {k: less.select(k).addr for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert len(moved) <= 1300
    assert all(before[k] == removed for k in moved)
    assert sum(1 for k in keys if before[k] == removed) == len(moved)
    # ... and adding it back returns exactly the same mapping
    assert {k: full.select(k).addr for k in keys} == before
    # the removed backend's keys spread over several others, not onto one neighbour
    assert len({after[k] for k in moved}) >= 5


@pytest.mark.parametrize("algo", [RoundRobin, Random, FnvHash, Consistent])
def test_select_skips_unhealthy_and_all_down_is_none(algo: type) -> None:
    lb = LoadBalancer.try_from_iter(ADDRS[:4], algo)
    down = {Backend(ADDRS[0]), Backend(ADDRS[2])}
    for b in down:
        lb.set_health(b, False)
    seen = set()
    for k in range(2000):
        b = lb.select(b"k%d" % k)
        assert b is not None and b not in down
        seen.add(b)
    assert seen == {Backend(ADDRS[1]), Backend(ADDRS[3])}
    lb.set_enable(Backend(ADDRS[1]), False)
    assert all(lb.select(b"k%d" % k) == Backend(ADDRS[3]) for k in range(200))
    lb.set_health(Backend(ADDRS[3]), False)
    assert all(lb.select(b"k%d" % k) is None for k in range(50))
    lb.set_health(Backend(ADDRS[0]), True)
    assert lb.select(b"x") == Backend(ADDRS[0])


def test_fallback_spreads_dead_backend_keys() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS, FnvHash)
    dead = lb.select(b"probe")
    keys = [b"k%d" % i for i in range(5000)]
    victims = [k for k in keys if lb.select(k) == dead]
    lb.set_health(dead, False)
    targets = collections.Counter(lb.select(k) for k in victims)
    assert dead not in targets and len(targets) >= 5


def test_max_iterations_bounds_the_search() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS, RoundRobin)
    for a in ADDRS[:9]:
        lb.set_health(Backend(a), False)
    assert lb.select(b"", max_iterations=256) == Backend(ADDRS[9])
    results = {lb.select(b"", max_iterations=1) for _ in range(10)}
    assert results == {None, Backend(ADDRS[9])}
    assert lb.select(b"", max_iterations=0) is None


def test_passive_health_skips_then_expires_and_is_only_a_hint() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS[:3])
    bad = Backend(ADDRS[1])
    lb.report_failure(bad)
    assert bad not in {lb.select(b"") for _ in range(30)}
    assert not lb.is_healthy(bad)
    lb.report_success(bad)
    assert bad in {lb.select(b"") for _ in range(30)}
    lb.report_failure(bad, seconds=-1.0)  # already expired
    assert bad in {lb.select(b"") for _ in range(30)}
    # every backend passively down: still answer rather than 503
    for a in ADDRS[:3]:
        lb.report_failure(Backend(a), seconds=60)
    assert lb.select(b"") is not None
    lb.set_health(Backend(ADDRS[0]), False)
    lb.set_health(Backend(ADDRS[1]), False)
    lb.set_health(Backend(ADDRS[2]), False)
    assert lb.select(b"") is None  # active health is not a hint


def test_select_with_accept() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS[:3], FnvHash)
    first = lb.select(b"abc")
    retry = lb.select_with(b"abc", 256, lambda b, ok: ok and b != first)
    assert retry is not None and retry != first


def test_empty_balancer() -> None:
    for algo in (RoundRobin, Random, FnvHash, Consistent):
        assert LoadBalancer([], algo).select(b"k") is None


def test_hash_key_extract() -> None:
    hdrs = {b"x-user": b"alice", b"cookie": b"a=1; sid=xyz; b=2"}
    get = hdrs.get
    assert HashKey("uri").extract(b"/a?b=1", "1.2.3.4", get) == b"/a?b=1"
    assert HashKey("path").extract(b"/a?b=1", "1.2.3.4", get) == b"/a"
    assert HashKey("client_ip").extract(b"/", "1.2.3.4", get) == b"1.2.3.4"
    assert HashKey("header:X-User").extract(b"/", "", get) == b"alice"
    assert HashKey("cookie:sid").extract(b"/", "", get) == b"xyz"
    assert HashKey("cookie:none").extract(b"/", "", get) == b""
    for bad in ("host", "header", "uri:x"):
        with pytest.raises(ValueError):
            HashKey(bad)


def test_passive_mark_survives_backend_set_change() -> None:
    lb = LoadBalancer.try_from_iter(ADDRS[:3])
    lb.report_failure(Backend(ADDRS[0]), seconds=60)
    lb.backends_set.replace(ADDRS[:4])  # discovery added one
    picks = {lb.select(b"") for _ in range(40)}
    assert Backend(ADDRS[0]) not in picks and Backend(ADDRS[3]) in picks
