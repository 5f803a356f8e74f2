"""pyngora against nginx, in the same run, on the same pinned cores.

    .venv/bin/python -m tests.bench.run [--quick] [--scenarios static,small,...] [--runs N]
        [--duration S] [--no-profile] [--idle-conns N] [--no-record] [--json FILE]

Layout (tests/bench/README.md): the proxy under test (pyngora master + one worker per service,
or nginx with one worker) on core 0; the origin (nginx, one worker) and the load generator
on core 1. Both proxies run for the whole session; each scenario alternates nginx, pyngora,
nginx, pyngora, ... and reports the median run of each. A full run appends a dated section
to tests/bench/RESULTS.md. Everything started is killed (process groups) at the end, on an
error, and on Ctrl-C.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tests.bench import configs
from tests.bench.memory import IdleConnResult, hold_idle_connections
from tests.bench.pyspy import Profile, profile_worker, py_spy
from tests.bench.report import (SCENARIOS, Row, Scenario, memory_text, profile_text, record,
                                table, versions)
from tests.bench.syscalls import SyscallCount, count_syscalls, syscalls_text
from tests.bench.tools import (LoadResult, Procs, children, cpu_seconds, free_port,
                               parse_h2load, parse_wrk, pin, rss_kib, title, wait_until)

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable


# --- the servers ---------------------------------------------------------------------------

@dataclass
class Ports:
    static: int
    proxy: Optional[int]
    h2: Optional[int]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET on a fresh connection; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "pyngora-bench"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def answers(port: int, path: str, expect: bytes | int) -> str:
    """'' when ``port`` answers ``path`` with 200 and the expected body (or body length),
    else why not."""
    try:
        status, body = http_get(port, path)
    except OSError as e:
        return f"GET {path}: {e!r}"
    ok_body = len(body) == expect if isinstance(expect, int) else body == expect
    if status != 200 or not ok_body:
        return f"GET {path}: status {status}, {len(body)} body bytes"
    return ""


def answers_h2(port: int) -> str:
    """'' when ``port`` answers an HTTP/2 prior-knowledge GET with 200, else why not."""
    if shutil.which("curl") is None:
        return "curl is not installed"
    try:
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "3",
                              "--http2-prior-knowledge", "-w", "%{http_version} %{http_code}",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "h2c GET: no answer"
    return "" if out.stdout.strip() == "2 200" else f"h2c GET: {out.stdout.strip() or 'failed'}"


def wait_answers(port: int, path: str, expect: bytes | int, proc: subprocess.Popen,
                 timeout: float = 20.0) -> str:
    """Wait for ``port`` to answer; '' or the last reason (also when ``proc`` exited)."""
    last = ["not tried"]

    def ready() -> bool:
        if proc.poll() is not None:
            last[0] = f"exited with {proc.returncode}"
            return True
        last[0] = answers(port, path, expect)
        return not last[0]

    wait_until(ready, timeout, 0.1)
    return last[0]


def start_nginx(procs: Procs, name: str, conf: str, d: Path, cpu: Optional[str]
                ) -> subprocess.Popen:
    """nginx in the foreground (daemon off) with its prefix, config and error log in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(conf)
    return procs.start(name, pin(cpu, ["nginx", "-p", str(d), "-e", str(d / "error.log"),
                                      "-c", str(d / "nginx.conf")]), signal.SIGTERM)


def start_pyngora(procs: Procs, tmp: Path, origin_port: int, want_proxy: bool, want_h2: bool,
                  cpu: Optional[str], tag: str = "pyngora", extra_env: Optional[dict[str, str]] = None,
                  cwd: Path = ROOT) -> tuple[subprocess.Popen, Ports, dict[str, str]]:
    """Start pyngora with as much as it can serve: proxy + h2c, else proxy, else static only.

    ``tag`` names its processes and config files (a second instance needs its own);
    ``extra_env`` is added to its environment (``PYNGORA_METRICS=off`` for --metrics);
    ``cwd`` is where ``python -m pyngora`` runs, so whose ``pyngora`` package it imports
    (another tree for --compare-tree).
    Returns the master, its ports and, per target it cannot serve ("proxy", "h2"), why.
    """
    why: dict[str, str] = {}
    attempts = []
    if want_proxy and want_h2:
        attempts.append((True, True))
    if want_proxy:
        attempts.append((True, False))
    attempts.append((False, False))
    for n, (proxy, h2) in enumerate(attempts):
        ports = Ports(free_port(), free_port() if proxy else None, free_port() if h2 else None)
        conf = tmp / f"{tag}-{n}.yaml"
        conf.write_text(configs.pyngora_conf(tmp, ports.static, ports.proxy, ports.h2,
                                             origin_port))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        master = procs.start(f"{tag}-{n}", pin(cpu, [PY, "-m", "pyngora", "-c", str(conf)]),
                             signal.SIGINT, env=env, cwd=cwd)
        reason = wait_answers(ports.static, "/", configs.SMALL_BODY.encode(), master)
        if reason:
            tail = procs.log_tail(f"{tag}-{n}", 4).replace("\n", " / ")
            failed = "h2" if h2 else "proxy" if proxy else "static"
            why[failed] = f"pyngora did not start with it: {reason}: {tail}"
            if failed == "proxy":
                why.setdefault("h2", why["proxy"])
            procs.stop(master)
            continue
        if not proxy:
            why.setdefault("proxy", "http_proxy service not started")
        else:
            reason = wait_answers(ports.proxy, "/", configs.SMALL_BODY.encode(), master, 5)
            if reason:
                why["proxy"] = f"http_proxy does not answer ({reason})"
        if not h2:
            why.setdefault("h2", why.get("proxy", "h2c listener not started"))
        elif "proxy" in why:
            why["h2"] = why["proxy"]
        else:
            reason = answers_h2(ports.h2)
            if reason:
                why["h2"] = f"h2c listener does not answer ({reason})"
        return master, ports, why
    raise RuntimeError(f"pyngora does not start even with the static service only: {why}")


def workers_of(master: int) -> dict[str, int]:
    """{title: pid} of the master's children."""
    return {title(p) or str(p): p for p in children(master)}


def worker_for(master: int, service: str) -> Optional[int]:
    """The pid of ``service``'s first worker (pyngora titles: 'pyngora: worker SERVICE/N')."""
    for t, pid in workers_of(master).items():
        if f"worker {service}/" in t:
            return pid
    return None


# --- the load ------------------------------------------------------------------------------

def load_command(s: Scenario, port: int, seconds: int, conns: int, cpu: Optional[str],
                 log: Path) -> list[str]:
    """The exact load-generator command for ``s`` against ``port``."""
    url = f"http://127.0.0.1:{port}{s.path}"
    if s.target == "h2":
        return pin(cpu, ["h2load", "-c", "10", "-m", "100", "-t", "1", "-D", str(seconds),
                         "--log-file", str(log), url])
    cmd = ["wrk", "-c", str(conns), "-t", "1", "-d", f"{seconds}s", "--latency"]
    if s.close:
        cmd += ["-H", "Connection: close"]
    return pin(cpu, cmd + [url])


def run_load(procs: Procs, s: Scenario, port: int, seconds: int, conns: int,
             cpu: Optional[str], tmp: Path, pids: tuple[int, ...] = ()
             ) -> tuple[LoadResult, str]:
    """One measured run; (result, the command as text). ``pids``: the server's processes,
    whose CPU time during the run goes into the result."""
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    argv = load_command(s, port, seconds, conns, cpu, log)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    out = procs.run(argv[0] if argv[0] != "taskset" else argv[3], argv, timeout=seconds + 60)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    result = parse_h2load(out, log) if s.target == "h2" else parse_wrk(out)
    if pids:
        result.cpu_s, result.wall_s = cpu1 - cpu0, t1 - t0
    shown = [a if a != str(log) else "LOG" for a in argv]
    return result, " ".join(shlex.quote(a) for a in shown)


# --- reporting -----------------------------------------------------------------------------

# --- main ----------------------------------------------------------------------------------

def metrics_comparison(procs: Procs, a: argparse.Namespace, tmp: Path, origin_port: int,
                       master_on: int, port_on: int) -> str:
    """Issue 7 point 4: what the worker's metrics cost on the request path: the small
    scenario against pyngora and against a second one with ``PYNGORA_METRICS=off``."""
    return pyngora_ab(procs, a, tmp, origin_port, "metrics on", master_on, port_on,
                      "metrics off", {"PYNGORA_METRICS": "off"}, ROOT,
                      "Metrics on vs off (the small scenario, pyngora against itself: a second "
                      "instance with `PYNGORA_METRICS=off`, alternating runs, medians):",
                      "Metrics cost")


def pyngora_ab(procs: Procs, a: argparse.Namespace, tmp: Path, origin_port: int,
               label_a: str, master_a: int, port_a: int, label_b: str,
               env_b: dict[str, str], cwd_b: Path, title_text: str, cost_text: str) -> str:
    """pyngora against a variant of itself, on the same core, in the same run.

    Starts a second pyngora (same configuration) with ``env_b`` added to its environment and
    ``cwd_b`` as its working directory (its ``pyngora`` package), runs the small scenario
    against the two alternately (``--runs`` each, after a warm-up) and returns a markdown
    table of the medians with the CPU per request of each and the difference (a - b).
    """
    s = SCENARIOS["small"]
    tag = "pyngora-" + "".join(c if c.isalnum() else "-" for c in label_b)
    sub = tmp / tag  # its own pid file, sockets and logs
    sub.mkdir(exist_ok=True)
    master_off, ports_off, why = start_pyngora(procs, sub, origin_port, True, False,
                                               a.proxy_cpu, tag=tag, extra_env=env_b,
                                               cwd=cwd_b)
    try:
        if "proxy" in why:
            return f"{cost_text}: skipped (the {label_b} pyngora: {why['proxy']})"
        arms = {label_a: (master_a, port_a), label_b: (master_off.pid, ports_off.proxy)}
        runs: dict[str, list[LoadResult]] = {k: [] for k in arms}
        if not a.quick:
            for _, port in arms.values():
                run_load(procs, s, port, 2, a.connections, a.load_cpu, tmp)
        for i in range(a.runs):
            for arm, (pid, port) in arms.items():
                pids = (pid,) + tuple(children(pid))
                result, _ = run_load(procs, s, port, a.duration, a.connections, a.load_cpu,
                                     tmp, pids)
                runs[arm].append(result)
                print(f"bench: a/b  {arm:20s} run {i + 1}: {result.rps:10.0f} req/s "
                      f"cpu {result.cpu_share:.2f} errors {result.errors}",
                      file=sys.stderr, flush=True)
    finally:
        procs.stop(master_off)

    def med(xs: list[float]) -> float:
        xs = sorted(x for x in xs if x == x)  # NaN-free
        return xs[len(xs) // 2] if xs else float("nan")

    lines = [title_text, "",
             "| pyngora | req/s | CPU | req per CPU-s | CPU us per request | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    us = {}
    for arm, rs in runs.items():
        per = med([r.per_cpu_s for r in rs])
        us[arm] = 1e6 / per if per == per and per else float("nan")
        lines.append(f"| {arm} | {med([r.rps for r in rs]):.0f} | "
                     f"{med([r.cpu_share for r in rs]):.2f} | {per:.0f} | {us[arm]:.1f} | "
                     f"{sum(r.errors for r in rs)} |")
    cost = us[label_a] - us[label_b]
    share = cost / us[label_a] * 100 if us[label_a] else float("nan")
    noise = "; within the run-to-run noise" if abs(cost) < 2 else ""
    lines += ["", f"{cost_text}: {cost:+.1f} us of CPU per request ({share:+.0f} % of the "
                  f"{label_a} figure{noise})."]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 s per run, 1 run, no warm-up, no profile, 200 idle connections, "
                         "RESULTS.md untouched (the smoke test's mode)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, from {', '.join(SCENARIOS)}")
    ap.add_argument("--runs", type=int, default=3, help="runs per server, alternating")
    ap.add_argument("--duration", type=int, default=10, help="seconds per run")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--idle-conns", type=int, default=None,
                    help="idle keep-alive connections to hold (0: skip; default 10000, "
                         "200 with --quick)")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    ap.add_argument("--profile-seconds", type=int, default=10)
    ap.add_argument("--profile-out", type=Path,
                    help="copy py-spy's raw collapsed stacks here (flamegraph.pl, speedscope)")
    ap.add_argument("--no-syscalls", action="store_true",
                    help="skip the strace count of system calls per request")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--record", action="store_true", help="append to RESULTS.md even if --quick")
    ap.add_argument("--note", default="", help="a line saying what changed, for RESULTS.md")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--floor", action="store_true",
                    help="also measure tests/bench/floor.py (bare uvloop + httptools)")
    ap.add_argument("--floor-module", default="tests.bench.floor",
                    help="the floor column's program (tests.bench.lean, tests.bench.lean_raw: "
                         "minimal pooled proxies, see their docs)")
    ap.add_argument("--syscalls-scenario", default="small", choices=("small", "churn"),
                    help="which proxied scenario the syscall count traces")
    ap.add_argument("--profile-scenario", default="small", choices=("small", "large", "static", "h2"),
                    help="which scenario the profile samples")
    ap.add_argument("--metrics", action="store_true",
                    help="also run the small scenario against pyngora with metrics on vs a "
                         "second pyngora started with PYNGORA_METRICS=off, alternating")
    ap.add_argument("--compare-tree", type=Path,
                    help="also run the small scenario against a second pyngora imported from "
                         "this directory (e.g. `git archive HEAD pyngora | tar -x -C DIR`), "
                         "alternating: the effect of a change, measured in one run")
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.duration, a.no_profile, a.no_syscalls = 1, 1, True, True
    if a.idle_conns is None:
        a.idle_conns = 200 if a.quick else 10000
    a.names = [n.strip() for n in a.scenarios.split(",") if n.strip()]
    unknown = [n for n in a.names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    if len(os.sched_getaffinity(0)) < 2:
        a.proxy_cpu = a.load_cpu = None  # one core: pinning would only serialise everything
    return a


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every server started)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: end the run the way Ctrl-C does, through main's ``finally``."""
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "curl") if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    started = dt.datetime.now(dt.timezone.utc)
    env_line = versions()
    tmp = Path(tempfile.mkdtemp(prefix="pyngora-bench-"))
    tmp.chmod(0o755)  # nginx workers run as nobody when the bench runs as root
    procs = Procs(tmp)
    # SIGTERM ends the run like Ctrl-C: through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)
    rows: list[Row] = []
    idle: dict[str, dict[str, int]] = {}
    conns: dict[str, IdleConnResult | str] = {}
    conns_target = ""
    prof: Optional[Profile] = None
    prof_what = ""
    prof_error = ""
    sysc: dict[str, SyscallCount] = {}
    sysc_what = ""
    metrics_text = ""
    try:
        # The origin, on the load generator's core.
        www = tmp / "www"
        www.mkdir()
        (www / configs.LARGE_PATH.lstrip("/")).write_bytes(os.urandom(configs.LARGE_SIZE))
        origin_port = free_port()
        origin = start_nginx(procs, "origin", configs.origin_conf(tmp / "origin", origin_port,
                                                                  www, nofile),
                             tmp / "origin", a.load_cpu)
        for path, expect in (("/", configs.SMALL_BODY.encode()),
                             (configs.LARGE_PATH, configs.LARGE_SIZE)):
            why = wait_answers(origin_port, path, expect, origin)
            if why:
                raise RuntimeError(f"origin nginx: {why}\n{procs.log_tail('origin')}")

        want = {SCENARIOS[n].target for n in a.names}
        want_h2 = "h2" in want and shutil.which("h2load") is not None
        ng_ports = Ports(free_port(), free_port(), free_port() if want_h2 else None)
        nginx = start_nginx(procs, "nginx", configs.nginx_conf(
            tmp / "nginx", ng_ports.static, ng_ports.proxy, ng_ports.h2, origin_port, nofile),
            tmp / "nginx", a.proxy_cpu)
        for port in (ng_ports.static, ng_ports.proxy):
            why = wait_answers(port, "/", configs.SMALL_BODY.encode(), nginx)
            if why:
                raise RuntimeError(f"nginx under test: {why}\n{procs.log_tail('nginx')}")

        master, py_ports, unavailable = start_pyngora(
            procs, tmp, origin_port, bool(want & {"proxy", "h2"}), want_h2, a.proxy_cpu)
        servers = ["nginx", "pyngora"]
        pid_of = {"nginx": nginx.pid, "pyngora": master.pid}
        fl_ports = Ports(free_port(), free_port(), free_port() if want_h2 else None)
        if a.floor:
            # A floor module may serve h2c too (tests.bench.h2_lean), on the port this names.
            env = dict(os.environ)
            if fl_ports.h2:
                env["PYNGORA_FLOOR_H2_PORT"] = str(fl_ports.h2)
            floor = procs.start("floor", pin(a.proxy_cpu, [
                PY, "-m", a.floor_module, str(fl_ports.static), str(fl_ports.proxy),
                str(origin_port), configs.SMALL_BODY]), signal.SIGKILL, env=env, cwd=ROOT)
            why = wait_answers(fl_ports.proxy, "/", configs.SMALL_BODY.encode(), floor)
            if why:
                raise RuntimeError(f"floor: {why}\n{procs.log_tail('floor')}")
            if fl_ports.h2 and answers_h2(fl_ports.h2):
                fl_ports.h2 = None  # (this floor module serves no h2c)
            servers.append("floor")
            pid_of["floor"] = floor.pid
        if "h2" in want and not want_h2:
            unavailable["h2"] = "h2load is not installed"
        for target, why in unavailable.items():
            print(f"bench: pyngora {target} scenarios skipped: {why}", file=sys.stderr)

        time.sleep(0.5)
        idle["pyngora"] = {"master": rss_kib(master.pid) or 0}
        for t, pid in workers_of(master.pid).items():
            idle["pyngora"][t.replace("pyngora: ", "")] = rss_kib(pid) or 0
        idle["nginx"] = {"master": rss_kib(nginx.pid) or 0}
        for pid in children(nginx.pid):
            idle["nginx"][f"worker {pid}"] = rss_kib(pid) or 0

        for name in a.names:
            s = SCENARIOS[name]
            row = Row(name, s.text)
            rows.append(row)
            if s.target in unavailable:
                row.skipped = unavailable[s.target]
                continue
            ports = {"nginx": getattr(ng_ports, s.target), "pyngora": getattr(py_ports, s.target),
                     "floor": getattr(fl_ports, s.target)}
            here = [x for x in servers if ports[x]]
            if not a.quick:  # warm-up: upstream pools, caches, the CPU's frequency
                for server in here:
                    run_load(procs, s, ports[server], 2, a.connections, a.load_cpu, tmp)
            for i in range(a.runs):
                for server in here:
                    pids = (pid_of[server],) + tuple(children(pid_of[server]))
                    result, cmd = run_load(procs, s, ports[server], a.duration, a.connections,
                                           a.load_cpu, tmp, pids)
                    row.runs[server].append(result)
                    row.commands[server] = cmd
                    print(f"bench: {name:13s} {server:8s} run {i + 1}: {result.rps:10.0f} req/s "
                          f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms "
                          f"cpu {result.cpu_share:.2f} errors {result.errors}",
                          file=sys.stderr, flush=True)

        if a.metrics:  # (metrics_text also collects --compare-tree's table below)
            if "proxy" in unavailable:
                metrics_text = f"Metrics on vs off: skipped ({unavailable['proxy']})"
            else:
                metrics_text = metrics_comparison(procs, a, tmp, origin_port, master.pid,
                                                  py_ports.proxy)
        if a.compare_tree is not None:
            if "proxy" in unavailable:
                text = f"Compared with {a.compare_tree}: skipped ({unavailable['proxy']})"
            else:
                text = pyngora_ab(
                    procs, a, tmp, origin_port, "this tree", master.pid, py_ports.proxy,
                    "other tree", {}, a.compare_tree.resolve(),
                    f"This tree against `{a.compare_tree}` (the small scenario, alternating "
                    "runs, medians):", "This tree minus the other")
            metrics_text = (metrics_text + "\n\n" + text) if metrics_text else text

        target = "proxy" if "proxy" not in unavailable else "static"
        if not a.no_profile:
            service = "static" if a.profile_scenario == "static" else target
            pid = worker_for(master.pid, service)
            s = SCENARIOS[a.profile_scenario if a.profile_scenario in ("small", "large")
                          and service == "proxy" else "small" if service == "proxy" else "static"]
            port = getattr(py_ports, service)
            prof_what = f"the {s.name} scenario (wrk -c {a.connections}, keep-alive)"
            if a.profile_scenario == "h2" and py_ports.h2:
                s, port = SCENARIOS["h2"], py_ports.h2  # the h2c listener of the proxy service
                prof_what = "the h2 scenario (h2load -c 10 -m 100)"
            if pid is None or py_spy() is None:
                prof_error = "no worker found" if pid is None else "py-spy is not installed"
            else:
                argv = load_command(s, port, a.profile_seconds + 2,
                                    a.connections, a.load_cpu, tmp / "unused.log")
                try:
                    prof = profile_worker(procs, pid, argv, a.profile_seconds,
                                          tmp / "profile.raw")
                    if a.profile_out:
                        shutil.copy(tmp / "profile.raw", a.profile_out)
                except RuntimeError as e:
                    prof_error = str(e)

        if not a.no_syscalls:
            s = SCENARIOS[a.syscalls_scenario if target == "proxy" else "static"]
            sysc_what = f"the {s.name} scenario, 3 s"
            for server, port, pid in (
                    ("nginx", getattr(ng_ports, target), (children(nginx.pid) or [0])[0]),
                    ("pyngora", getattr(py_ports, target), worker_for(master.pid, target) or 0)):
                argv = load_command(s, port, 3, a.connections, a.load_cpu, tmp / "unused.log")
                try:
                    sysc[server] = count_syscalls(procs, pid, argv, 3, tmp / f"strace-{server}")
                except RuntimeError as e:
                    print(f"bench: syscall count of {server} failed: {e}", file=sys.stderr)

        if a.idle_conns > 0:
            conns_target = target
            need = a.idle_conns + 200
            if nofile < need:
                a.idle_conns = max(0, nofile - 500)
            for server, port, pid in (
                    ("nginx", getattr(ng_ports, target), (children(nginx.pid) or [0])[0]),
                    ("pyngora", getattr(py_ports, target), worker_for(master.pid, target) or 0)):
                if not pid:
                    conns[server] = "worker not found"
                    continue
                # Twice: the second round shows whether the first one's memory is reused
                # (allocator keeps it) or grows again (a leak per connection).
                for rnd in (1, 2):
                    conns[f"{server} round {rnd}"] = hold_idle_connections(
                        port, pid, a.idle_conns, pause=0.5 if a.quick else 2.0)
                    if a.quick:
                        break
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if a.keep_tmp:
            print(f"bench: configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    report = table(rows, a.floor)
    mem = memory_text(idle, conns, conns_target)
    print(report)
    print()
    print(mem)
    if prof is not None:
        print()
        print(profile_text(prof, prof_what))
    elif prof_error:
        print(f"\nprofile: {prof_error}")
    sys_text = syscalls_text(sysc, sysc_what) if sysc else ""
    if metrics_text:  # printed (and recorded) with the system calls' text below
        sys_text = metrics_text + ("\n\n" + sys_text if sys_text else "")
    if sys_text:
        print()
        print(sys_text)
    if a.json:
        a.json.write_text(json.dumps({
            "started": started.isoformat(), "env": env_line,
            "rows": [{"scenario": r.scenario, "skipped": r.skipped, "commands": r.commands,
                      "runs": {k: [dict(asdict(x), raw="") for x in v]
                               for k, v in r.runs.items()}} for r in rows],
            "idle_rss_kib": idle,
            "idle_conns": {k: (asdict(v) if isinstance(v, IdleConnResult) else v)
                           for k, v in conns.items()},
        }, indent=1))
    if (not a.quick and not a.no_record) or a.record:
        record(started, a, env_line, rows, report, mem + ("\n\n" + sys_text if sys_text else ""),
               prof, prof_what, prof_error)
    return 0



if __name__ == "__main__":
    sys.exit(main())
