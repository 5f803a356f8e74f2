"""Load balancing through the real server: spread, a stopped origin, its return, and probes
that run once per server whatever the worker count."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.origins import Origin
from tests.support import free_port, get, wait_for


def _conf(tmp, port: int, origins: list[Origin], threads: int = 2, interval: float = 0.3,
          metrics: int = 0) -> str:
    backends = ", ".join(f"{{addr: '{o.addr}'}}" for o in origins)
    text = (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"metrics_dir: {tmp}/metrics\nthreads: {threads}\n"
            f"services:\n  - name: proxy\n    type: http_proxy\n"
            f"    listeners: ['127.0.0.1:{port}']\n"
            f"    upstreams:\n      - name: app\n        backends: [{backends}]\n"
            f"        health_check: {{type: tcp, interval_seconds: {interval}, "
            f"unhealthy_after: 2, healthy_after: 1, timeout_seconds: 1}}\n"
            f"        timeouts: {{connect_seconds: 1}}\n")
    if metrics:
        text += f"  - {{name: metrics, type: prometheus, listeners: ['127.0.0.1:{metrics}']}}\n"
    return text


@pytest.fixture
def origins():
    made = [Origin(n).start() for n in ("a", "b", "c")]
    yield made
    for o in made:
        o.stop()


def _who(port: int) -> str:
    status, headers, body = get(port, headers={"Connection": "close"})
    assert status == 200, (status, body)
    return body.decode()


def test_round_robin_spread_stop_and_return(tmp_path, pyngora_factory, origins) -> None:
    port, mport = free_port(), free_port()
    p = pyngora_factory(_conf(tmp_path, port, origins, threads=1, metrics=mport)).start()
    p.wait_serving(port)
    seen = Counter(_who(port) for _ in range(30))
    assert seen == {"a": 10, "b": 10, "c": 10}  # one worker: round robin is exact

    origins[1].stop()
    # from the moment it stops: idempotent requests never fail (connect retries), and once
    # the checks have marked it down, nothing more is sent its way
    results = [_who(port) for _ in range(30)]
    assert set(results) <= {"a", "c"}
    wait_for(lambda: 'pyngora_backend_healthy{backend="%s",upstream="app"} 0.0' % origins[1].addr
             in get(mport, "/metrics")[2].decode(), 10, "b marked down")

    restarted = Origin("b", origins[1].port).start()
    origins[1] = restarted
    wait_for(lambda: "b" in {_who(port) for _ in range(6)}, 10, "b back in rotation")


def test_no_failed_request_while_a_backend_dies_under_load(tmp_path, pyngora_factory,
                                                          origins) -> None:
    port = free_port()
    p = pyngora_factory(_conf(tmp_path, port, origins, threads=2)).start()
    p.wait_serving(port)
    stop_at = time.monotonic() + 3

    def client(_: int) -> list[int]:
        codes = []
        while time.monotonic() < stop_at:
            codes.append(get(port, headers={"Connection": "close"})[0])
        return codes
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(0.5)  # load is flowing (a fixed point in a bounded load, not a sync point)
        origins[2].stop()
        codes = [c for f in futures for c in f.result()]
    assert codes and set(codes) == {200}, Counter(codes)


@pytest.mark.parametrize("threads", [1, 4])
def test_probes_per_interval_do_not_multiply_with_workers(tmp_path, pyngora_factory, origins,
                                                         threads: int) -> None:
    port = free_port()
    interval = 0.25
    p = pyngora_factory(_conf(tmp_path, port, origins, threads=threads, interval=interval)).start()
    p.wait_serving(port)
    start = [o.counts["connections"] for o in origins]
    t0 = time.monotonic()
    wait_for(lambda: all(o.counts["connections"] - s >= 6 for o, s in zip(origins, start)), 20,
             "six probe rounds")
    seen = [o.counts["connections"] for o in origins]  # read before the clock: a bound on it
    elapsed = time.monotonic() - t0
    for o, s, n in zip(origins, start, seen):
        probes = n - s
        # once per interval per backend (+1 for a round in flight), never once per worker
        assert probes <= elapsed / interval + 2, (threads, probes, elapsed)
        assert o.counts["requests"] == 0  # TCP checks open and close, nothing else


def test_no_healthy_backend_is_503_with_empty_body(tmp_path, pyngora_factory, origins) -> None:
    port, mport = free_port(), free_port()
    p = pyngora_factory(_conf(tmp_path, port, origins, threads=2, metrics=mport)).start()
    p.wait_serving(port)
    assert get(port)[0] == 200
    for o in origins:
        o.stop()

    def all_down() -> bool:
        text = get(mport, "/metrics")[2].decode()
        return all('pyngora_backend_healthy{backend="%s",upstream="app"} 0.0' % o.addr in text
                   for o in origins)
    wait_for(all_down, 15, "every backend marked down")
    status, headers, body = get(port)
    assert (status, body) == (503, b"")
    assert headers["cache-control"] == "private, no-store"
