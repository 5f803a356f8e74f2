"""The master stays small (issue 9: idle RSS <= 30 MiB): it plans YAML services and never
builds them, so the service rooms (asyncio, ssl, h2, httptools, the proxy engine, the user's
apps) are imported only in the check child, in ``-t`` and in the workers, after fork.

The RSS figure is a hard budget from the issue, not a timing; it is printed (``-s``) so a
run records it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.support import ROOT, Pyngora, free_port, get, port_open, wait_for

PY = sys.executable
RSS_BUDGET_KIB = 30 * 1024
# What the master must not import (DESIGN rule 5, and what those pull in after them).
HEAVY = ("uvloop", "httptools", "h2", "prometheus_client", "asyncio", "ssl",
         "pyngora.proxy", "pyngora.lb", "pyngora.services", "pyngora.protocols",
         "pyngora.upstreams", "pyngora.metrics.service")
# Extension modules whose shared objects would show in the master's memory map.
HEAVY_SO = ("uvloop", "httptools", "/_ssl.", "/_asyncio.")

BG_APP = '''
class Sleeper:
    """Ready at once; runs until shutdown."""

    async def start_with_ready_notifier(self, shutdown, ready):
        ready.notify_ready()
        await shutdown
'''


def _config(tmp, static_port: int, proxy_port: int, metrics_port: int) -> str:
    """quickstart.yaml's shape: a static origin, an http_proxy with a health-checked
    upstream (so a prober process too), Prometheus metrics, and a background app."""
    return textwrap.dedent(f"""\
        pid_file: {tmp}/p.pid
        upgrade_sock: {tmp}/u.sock
        error_log: {tmp}/error.log
        metrics_dir: {tmp}/metrics
        threads: 1
        services:
          - name: origin
            type: static
            listeners: ["127.0.0.1:{static_port}"]
            body: "hello\\n"
          - name: proxy
            type: http_proxy
            listeners: ["127.0.0.1:{proxy_port}"]
            upstreams:
              - name: origin
                backends: [{{addr: "127.0.0.1:{static_port}"}}]
                health_check: {{type: tcp, interval_seconds: 5}}
          - name: metrics
            type: prometheus
            listeners: ["127.0.0.1:{metrics_port}"]
          - name: bg
            type: background
            app: "sleeperapp:Sleeper"
        """)


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


def test_master_rss_is_under_budget_and_maps_no_heavy_extension(tmp_path,
                                                                record_property) -> None:
    (tmp_path / "sleeperapp.py").write_text(BG_APP)
    static_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    server = Pyngora(tmp_path, _config(tmp_path, static_port, proxy_port, metrics_port))
    server.start()
    try:
        server.wait_serving(proxy_port)
        wait_for(lambda: "pyngora serving" in (tmp_path / "error.log").read_text(), 20,
                 "the master to report serving")
        assert port_open(static_port) and port_open(metrics_port)
        assert get(proxy_port)[0] == 200  # the workers built what the master only planned
        rss = _status(server.pid, "VmRSS")
        workers = [(p, _status(p, "VmRSS")) for p in server.workers()]
        print(f"\nmaster VmRSS {rss / 1024:.1f} MiB; workers "
              + ", ".join(f"{r / 1024:.1f}" for _, r in workers) + " MiB")
        record_property("master_vmrss_kib", rss)
        assert rss < RSS_BUDGET_KIB, f"master VmRSS {rss} KiB >= {RSS_BUDGET_KIB} KiB"
        with open(f"/proc/{server.pid}/maps") as f:
            maps = f.read()
        assert [so for so in HEAVY_SO if so in maps] == []
    finally:
        server.stop()


def test_the_master_path_imports_no_service_room(tmp_path) -> None:
    """What ``pyngora -c`` runs before it forks a worker: load, plan (with its check child),
    and the master's modules, in a fresh interpreter."""
    (tmp_path / "sleeperapp.py").write_text(BG_APP)
    conf = tmp_path / "c.yaml"
    conf.write_text(_config(tmp_path, free_port(), free_port(), free_port()))
    code = textwrap.dedent(f"""\
        import json, sys
        from pyngora import cli
        from pyngora.config.loader import load
        import pyngora.server.master, pyngora.server.daemon, pyngora.server.systemd
        import pyngora.metrics.multiproc, pyngora.upgrade.transfer_fd
        services = cli.plan_services(load({str(conf)!r}))
        print(json.dumps({{"modules": sorted(sys.modules),
                          "services": [s.name for s in services]}}))
        """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["services"] == ["origin", "health-proxy", "proxy", "metrics", "bg"]
    loaded = [m for m in result["modules"]
              if any(m == h or m.startswith(h + ".") for h in HEAVY) or m == "sleeperapp"]
    assert loaded == []


def test_a_bad_app_still_fails_the_start_with_its_line(tmp_path) -> None:
    """The check moved to a child: the operator still gets exit 1 and file:line, no worker."""
    port = free_port()
    server = Pyngora(tmp_path, f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
                     f"services:\n  - name: origin\n    type: static\n"
                     f"    listeners: ['127.0.0.1:{port}']\n    body: hi\n"
                     f"  - name: bg\n    type: background\n    app: 'nosuchmodule_xyz:Task'\n")
    out = server.run(timeout=60)
    assert out.returncode == 1, out
    assert f"{server.conf_path}:10: services[1].app: nosuchmodule_xyz:Task: No module" in out.stderr
    assert "nosuchmodule_xyz" in out.stderr
    assert not port_open(port)
    # the same text as -t, which builds in its own process
    checked = server.run("-t", timeout=60)
    assert checked.returncode == 1 and out.stderr in checked.stderr


def _shape(services) -> list[tuple]:
    return [(s.name, bool(s.is_background), s.threads, s.work_stealing, list(s.listeners),
             [d.name for d in s.dependencies]) for s in services]


def test_the_plan_is_what_the_build_makes(tmp_path, monkeypatch) -> None:
    """The master binds and forks from the plan; each worker builds the real service and
    checks it against the plan. Same names, listeners, threads, dependencies."""
    from pyngora import cli
    from pyngora.config.loader import load
    from pyngora.server.deferred import realize

    (tmp_path / "sleeperapp.py").write_text(BG_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = _config(tmp_path, free_port(), free_port(), free_port()).replace(
        "    type: static\n", "    type: static\n    threads: 3\n    work_stealing: false\n")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    conf = load(str(path))
    planned = cli.plan_services(conf)
    built = cli.build_services(conf)
    assert _shape(planned) == _shape(built)
    assert _shape([realize(p) for p in planned]) == [s[:5] + ([],) for s in _shape(built)]
