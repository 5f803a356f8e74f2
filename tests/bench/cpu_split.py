"""Where a proxied request's CPU goes, kernel included: nginx and pyngora, same run, same cores.

    .venv/bin/python -m tests.bench.cpu_split [--scenarios small,large,churn,h2] [--runs 3]
        [--duration 4]

py-spy (``tests.bench.run``'s profile) sees Python frames only; a request's system calls, the
kernel's TCP work and uvloop's C show there as one opaque ``_serve``. This samples the proxy's
core with ``perf record -C`` (every process and the kernel, at perf's default rate) while the
bench's load command (``wrk``; ``h2load`` for h2) runs in the bench's layout
(``tests.bench.run``: proxy on core 0, origin and load on core 1), and splits each server's
CPU seconds per request by where the samples fell:

- ``kernel``: system calls, TCP/IP over loopback, wake-ups, the epoll wait;
- ``python``: the interpreter (libpython), pyngora's code and the standard library;
- ``uvloop`` / ``httptools``: their compiled extensions (libuv is linked into uvloop);
- ``nginx``: nginx's own binary; ``libc``: memcpy, malloc; ``other``: the rest.

A server's CPU per request is its processes' CPU time (``/proc``) over the requests done;
each category is that times its share of the server's samples. Each run alternates the
servers; the median run (by CPU per request; the upper middle one for an even ``--runs``) is
reported. The last column answers the question a target asks: one core serving the target
ratio of nginx's req/s has ``1e6 / (target x nginx req/s)`` us per request; what is left of
that for pyngora's user space once its kernel time is paid (the same system calls as nginx's).

Needs ``perf`` (Debian: ``linux-perf``) with ``perf_event_paranoid`` allowing CPU-wide
sampling (root does). Figures go to stdout as a markdown table, for tests/bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tests.bench import configs
from tests.bench.report import SCENARIOS, Scenario
from tests.bench.run import (Ports, free_port, load_command, raise_nofile, start_nginx,
                             start_pyngora, wait_answers)
from tests.bench.tools import Procs, children, cpu_seconds, parse_h2load, parse_wrk

CATEGORIES = ("kernel", "python", "uvloop", "httptools", "nginx", "libc", "other")
# perf's comm is the first 15 bytes of the process title (setproctitle's for pyngora).
COMMS = {"nginx": ("nginx",), "pyngora": ("pyngora: worker", "pyngora: master")}
_LINE = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s{2,}(\S.*?)\s*$")


def category(dso: str) -> str:
    """The CATEGORIES entry of a perf DSO name."""
    if dso.startswith("[") and dso not in ("[vdso]", "[unknown]"):
        return "kernel"  # the kernel and its modules ([nf_conntrack], ...)
    if "libpython" in dso or dso.startswith("python"):
        return "python"
    if dso.startswith("loop.cpython"):
        return "uvloop"
    if dso.startswith("parser.cpython") or dso.startswith("url_parser.cpython"):
        return "httptools"
    if dso == "nginx":
        return "nginx"
    if dso.startswith("libc.so") or dso.startswith("libm.so"):
        return "libc"
    return "other"


def shares(report: str, comms: tuple[str, ...]) -> dict[str, float]:
    """{category: share of ``comms``' samples} from ``perf report --sort comm,dso``."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for line in report.splitlines():
        m = _LINE.match(line)
        if m is None or not m.group(2).startswith(comms):
            continue
        out[category(m.group(3))] += float(m.group(1))
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total else out


@dataclass
class Split:
    """One server's run: CPU microseconds per request, and by category."""
    server: str
    rps: float
    us_per_request: float
    us: dict[str, float] = field(default_factory=dict)


def measure(procs: Procs, server: str, port: int, root_pid: int, s: Scenario,
            seconds: int, proxy_cpu: str, load_cpu: str, tmp: Path) -> Split:
    """One load run of ``seconds`` (the bench's command for ``s``: wrk, or h2load for h2) with
    perf sampling ``proxy_cpu`` from its first second to its last (connection set-up and
    wind-down left out). Raises RuntimeError when a request failed or a tool did."""
    pids = [root_pid] + children(root_pid)
    log = tmp / "h2load.log"
    argv = load_command(s, port, seconds, 50, load_cpu, log)
    data = tmp / f"perf-{server}.data"
    c0 = cpu_seconds(pids)
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    perf = subprocess.run(["perf", "record", "-q", "-C", proxy_cpu, "-o", str(data),
                           "--delay", "1000", "--", "sleep", str(max(2, seconds - 1))],
                          capture_output=True, text=True)
    out, _ = load.communicate(timeout=seconds + 60)
    c1 = cpu_seconds(pids)
    if perf.returncode != 0:
        raise RuntimeError(f"perf record failed:\n{perf.stderr[-800:]}")
    result = parse_h2load(out, log) if s.target == "h2" else parse_wrk(out)
    if result.errors or not result.requests:
        # Fast failures would look like cheap requests.
        raise RuntimeError(f"{server}: {result.errors} failed requests ({result.error_detail})")
    report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "comm,dso",
                             "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    per = (c1 - c0) / result.requests * 1e6
    return Split(server, result.rps, per,
                 {k: v * per for k, v in shares(report, COMMS[server]).items()})


def table(rows: dict[str, dict[str, Split]], targets: dict[str, Optional[float]]) -> str:
    """The markdown table of the median runs."""
    head = ("| scenario | server | req/s | CPU us/req | "
            + " | ".join(CATEGORIES) + " | pyngora user us/req left at the target |")
    lines = [head, "|" + "---|" * (5 + len(CATEGORIES))]
    for name, by_server in rows.items():
        ng, py = by_server["nginx"], by_server["pyngora"]
        target = targets[name]
        left = ""
        if target:
            # One core doing target x nginx's req/s has 1e6 / that us per request.
            budget = 1e6 / (target * ng.rps)
            left = f"{budget - py.us['kernel']:.1f} (now {py.us_per_request - py.us['kernel']:.1f})"
        for s in (ng, py):
            cells = " | ".join(f"{s.us[c]:.1f}" for c in CATEGORIES)
            lines.append(f"| {name} | {s.server} | {s.rps:.0f} | {s.us_per_request:.1f} | "
                         f"{cells} | {left if s is py else ''} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="small,large,churn")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=int, default=4)
    p.add_argument("--proxy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    a = p.parse_args(argv)
    if a.runs < 1 or a.duration < 3:
        p.error("--runs must be >= 1 and --duration >= 3 (perf skips the first second)")
    names = a.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS or SCENARIOS[name].target not in ("proxy", "h2"):
            p.error(f"{name}: one of the proxy scenarios (small, large, churn, h2)")
    want_h2 = "h2" in names
    missing = [t for t in ("perf", "wrk", "nginx") + (("h2load",) if want_h2 else ())
               if shutil.which(t) is None]
    if missing:
        print(f"cpu_split: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="pyngora-cpu-split-"))
    tmp.chmod(0o755)  # nginx workers run as nobody when run as root
    procs = Procs(tmp)
    rows: dict[str, dict[str, Split]] = {}
    try:
        www = tmp / "www"
        www.mkdir()
        (www / configs.LARGE_PATH.lstrip("/")).write_bytes(os.urandom(configs.LARGE_SIZE))
        op = free_port()
        origin = start_nginx(procs, "origin", configs.origin_conf(tmp / "origin", op, www, nofile),
                             tmp / "origin", a.load_cpu)
        ng = Ports(free_port(), free_port(), free_port() if want_h2 else None)
        nginx = start_nginx(procs, "nginx", configs.nginx_conf(
            tmp / "nginx", ng.static, ng.proxy, ng.h2, op, nofile), tmp / "nginx", a.proxy_cpu)
        for port, proc in ((op, origin), (ng.proxy, nginx)):
            why = wait_answers(port, "/", configs.SMALL_BODY.encode(), proc)
            if why:
                raise RuntimeError(f"nginx did not start: {why}")
        master, py, why_not = start_pyngora(procs, tmp, op, True, want_h2, a.proxy_cpu)
        for target in ("proxy", "h2") if want_h2 else ("proxy",):
            if target in why_not:
                raise RuntimeError(why_not[target])
        servers = {"nginx": ({"proxy": ng.proxy, "h2": ng.h2}, nginx.pid),
                   "pyngora": ({"proxy": py.proxy, "h2": py.h2}, master.pid)}
        for name in names:
            s = SCENARIOS[name]
            runs: dict[str, list[Split]] = {"nginx": [], "pyngora": []}
            for i in range(a.runs + 1):  # the first round warms up and is dropped
                for server, (port, pid) in servers.items():
                    split = measure(procs, server, port[s.target], pid, s, a.duration,
                                    a.proxy_cpu, a.load_cpu, tmp)
                    print(f"cpu_split: {name} {server} run {i}: {split.rps:.0f} req/s, "
                          f"{split.us_per_request:.1f} us/req, kernel "
                          f"{split.us['kernel']:.1f}", file=sys.stderr, flush=True)
                    if i:
                        runs[server].append(split)
            # the median run itself (by CPU per request), not a blend of runs
            rows[name] = {k: sorted(v, key=lambda x: x.us_per_request)[len(v) // 2]
                          for k, v in runs.items()}
    finally:
        procs.stop_all()
        time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows, {n: SCENARIOS[n].min_ratio for n in names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
