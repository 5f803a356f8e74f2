"""Metrics through the running server: exact counts across workers and kill -9, promtool on a
real scrape, a real Prometheus scraping pyngora, and an upgrade that keeps the endpoint up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.support import alive, children_of, free_port, get, title, wait_for


def _conf(tmp, origin: int, metrics: int) -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/error.log\n"
            f"metrics_dir: {tmp}/metrics\nthreads: 2\ngrace_period_seconds: 10\n"
            f"services:\n"
            f"  - name: origin\n    type: static\n    listeners: ['127.0.0.1:{origin}']\n"
            f"    body: hello\n"
            f"  - name: metrics\n    type: prometheus\n    listeners: ['127.0.0.1:{metrics}']\n")


def scrape(port: int) -> dict[str, float]:
    """Sample name with labels -> value, from the text format."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def requests_total(port: int, service: str = "origin") -> float:
    return sum(v for k, v in scrape(port).items()
               if k.startswith("pyngora_requests_total{") and f'service="{service}"' in k)


def durations_counted(port: int, service: str = "origin") -> float:
    return sum(v for k, v in scrape(port).items()
               if k.startswith("pyngora_request_duration_seconds_count{")
               and f'service="{service}"' in k)


@pytest.fixture
def server(tmp_path, pyngora_factory):
    origin, metrics = free_port(), free_port()
    p = pyngora_factory(_conf(tmp_path, origin, metrics)).start()
    p.wait_serving(origin)
    p.wait_serving(metrics)
    return p, origin, metrics


def test_process_metrics_describe_every_pyngora_process(server) -> None:
    """SPEC 8: "each process's standard process_* metrics": the master and each child (the
    workers of both services, the exporter itself), labelled by pid and title."""
    p, origin, metrics = server
    wait_for(lambda: len(children_of(p.pid)) == 3, 10, "2 origin workers and the exporter")
    pids = {p.pid} | set(children_of(p.pid))
    s = scrape(metrics)
    for family in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                   "process_open_fds", "process_start_time_seconds"):
        seen = {int(k.split('pid="', 1)[1].split('"', 1)[0]): v
                for k, v in s.items() if k.startswith(family + "{")}
        assert set(seen) == pids, (family, seen, pids)
    rss = {k: v for k, v in s.items() if k.startswith("process_resident_memory_bytes{")}
    assert any(f'pid="{p.pid}",process="master' in k for k in rss), rss
    assert sum(1 for k in rss if 'process="worker origin/' in k) == 2, rss
    assert all(v > 1_000_000 for v in rss.values()), rss


def test_counts_exact_across_workers_and_kill_9(server) -> None:
    p, origin, metrics = server
    n = 200
    for _ in range(n):
        get(origin, headers={"Connection": "close"})
    wait_for(lambda: requests_total(metrics) == n, 10, f"{n} requests counted")
    # A worker's flush writes its counter file, then its histogram file: a scrape may fall
    # between the two, so the histogram gets its own wait (it must reach n, never pass it).
    wait_for(lambda: durations_counted(metrics) == n, 10, f"{n} durations observed")
    assert requests_total(metrics) == n
    workers = [w for w in children_of(p.pid) if title(w).startswith("pyngora: worker origin")]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: not alive(workers[0]), 5, "the worker to die")
    m = 150
    for _ in range(m):
        get(origin, headers={"Connection": "close"})
    wait_for(lambda: requests_total(metrics) == n + m, 10, f"{n + m} requests counted")
    # the master counts the replacement when it is ready, maybe after the requests above
    wait_for(lambda: scrape(metrics).get('pyngora_workers{service="origin"}') == 2, 10,
             "the replacement worker counted")
    s = scrape(metrics)
    assert s['pyngora_worker_restarts_total{service="origin"}'] == 1
    wait_for(lambda: durations_counted(metrics) == n + m, 10, f"{n + m} durations observed")


def test_ten_thousand_urls_make_no_new_series(server) -> None:
    p, origin, metrics = server
    get(origin)
    wait_for(lambda: requests_total(metrics) == 1, 10, "the first request")
    # the exporter counts its own scrapes: let its series exist before taking the baseline
    wait_for(lambda: requests_total(metrics, "metrics") >= 1, 10, "a counted scrape")
    before = {k for k in scrape(metrics) if not k.startswith("process_")}
    import socket
    with socket.create_connection(("127.0.0.1", origin)) as s:  # keep-alive, 100 per write
        s.settimeout(30)
        for batch in range(100):
            s.sendall(b"".join(f"GET /item/{batch}-{i}?x={i} HTTP/1.1\r\nHost: x\r\n\r\n"
                               .encode() for i in range(100)))
            got = b""
            while got.count(b"HTTP/1.1 200") < 100:
                chunk = s.recv(1 << 20)
                assert chunk
                got += chunk
    wait_for(lambda: requests_total(metrics) == 10_001, 10, "all counted")
    after = {k for k in scrape(metrics) if not k.startswith("process_")}
    assert after - before == set(), after - before


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics_on_a_real_scrape(server) -> None:
    p, origin, metrics = server
    for _ in range(5):
        get(origin)
    wait_for(lambda: requests_total(metrics) == 5, 10, "requests counted")
    _, _, body = get(metrics, "/metrics")
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus not installed (Debian package prometheus)")
def test_real_prometheus_scrapes_pyngora(server, tmp_path) -> None:
    p, origin, metrics = server
    prom_port = free_port()
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: pyngora\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics}']}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path}/prom.yml",
                             f"--storage.tsdb.path={tmp_path}/tsdb",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(42):
            get(origin)

        def query() -> float:
            url = (f"http://127.0.0.1:{prom_port}/api/v1/query?query="
                   "sum(pyngora_requests_total%7Bservice%3D%22origin%22%7D)")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    data = json.load(r)
            except OSError:
                return 0.0
            result = data["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0
        wait_for(lambda: query() == 42, 60, "Prometheus to see 42 requests", interval=0.5)
    finally:
        os.killpg(prom.pid, signal.SIGKILL)
        prom.wait(10)


def test_endpoint_survives_upgrade_and_counters_never_go_back(server, tmp_path) -> None:
    p, origin, metrics = server
    for _ in range(30):
        get(origin)
    wait_for(lambda: requests_total(metrics) == 30, 10, "30 counted")
    r = p.run("-s", "upgrade")
    assert r.returncode == 0, r.stderr
    new = int((tmp_path / "p.pid").read_text())
    p.extra_pgids.add(os.getpgid(new))
    last = 0.0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # scrape while requests flow: never backwards
        get(origin)
        value = requests_total(metrics)
        assert value >= last, (value, last)
        last = value
    # the old master counts the upgrade once the new one is ready; it outlives that master
    wait_for(lambda: scrape(metrics)["pyngora_upgrades_total"] == 1, 10, "the upgrade counted")
    wait_for(lambda: not alive(p.pid), 20, "the old master")
    assert get(metrics, "/metrics")[0] == 200
    assert scrape(metrics)["pyngora_reloads_total"] == 0
    assert p.run("-s", "reload").returncode == 0  # (to the new master, by the pid file)
    wait_for(lambda: scrape(metrics)["pyngora_reloads_total"] == 1, 20, "the reload counted")
    assert scrape(metrics)["pyngora_upgrades_total"] == 1
    assert scrape(metrics)["pyngora_upgrade_failures_total"] == 0


def _owner(tmp_path) -> str:
    return (tmp_path / "metrics" / ".pyngora.owner").read_text().strip()


def test_a_second_server_on_the_same_metrics_dir_is_refused(server, tmp_path,
                                                            pyngora_factory) -> None:
    """It started with a warning, wiped nothing but counted nothing of its own, and its
    exporter served the first server's figures: now it does not start (exit 1, why)."""
    p, origin, metrics = server
    for _ in range(5):
        get(origin)
    wait_for(lambda: requests_total(metrics) == 5, 10, "5 counted")
    other = tmp_path / "other"
    other.mkdir()
    conf = _conf(other, free_port(), free_port()).replace(
        f"metrics_dir: {other}/metrics", f"metrics_dir: {tmp_path}/metrics")
    second = pyngora_factory(conf, name="other.yaml")
    r = second.run(timeout=30)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"metrics_dir {tmp_path}/metrics is in use by the pyngora master pid {p.pid}" \
        in r.stderr, r.stderr
    assert requests_total(metrics) == 5 and _owner(tmp_path) == str(p.pid)


def test_a_failed_upgrade_leaves_the_metrics_dir_to_the_serving_master(server, tmp_path,
                                                                      pyngora_factory) -> None:
    """The new master wrote itself in as the owner before the hand-over, and removed the
    file when it failed: the next server given the same directory wiped the serving one's
    counters."""
    p, origin, metrics = server
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:  # the new configuration cannot bind: the upgrade fails, the old master serves on
        p.conf_path.write_text(p.conf_path.read_text() + (
            f"  - name: clash\n    type: static\n"
            f"    listeners: ['127.0.0.1:{taken.getsockname()[1]}']\n"))
        r = p.run("-s", "upgrade")
        assert r.returncode != 0, r.stdout
    finally:
        taken.close()
    assert alive(p.pid) and get(origin)[0] == 200
    assert _owner(tmp_path) == str(p.pid)
    wait_for(lambda: requests_total(metrics) == 1, 10, "the old master's count")


def test_a_reload_makes_a_deleted_metrics_dir_again(server, tmp_path) -> None:
    """rm -rf of the metrics directory: the exporter answered 503 until an upgrade; now a
    reload makes it again (the counts start over)."""
    p, origin, metrics = server

    def removed() -> bool:  # (a worker's flush may land in it while rmtree empties it)
        shutil.rmtree(tmp_path / "metrics", ignore_errors=True)
        return not (tmp_path / "metrics").exists()
    wait_for(removed, 10, "the metrics directory removed")
    assert get(metrics, "/metrics")[0] == 503
    assert p.run("-s", "reload").returncode == 0
    wait_for(lambda: get(metrics, "/metrics")[0] == 200, 20, "the exporter to answer again")
    assert (tmp_path / "metrics" / ".pyngora.owner").read_text().strip() == str(p.pid)
    for _ in range(3):
        get(origin)
    wait_for(lambda: requests_total(metrics) == 3, 10, "3 new requests counted")
