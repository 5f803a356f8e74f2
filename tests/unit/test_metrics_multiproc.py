"""Metrics across real forked processes: exact sums, dead workers, archive, locking, master side.

Every child is started with os.fork, does its counting through the public recorders, flushes
and leaves with os._exit; the test reaps it in ``finally``. Renders go through the exporter,
exactly as a scrape would.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyngora.metrics import exporter, multiproc, registry


def scrape(directory: str) -> dict[tuple[str, frozenset], float]:
    """Render ``directory`` and parse it into {(sample name, labels): value}."""
    body, _headers = exporter.render(directory)
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of every sample called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def mdir(tmp_path, monkeypatch) -> str:
    """A fresh metrics directory, exported in the environment for this test only."""
    d = str(tmp_path / "metrics")
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    multiproc.prepare_dir(d, fresh=True)
    monkeypatch.setattr(multiproc, "_master", None)
    multiproc._pending.clear()
    return d


def fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child that then flushes and exits; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
            registry.flush()
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def reap(pid: int) -> int:
    """Wait for ``pid``; returns its exit status code."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def worker_body(n: int, service: str = "web") -> Callable[[], None]:
    def body() -> None:
        registry.init_worker(service)
        m = registry.service_metrics(service)
        for i in range(n):
            m.connection_opened()
            m.request_done(200 if i % 4 else 502, 0.002 * (i % 7), 100, 1000)
            m.connection_closed()
        up = registry.upstream_metrics("api")
        up.request_done("10.0.0.1:8080", 200)
        up.error("10.0.0.1:8080", "ConnectRefused")
        up.connect_duration(0.001)
        up.pool_reused()
    return body


def test_n_processes_sum_exactly(mdir: str) -> None:
    pids = [fork(worker_body(2500)) for _ in range(4)]
    try:
        assert [reap(p) for p in pids] == [0, 0, 0, 0]
        pids = []
        s = scrape(mdir)
        assert total(s, "pyngora_requests_total", service="web") == 10000
        assert total(s, "pyngora_requests_total", service="web", code="502") == 2500 * 4 / 4
        assert total(s, "pyngora_request_duration_seconds_count", service="web") == 10000
        assert s[("pyngora_request_duration_seconds_bucket",
                  frozenset({("service", "web"), ("le", "+Inf")}))] == 10000
        assert total(s, "pyngora_request_bytes_total") == 10000 * 100
        assert total(s, "pyngora_response_bytes_total") == 10000 * 1000
        assert total(s, "pyngora_connections_accepted_total") == 10000
        assert total(s, "pyngora_upstream_requests_total", code="200", upstream="api") == 4
        assert total(s, "pyngora_upstream_errors_total", kind="connect_refused") == 4
        assert total(s, "pyngora_upstream_connect_duration_seconds_count") == 4
        assert total(s, "pyngora_upstream_pool_reused_total") == 4
    finally:
        kill_all(pids)


def test_dead_worker_keeps_counts_and_drops_live_gauges(mdir: str) -> None:
    """Live workers hold connections open; one is SIGKILLed and marked dead."""
    pids: list[int] = []
    gates: list[int] = []
    try:
        for k in (1, 2, 3):
            r, w = os.pipe()
            ready_r, ready_w = os.pipe()

            def body(k: int = k, r: int = r, ready_w: int = ready_w,
                     inherited: tuple[int, ...] = (*gates, w)) -> None:
                for fd in inherited:  # hold no write end of any gate, or EOF never comes
                    os.close(fd)
                registry.init_worker("web")
                m = registry.service_metrics("web")
                for _ in range(100 * k):
                    m.request_done(200, 0.001, 1, 1)
                for _ in range(k):
                    m.connection_opened()
                registry.set_backend_healthy("api", "b1", k != 3)
                registry.flush()
                os.write(ready_w, b"x")
                os.read(r, 1)  # stay alive until the test says so

            pids.append(fork(body))
            gates.append(w)
            assert os.read(ready_r, 1) == b"x"
        s = scrape(mdir)
        assert total(s, "pyngora_requests_total") == 600
        assert total(s, "pyngora_connections_active", service="web") == 6
        # the most recent verdict wins (k=3 spoke last)
        assert total(s, "pyngora_backend_healthy", backend="b1") == 0

        victim = pids.pop()  # k = 3: 300 requests, 3 connections
        os.kill(victim, signal.SIGKILL)
        reap(victim)
        assert multiproc.mark_process_dead(victim) is True
        s = scrape(mdir)
        assert total(s, "pyngora_requests_total") == 600  # counters: exact, not backwards
        assert total(s, "pyngora_connections_active", service="web") == 3  # gauge: gone
        assert total(s, "pyngora_backend_healthy", backend="b1") == 1  # its verdict gone
        assert not [n for n in os.listdir(mdir) if f"_{victim}" in n]
    finally:
        for w in gates:
            os.close(w)
        for pid in pids:
            reap(pid)


def test_directory_does_not_grow_with_dead_pids(mdir: str) -> None:
    multiproc.build_info("9.9.9")
    counts: list[int] = []
    for _round in range(25):
        pid = fork(worker_body(40))
        assert reap(pid) == 0
        multiproc.mark_process_dead(pid)
        counts.append(len(os.listdir(mdir)))
    assert len(set(counts)) == 1, counts  # constant: archives + the master's files + lock
    s = scrape(mdir)
    assert total(s, "pyngora_requests_total") == 25 * 40
    assert total(s, "pyngora_request_duration_seconds_count") == 25 * 40
    assert total(s, "pyngora_upstream_pool_reused_total") == 25
    assert total(s, "pyngora_build_info", version="9.9.9") == 1


def test_counters_never_go_backwards_while_archiving(mdir: str) -> None:
    """A scraper process renders in a loop while the master archives dead workers."""
    n_workers, per = 12, 50
    pids = [fork(worker_body(per)) for _ in range(n_workers)]
    for p in pids:
        assert reap(p) == 0
    r, w = os.pipe()
    stop_r, stop_w = os.pipe()
    scraper = os.fork()
    if scraper == 0:
        try:
            os.close(r)
            os.set_blocking(stop_r, False)
            sums = []
            for _ in range(2000):  # bounded
                sums.append(total(scrape(mdir), "pyngora_requests_total"))
                try:
                    if os.read(stop_r, 1):
                        break
                except BlockingIOError:
                    pass
            os.write(w, ",".join("%d" % v for v in sums).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        for p in pids:
            multiproc.mark_process_dead(p, lock_timeout=5.0)
            time.sleep(0.005)  # let the scraper interleave
        os.write(stop_w, b"x")
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        reap(scraper)
    sums = [int(v) for v in data.decode().split(",")]
    assert sums and all(v == n_workers * per for v in sums), set(sums)
    assert total(scrape(mdir), "pyngora_requests_total") == n_workers * per


def test_busy_lock_defers_archive_without_losing_counts(mdir: str) -> None:
    pid = fork(worker_body(10))
    assert reap(pid) == 0
    with multiproc.dir_lock(mdir, exclusive=False):  # a scrape in progress
        assert multiproc.mark_process_dead(pid, lock_timeout=0.05) is False
    assert any(n.startswith(f"counter_{pid}") for n in os.listdir(mdir))
    assert total(scrape(mdir), "pyngora_requests_total") == 10
    pid2 = fork(worker_body(5))
    assert reap(pid2) == 0
    assert multiproc.mark_process_dead(pid2) is True  # retries the pending one too
    assert not [n for n in os.listdir(mdir) if f"_{pid}" in n or f"_{pid2}" in n]
    assert total(scrape(mdir), "pyngora_requests_total") == 15


def test_reused_pid_continues_from_unarchived_file(mdir: str) -> None:
    d = multiproc.METRICS["pyngora_requests_total"]
    key = multiproc.sample_key(d, ("web", "200"))
    first = multiproc.ProcessFiles(mdir, pid=999_999_1)
    first.add(d.prefix, key, 7)
    first.write()
    again = multiproc.ProcessFiles(mdir, pid=999_999_1)  # same pid, new process, no archive yet
    again.add(d.prefix, key, 3)
    again.write()
    assert total(scrape(mdir), "pyngora_requests_total") == 10


def test_the_archive_bounds_backend_labels_across_dead_workers(mdir: str) -> None:
    """Each worker bounds its own backend labels (MAX_NAMES); workers restarted one after
    another, each meeting other backends (a forward proxy), grew the archive by MAX_NAMES
    series each. Past the bound, the archive counts them as "other"; totals stay exact."""
    d = multiproc.METRICS["pyngora_upstream_errors_total"]
    r = multiproc.METRICS["pyngora_upstream_requests_total"]
    cap = multiproc.MAX_NAMES
    for n, pid in enumerate((999_999_1, 999_999_2, 999_999_3)):
        pf = multiproc.ProcessFiles(mdir, pid=pid)
        for i in range(cap):  # each worker: MAX_NAMES backends of its own, 2 errors each
            pf.add(d.prefix, multiproc.sample_key(d, ("up", f"10.0.{n}.{i}:80", "ConnectRefused")),
                   2)
        # answers from backends met last: named in both families, or in neither
        pf.add(r.prefix, multiproc.sample_key(r, ("up", f"10.0.{n}.0:80", "200")), 1)
        pf.add(d.prefix, multiproc.sample_key(d, ("other-up", "10.9.9.9:80", "ReadError")), 1)
        pf.write()
        assert multiproc.mark_process_dead(pid) is True
    got = scrape(mdir)
    backends = {dict(labels)["backend"] for (name, labels) in got
                if name == "pyngora_upstream_errors_total" and dict(labels)["upstream"] == "up"}
    assert len(backends) == cap + 1 and multiproc.OTHER in backends
    assert backends - {multiproc.OTHER} == {f"10.0.0.{i}:80" for i in range(cap)}  # the first
    assert total(got, "pyngora_upstream_errors_total") == 3 * (cap * 2 + 1)
    answered = {dict(labels)["backend"] for (name, labels) in got
                if name == "pyngora_upstream_requests_total"}
    assert answered == {"10.0.0.0:80", multiproc.OTHER}  # as in the errors family
    assert total(got, "pyngora_upstream_requests_total") == 3
    assert {dict(labels)["backend"] for (name, labels) in got
            if dict(labels).get("upstream") == "other-up"} == {"10.9.9.9:80"}


def test_prepare_dir_fresh_and_upgrade(tmp_path, monkeypatch) -> None:
    d = str(tmp_path / "m")
    monkeypatch.setenv(multiproc.ENV_VAR, "unused")
    multiproc.prepare_dir(d, fresh=True)
    assert os.environ[multiproc.ENV_VAR] == d
    pf = multiproc.ProcessFiles(d, pid=4242)
    dd = multiproc.METRICS["pyngora_reloads_total"]
    pf.add(dd.prefix, multiproc.sample_key(dd, ()), 2)
    pf.write()
    (tmp_path / "m" / "notes.txt").write_text("not ours")
    (tmp_path / "m" / ".counter_1-pyngora.db.77.tmp").write_bytes(b"")
    multiproc.prepare_dir(d, fresh=False)  # an upgrade: old workers still write here
    assert "counter_4242-pyngora.db" in os.listdir(d)
    multiproc.prepare_dir(d, fresh=True)  # a cold start
    assert sorted(os.listdir(d)) == [".pyngora.lock", ".pyngora.owner", "notes.txt"]


def test_fresh_start_refuses_a_directory_of_another_live_master(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys
    d = str(tmp_path / "m")
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pyngora"])
    try:
        from tests.support import wait_for

        def execed() -> bool:  # until exec, the child still shows the parent's command line
            with open(f"/proc/{other.pid}/cmdline", "rb") as f:
                return b"pyngora" in f.read()
        wait_for(execed, 10, "the stand-in master to exec")
        os.makedirs(d)
        with open(os.path.join(d, multiproc.OWNER_NAME), "w") as f:
            f.write(str(other.pid))
        with pytest.raises(multiproc.MetricsDirInUse):
            multiproc.prepare_dir(d, fresh=True)
        multiproc.prepare_dir(d, fresh=False)  # an upgrade: not the owner until it serves
        with open(os.path.join(d, multiproc.OWNER_NAME)) as f:
            assert f.read().strip() == str(other.pid)
        multiproc.master_exit()  # a failed upgrade's master leaves the owner as it was
        with open(os.path.join(d, multiproc.OWNER_NAME)) as f:
            assert f.read().strip() == str(other.pid)
        multiproc.claim_dir(d)  # the old master took the hand-over
        with open(os.path.join(d, multiproc.OWNER_NAME)) as f:
            assert f.read().strip() == str(os.getpid())
    finally:
        other.kill()
        other.wait()
    with open(os.path.join(d, multiproc.OWNER_NAME), "w") as f:
        f.write(str(other.pid))  # dead now: stale, not an owner
    multiproc.prepare_dir(d, fresh=True)
    multiproc.master_exit()
    assert multiproc.OWNER_NAME not in os.listdir(d)
    # A recycled pid now held by a process that merely names pyngora is no owner.
    tail = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "/var/log/pyngora/error.log"])
    try:
        wait_for(lambda: b"error.log" in open(f"/proc/{tail.pid}/cmdline", "rb").read(), 10,
                 "the stand-in to exec")
        with open(os.path.join(d, multiproc.OWNER_NAME), "w") as f:
            f.write(str(tail.pid))
        multiproc.prepare_dir(d, fresh=True)
    finally:
        tail.kill()
        tail.wait()


def test_master_metrics_and_master_exit(mdir: str) -> None:
    def master() -> None:
        multiproc.build_info("1.2.3", python="3.11.7")
        multiproc.workers("web", 4)
        multiproc.workers("web", 3)
        multiproc.worker_restart("web")
        multiproc.worker_restart("web")
        multiproc.upgrade()
        multiproc.upgrade_failed()
        multiproc.reload()

    pid = fork(master)
    try:
        assert reap(pid) == 0
        # The child is reaped but not marked: its pid no longer exists, so the exporter
        # drops its live gauges by itself (a master killed with SIGKILL).
        s = scrape(mdir)
        assert total(s, "pyngora_workers") == 0
        assert total(s, "pyngora_worker_restarts_total", service="web") == 2
        assert total(s, "pyngora_upgrades_total") == 1
        assert total(s, "pyngora_upgrade_failures_total") == 1
        assert total(s, "pyngora_reloads_total") == 1
    finally:
        kill_all([])

    # In this process (alive): the gauges show, then master_exit archives and drops them.
    master()
    s = scrape(mdir)
    assert total(s, "pyngora_workers", service="web") == 3
    assert total(s, "pyngora_build_info", version="1.2.3", python="3.11.7") == 1
    multiproc.master_exit()
    s = scrape(mdir)
    assert total(s, "pyngora_workers") == 0
    assert total(s, "pyngora_build_info") == 0
    assert total(s, "pyngora_worker_restarts_total", service="web") == 4
    assert total(s, "pyngora_reloads_total") == 2
    assert not [n for n in os.listdir(mdir) if f"_{os.getpid()}" in n]


def test_master_side_module_imports_no_prometheus_client() -> None:
    """DESIGN rule 5: the master imports multiproc; it must not pull in prometheus_client."""
    import subprocess
    import sys
    code = ("import sys, pyngora.metrics.multiproc; "
            "print(any(m.startswith('prometheus_client') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


def test_a_background_service_starts_no_request_series(mdir: str) -> None:
    """A health prober published a request histogram, byte counters and a live connections
    gauge, all 0 for ever; an HTTP service still gets its series at zero."""
    import asyncio
    from types import SimpleNamespace

    from pyngora.server import worker

    def start(name: str, http: bool) -> Callable[[], None]:
        def body() -> None:
            loop = asyncio.new_event_loop()
            ctx = SimpleNamespace(state={})
            assert worker._start_metrics(name, ctx, loop, http=http) is registry
            assert ("service_metrics" in ctx.state) is http
        return body

    pids = [fork(start("health-proxy", False)), fork(start("web", True))]
    assert [reap(p) for p in pids] == [0, 0]
    services = {dict(labels).get("service") for (_, labels) in scrape(mdir)}
    assert "web" in services and "health-proxy" not in services
