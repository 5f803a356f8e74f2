"""pyngora against Python peers, in the same run, on the same pinned cores (issue 9: "Python
peers in the same table ... pyngora >= 5 x the best of them").

    .venv/bin/python -m tests.bench.peers [--quick] [--scenarios small,churn] [--runs N]
        [--duration S] [--no-record] [--reinstall] [--keep-tmp]

The peers are bench-only tools, never runtime dependencies of pyngora: the first run creates
a separate virtualenv, ``tests/bench/.peers-venv/`` (git-ignored), and pip-installs aiohttp,
uvloop, gunicorn, proxy.py and mitmproxy into it; later runs reuse it (``--reinstall`` tries
again). A package that cannot be installed makes its rows say so; the others still run.

Layout as in tests/bench/README.md: every proxy under test pinned to core 0 (only one of them
under load at a time), the origin (nginx, one worker) and wrk on core 1. The servers:
- aiohttp: a tiny reverse proxy app (aiohttp server + one ClientSession with a keep-alive
  connector), ``python peers_app.py``, on uvloop (the peers get the loop pyngora uses);
- gunicorn: the same app under gunicorn, 1 worker, ``aiohttp.GunicornUVLoopWebWorker``;
- proxy.py: ``proxy --enable-reverse-proxy`` with a plugin routing every path to the origin;
- mitmproxy: ``mitmdump --mode reverse:http://ORIGIN``, quiet, no flow file written;
- pyngora: ``http_proxy``, ``threads: 1`` (the driver's configuration).
Each scenario alternates the servers, ``--runs`` times each after a 2 s warm-up, and reports
medians. A full run appends a dated section to tests/bench/PEERS.md. Everything started is
killed (process groups) at the end, on an error, on Ctrl-C and on SIGTERM.

Runs by hand only (it downloads packages): not part of bin/test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.bench import configs
from tests.bench.report import SCENARIOS, Row, versions
from tests.bench.run import (_interrupt, raise_nofile, run_load, start_nginx, start_pyngora,
                             wait_answers)
from tests.bench.tools import LoadResult, Procs, children, free_port, pin

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV = HERE / ".peers-venv"
MARKER = VENV / "peers-installed.json"
PEERS_MD = HERE / "PEERS.md"
PACKAGES = ("aiohttp", "uvloop", "gunicorn", "proxy.py", "mitmproxy")
PEER_SCENARIOS = ("small", "churn")

# --- the bench venv ------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(reinstall: bool) -> dict[str, str]:
    """Create the peers' venv once and install each package into it on its own, so one that
    fails does not stop the others. Runs before any server starts.

    Returns {package: version} for those installed and {package: "not installed: why"} for
    the others; the result is kept in MARKER so later runs skip pip entirely.
    """
    if MARKER.exists() and not reinstall:
        return json.loads(MARKER.read_text())
    if not venv_python().exists():
        print(f"peers: creating {VENV.relative_to(ROOT)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    got: dict[str, str] = {}
    for pkg in PACKAGES:
        print(f"peers: pip install {pkg}", file=sys.stderr, flush=True)
        out = subprocess.run([str(venv_python()), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", pkg],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            # pip's configured-but-absent local index lines are noise; the error is the rest.
            lines = [x for x in (out.stdout + out.stderr).splitlines()
                     if x.strip() and "is ignored: it is neither" not in x]
            got[pkg] = "not installed: " + (lines[-1] if lines else f"pip rc {out.returncode}")
    dist = {"proxy.py": "proxy.py"}
    probe = ("import importlib.metadata as m, json, sys\n"
             "out = {}\n"
             "for p in sys.argv[1:]:\n"
             "    try: out[p] = m.version(p)\n"
             "    except m.PackageNotFoundError: pass\n"
             "print(json.dumps(out))")
    out = subprocess.run([str(venv_python()), "-c", probe,
                          *[dist.get(p, p) for p in PACKAGES]],
                         capture_output=True, text=True, check=True)
    for pkg, ver in json.loads(out.stdout).items():
        got[pkg] = ver
    for pkg in PACKAGES:
        got.setdefault(pkg, "not installed: pip said nothing")
    MARKER.write_text(json.dumps(got, indent=1))
    return got


# --- the peers -----------------------------------------------------------------------------

# The aiohttp reverse proxy, written into the run's temp dir. `app_factory` is what gunicorn's
# aiohttp worker loads (an async function returning the Application); `python peers_app.py
# PORT` serves it with aiohttp's own runner. One ClientSession per process, with a keep-alive
# connector and no connection limit, so 50 client connections never queue for the upstream.
APP = '''\
import asyncio
import os
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

ORIGIN = os.environ["PEERS_ORIGIN"]  # http://127.0.0.1:PORT
# Hop-by-hop headers (RFC 9110 7.6.1), plus what each side recomputes itself.
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length"}


async def session_ctx(app: web.Application):
    connector = TCPConnector(limit=0, keepalive_timeout=60)
    app["session"] = ClientSession(connector=connector, auto_decompress=False,
                                   timeout=ClientTimeout(total=30))
    yield
    await app["session"].close()


async def proxy(request: web.Request) -> web.Response:
    body = await request.read()
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
    url = URL(ORIGIN + request.raw_path, encoded=True)
    async with request.app["session"].request(request.method, url, headers=headers,
                                              data=body or None, allow_redirects=False) as r:
        data = await r.read()
        out = CIMultiDict((k, v) for k, v in r.headers.items() if k.lower() not in HOP)
        return web.Response(status=r.status, body=data, headers=out)


async def app_factory() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


if __name__ == "__main__":
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app_factory(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None)
'''

# proxy.py's reverse proxy plugin: every path goes to the origin, path and query kept.
RP_PLUGIN = '''\
import os

from proxy.http import Url
from proxy.http.server import ReverseProxyBasePlugin

ORIGIN = os.environ["PEERS_ORIGIN"].encode()


class OriginRoute(ReverseProxyBasePlugin):
    def routes(self):
        return [r"/.*$"]

    def handle_route(self, request, pattern):
        return Url.from_bytes(ORIGIN + request.path)
'''


@dataclass
class Peer:
    """One Python peer: how it is started and which package it needs."""
    name: str
    text: str            # how it runs, for the table
    needs: tuple[str, ...]  # the packages whose absence skips it
    argv: list[str]
    stop_signal: int = signal.SIGINT


def peers(tmp: Path, origin_port: int) -> list[tuple[Peer, int]]:
    """The peers with a fresh port each; the run's temp dir holds their files."""
    (tmp / "peers_app.py").write_text(APP)
    (tmp / "peers_rp.py").write_text(RP_PLUGIN)
    bin_ = VENV / "bin"
    py = str(venv_python())
    out = []
    p = free_port()
    out.append((Peer("aiohttp", "`python peers_app.py` (aiohttp server + ClientSession, uvloop)",
                     ("aiohttp", "uvloop"), [py, str(tmp / "peers_app.py"), str(p)]), p))
    p = free_port()
    out.append((Peer("gunicorn+aiohttp", "gunicorn, 1 worker, `aiohttp.GunicornUVLoopWebWorker`,"
                     " the same app", ("gunicorn", "aiohttp", "uvloop"),
                     [str(bin_ / "gunicorn"), "peers_app:app_factory", "--bind",
                      f"127.0.0.1:{p}", "--workers", "1", "--worker-class",
                      "aiohttp.GunicornUVLoopWebWorker", "--chdir", str(tmp), "--keep-alive",
                      "75", "--log-level", "warning", "--backlog", "1024"]), p))
    p = free_port()
    # --threaded: proxy.py's default (threadless) worker dies at the first wrk -c 50 run
    # (FileNotFoundError from selector.modify in Threadless._update_work_events, proxy.py
    # 2.4.10) and then answers nothing; a thread per connection keeps working.
    out.append((Peer("proxy.py", "`proxy --enable-reverse-proxy --threaded`, a route plugin to "
                     "the origin, 1 acceptor", ("proxy.py",),
                     [str(bin_ / "proxy"), "--hostname", "127.0.0.1", "--port", str(p),
                      "--enable-reverse-proxy", "--plugins", "peers_rp.OriginRoute",
                      "--threaded", "--num-acceptors", "1", "--log-level", "ERROR",
                      "--backlog", "1024"]), p))
    p = free_port()
    out.append((Peer("mitmproxy", "`mitmdump --mode reverse:http://ORIGIN -q`, no flow file",
                     ("mitmproxy",),
                     [str(bin_ / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:{origin_port}",
                      "--listen-host", "127.0.0.1", "--listen-port", str(p), "-q",
                      "--set", f"confdir={tmp / 'mitm'}", "--set", "flow_detail=0",
                      "--set", "termlog_verbosity=error"]), p))
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (gunicorn's and proxy.py's workers)."""
    out, todo = [], [pid]
    while todo and len(out) < 256:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


# --- the report ----------------------------------------------------------------------------

def _f(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


FULL_CORE = 0.9  # CPU share at or above which a run had CPU 0 to itself


def _full_core(runs: list[LoadResult]) -> list[LoadResult]:
    """The runs in which the server used (nearly) a whole core: nothing else took CPU 0."""
    return [r for r in runs if r.cpu_share == r.cpu_share and r.cpu_share >= FULL_CORE]


def scenario_table(row: Row, order: list[str], texts: dict[str, str],
                   skipped: dict[str, str]) -> tuple[str, str]:
    """One scenario's markdown table of medians, and its verdict line (pyngora / best peer).

    CPU is the cores the server used during its runs; CPU us per request is its CPU time per
    request served, the comparison that holds whatever else ran on the machine.
    """
    lines = [f"**{row.scenario}**: {SCENARIOS[row.scenario].text}", "",
             "| server | how it runs | req/s | p50 ms | p99 ms | CPU | full-core runs | "
             "CPU us/req | errors | pyngora req/s ÷ this |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    py = row.median("pyngora")
    best: Optional[tuple[str, LoadResult]] = None
    for name in order:
        if name in skipped:
            lines.append(f"| {name} | {texts.get(name, '')} | skipped: {skipped[name]} "
                         "| | | | | | | |")
            continue
        m = row.median(name)
        if m is None:
            lines.append(f"| {name} | {texts.get(name, '')} | no run | | | | | | | |")
            continue
        full = f"{len(_full_core(row.runs[name]))}/{len(row.runs[name])}"
        errs = sum(r.errors for r in row.runs[name])
        us = 1e6 / m.per_cpu_s if m.per_cpu_s == m.per_cpu_s and m.per_cpu_s else float("nan")
        ratio = py.rps / m.rps if py is not None and m.rps else float("nan")
        lines.append(f"| {name} | {texts.get(name, '')} | {m.rps:.0f} | {m.p50_ms:.2f} | "
                     f"{m.p99_ms:.2f} | {_f(m.cpu_share, '.2f')} | {full} | {_f(us, '.0f')} | {errs} | "
                     f"{'' if name == 'pyngora' else _f(ratio, '.1f')} |")
        if name != "pyngora" and (best is None or m.rps > best[1].rps):
            best = (name, m)
    if py is None or best is None:
        return "\n".join(lines), f"{row.scenario}: no comparison (pyngora or every peer missing)"
    ratio = py.rps / best[1].rps if best[1].rps else float("nan")
    # Efficiency against the most efficient peer, which need not be the fastest one.
    lean = max(((n, m) for n in order if n != "pyngora" and n not in skipped
                for m in [row.median(n)] if m is not None and m.per_cpu_s == m.per_cpu_s),
               key=lambda nm: nm[1].per_cpu_s, default=None)
    eff = (f"{py.per_cpu_s / lean[1].per_cpu_s:.1f} x that of the leanest peer ({lean[0]})"
           if lean and lean[1].per_cpu_s else "-")
    # The same comparison over the runs in which the server had CPU 0 to itself: a Python
    # proxy under wrk -c 50 keeps its core busy, so a run below FULL_CORE shared the core
    # with something else (another bench pinned there too) and its req/s says little.
    clean = ""
    py_full = _full_core(row.runs["pyngora"])
    peer_full = {n: statistics.median(r.rps for r in _full_core(row.runs[n]))
                 for n in order if n != "pyngora" and _full_core(row.runs.get(n, []))}
    if py_full and peer_full:
        top = max(peer_full, key=peer_full.__getitem__)
        py_rps = statistics.median(r.rps for r in py_full)
        clean = (f" Over the full-core runs only: pyngora {py_rps:.0f} req/s = "
                 f"{py_rps / peer_full[top]:.1f} x {top} ({peer_full[top]:.0f} req/s).")
    verdict = (f"{row.scenario}: pyngora {py.rps:.0f} req/s = **{ratio:.1f} x** the best peer "
               f"({best[0]}, {best[1].rps:.0f} req/s); target >= 5 x: "
               f"{'met' if ratio >= 5 else 'MISSED'}. Requests per CPU second: {eff}.{clean}")
    return "\n".join(lines), verdict


HOWTO = """\
# pyngora against Python peers

Issue 9: "Python peers in the same table (installed in a bench venv): gunicorn with aiohttp
workers as a proxy, aiohttp alone, proxy.py, mitmproxy reverse mode: pyngora >= 5 x the best
of them."

How to run (by hand; it downloads packages, so it is not part of bin/test):

    .venv/bin/python -m tests.bench.peers              # ~6 min: small + churn, 3 x 10 s each
    .venv/bin/python -m tests.bench.peers --quick      # ~20 s, 1 s per run, nothing recorded
    .venv/bin/python -m tests.bench.peers --runs 5 --duration 8 --note "why this run"
    .venv/bin/python -m tests.bench.peers --runs 5 --duration 20 --scenarios small
    .venv/bin/python -m tests.bench.peers --reinstall  # retry the pip installs

The first run creates `tests/bench/.peers-venv/` (git-ignored) and pip-installs aiohttp,
uvloop, gunicorn, proxy.py and mitmproxy there: bench-only tools, never runtime dependencies
of pyngora. Same layout as tests/bench/README.md: each proxy pinned to CPU 0 (one under load
at a time), the origin (nginx, 1 worker) and `wrk -t 1 -c 50` on CPU 1; the servers alternate,
`--runs` each (default 3) after a 2 s warm-up, medians. The peers get uvloop where they can use it (aiohttp
alone, gunicorn's `GunicornUVLoopWebWorker`) and no access log, so the comparison is with each
one's fastest ordinary setup. The code of the aiohttp app and of the proxy.py route plugin is
in `tests/bench/peers.py` (`APP`, `RP_PLUGIN`).

Columns: req/s, p50 and p99 are medians over the runs; CPU is the cores the server (all its
processes) used during its runs; full-core runs counts the runs in which it used >= 0.9 of a
core; CPU us/req is its CPU time per request served; errors are wrk's socket errors plus
non-2xx/3xx answers, summed over the runs.

Reading it on a shared machine: every one of these servers, pyngora included, keeps its core
busy under `wrk -c 50`, so a run with CPU well below 1.0 is one in which something else (often
another bench, also pinned to CPU 0) took half the core. Such runs lower req/s for whoever
had them, and the medians of req/s then depend on who was unlucky. CPU us/req does not: it is
the figure to trust when the CPU column is below ~0.9, next to the verdict line's ratio over
the full-core runs only.
"""


def record(started: dt.datetime, a: argparse.Namespace, env_line: str, installed: dict[str, str],
           commands: dict[str, str], tables: list[str], verdicts: list[str]) -> None:
    """Append a dated section to PEERS.md (created with its how-to-run header if absent)."""
    parts = [f"\n## {started:%Y-%m-%d %H:%M} UTC: {a.runs} x {a.duration} s per server, "
             f"alternating{' (quick)' if a.quick else ''}", ""]
    if a.note:
        parts += [a.note, ""]
    parts += [f"- {env_line}",
              "- peers venv: " + ", ".join(f"{k} {v}" for k, v in installed.items()),
              "- driver: `" + f".venv/bin/python -m tests.bench.peers {shlex.join(sys.argv[1:])}"
              .rstrip() + "`", f"- loadavg at end {os.getloadavg()[0]:.2f}",
              f"- pinning: proxy under test on CPU {a.proxy_cpu}, origin + wrk on CPU "
              f"{a.load_cpu}", "", "Commands (ports change every run):", ""]
    parts += [f"- {k}: `{v}`" for k, v in commands.items()]
    parts += [""]
    for t in tables:
        parts += [t, ""]
    parts += [f"- {v}" for v in verdicts] + [""]
    new = not PEERS_MD.exists()
    with open(PEERS_MD, "a") as f:
        if new:
            f.write(HOWTO)
        f.write("\n".join(parts))


# --- main ----------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 run of 1 s per server, no warm-up, PEERS.md untouched")
    ap.add_argument("--scenarios", default=",".join(PEER_SCENARIOS),
                    help=f"comma-separated, from {', '.join(PEER_SCENARIOS)}")
    ap.add_argument("--runs", type=int, default=3, help="runs per server, alternating")
    ap.add_argument("--duration", type=int, default=10, help="seconds per run")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--no-record", action="store_true", help="do not append to PEERS.md")
    ap.add_argument("--note", default="", help="a line for PEERS.md")
    ap.add_argument("--reinstall", action="store_true", help="run the pip installs again")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.duration = 1, 1
    a.names = [n.strip() for n in a.scenarios.split(",") if n.strip()]
    bad = [n for n in a.names if n not in PEER_SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; known: {list(PEER_SCENARIOS)}")
    if len(os.sched_getaffinity(0)) < 2:
        a.proxy_cpu = a.load_cpu = None  # one core: pinning would only serialise everything
    return a


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"peers: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    installed = ensure_venv(a.reinstall)
    nofile = raise_nofile()
    started = dt.datetime.now(dt.timezone.utc)
    env_line = versions()
    tmp = Path(tempfile.mkdtemp(prefix="pyngora-peers-"))
    tmp.chmod(0o755)  # nginx workers run as nobody when the bench runs as root
    procs = Procs(tmp)
    signal.signal(signal.SIGTERM, _interrupt)
    body = configs.SMALL_BODY.encode()
    order: list[str] = []
    texts: dict[str, str] = {}
    skipped: dict[str, str] = {}
    ports: dict[str, int] = {}
    leaders: dict[str, int] = {}
    commands: dict[str, str] = {}
    rows: list[Row] = []
    try:
        www = tmp / "www"
        www.mkdir()
        (www / configs.LARGE_PATH.lstrip("/")).write_bytes(os.urandom(configs.LARGE_SIZE))
        origin_port = free_port()
        origin = start_nginx(procs, "origin", configs.origin_conf(
            tmp / "origin", origin_port, www, nofile), tmp / "origin", a.load_cpu)
        why = wait_answers(origin_port, "/", body, origin)
        if why:
            raise RuntimeError(f"origin nginx: {why}\n{procs.log_tail('origin')}")

        # The peers run in a scratch HOME: mitmproxy and proxy.py write CA files there.
        home = tmp / "home"
        home.mkdir()
        env = dict(os.environ, PEERS_ORIGIN=f"http://127.0.0.1:{origin_port}",
                   PYTHONPATH=str(tmp), HOME=str(home), PYTHONUNBUFFERED="1")
        env.pop("VIRTUAL_ENV", None)
        for peer, port in peers(tmp, origin_port):
            order.append(peer.name)
            texts[peer.name] = peer.text
            absent = [f"{p} {installed.get(p, 'not installed')}" for p in peer.needs
                      if installed.get(p, "not installed").startswith("not installed")]
            if absent:
                skipped[peer.name] = "; ".join(absent)
                continue
            proc = procs.start(peer.name, pin(a.proxy_cpu, peer.argv), peer.stop_signal,
                               env=env, cwd=tmp)
            why = wait_answers(port, "/", body, proc, timeout=30.0)
            if why:
                tail = procs.log_tail(peer.name, 4).replace("\n", " / ").replace("|", "/")
                skipped[peer.name] = f"does not answer GET / ({why}): {tail}"[:300]
                procs.stop(proc)
                continue
            ports[peer.name], leaders[peer.name] = port, proc.pid
            commands[peer.name] = (shlex.join(peer.argv).replace(str(tmp), "TMP")
                                   .replace(str(VENV), "tests/bench/.peers-venv"))

        master, py_ports, why_not = start_pyngora(procs, tmp, origin_port, True, False,
                                                  a.proxy_cpu)
        order.append("pyngora")
        texts["pyngora"] = "`http_proxy`, `threads: 1` (the driver's configuration)"
        if "proxy" in why_not:
            skipped["pyngora"] = why_not["proxy"]
        else:
            ports["pyngora"], leaders["pyngora"] = py_ports.proxy or 0, master.pid
            commands["pyngora"] = "python -m pyngora -c TMP/pyngora-0.yaml"
        for name, why in skipped.items():
            print(f"peers: {name} skipped: {why}", file=sys.stderr, flush=True)

        live = [n for n in order if n in ports]
        for sname in a.names:
            s = SCENARIOS[sname]
            row = Row(sname, s.text, runs={n: [] for n in order})
            rows.append(row)
            if not a.quick:  # warm-up: upstream pools, caches, the CPU's frequency
                for n in live:
                    try:
                        run_load(procs, s, ports[n], 2, a.connections, a.load_cpu, tmp)
                    except (RuntimeError, ValueError):
                        pass  # the measured runs below record what goes wrong
            for i in range(a.runs):
                for n in live:
                    try:
                        result, cmd = run_load(procs, s, ports[n], a.duration, a.connections,
                                               a.load_cpu, tmp, tuple(descendants(leaders[n])))
                    except (RuntimeError, ValueError) as e:
                        print(f"peers: {sname} {n} run {i + 1}: {e}", file=sys.stderr)
                        continue
                    row.runs[n].append(result)
                    commands[f"wrk ({sname})"] = cmd.rsplit(" ", 1)[0] + " URL"
                    print(f"peers: {sname:6s} {n:17s} run {i + 1}: {result.rps:9.0f} req/s "
                          f"p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:8.2f} ms "
                          f"cpu {result.cpu_share:.2f} errors {result.errors}",
                          file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("peers: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if a.keep_tmp:
            print(f"peers: configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    tables, verdicts = [], []
    for row in rows:
        t, v = scenario_table(row, order, texts, skipped)
        tables.append(t)
        verdicts.append(v)
    print("peers venv: " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    for t in tables:
        print()
        print(t)
    print()
    for v in verdicts:
        print(v)
    if not a.quick and not a.no_record:
        record(started, a, env_line, installed, commands, tables, verdicts)
        print(f"\nappended to {PEERS_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
