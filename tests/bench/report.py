"""Reporting of a bench run: the scenarios and their rows, the markdown tables printed and
appended to tests/bench/RESULTS.md.

Used by the driver (``python -m tests.bench.run``) once every measurement is done.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tests.bench import configs
from tests.bench.memory import IdleConnResult
from tests.bench.pyspy import Profile
from tests.bench.tools import LoadResult

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Scenario:
    """One row of the table: which listener, which path, how the load generator behaves."""
    name: str
    target: str                  # "static" | "proxy" | "h2": which listener of each server
    path: str
    close: bool                  # Connection: close (a new connection per request)
    min_ratio: Optional[float]   # issue 9's req/s target, pyngora/nginx
    max_p99_ratio: Optional[float]
    text: str


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("static", "static", "/", False, None, None,
             "keep-alive, small body; pyngora `static` service vs nginx `return 200`"),
    Scenario("static-churn", "static", "/", True, None, None,
             "new connection per request; pyngora `static` vs nginx `return 200`"),
    Scenario("small", "proxy", "/", False, 0.8, 2.0,
             "reverse proxy, keep-alive, small body"),
    Scenario("large", "proxy", configs.LARGE_PATH, False, 0.9, None,
             "reverse proxy, keep-alive, 64 KiB body"),
    Scenario("churn", "proxy", "/", True, 0.6, None,
             "reverse proxy, new connection per request (Connection: close)"),
    Scenario("h2", "h2", "/", False, 0.5, None,
             "reverse proxy, h2c prior knowledge, h2load -c 10 -m 100"),
)}

SERVERS = ("nginx", "pyngora", "floor")  # floor: tests/bench/floor.py, with --floor


@dataclass
class Row:
    """Every run of one scenario against both servers, and the medians."""
    scenario: str
    text: str
    commands: dict[str, str] = field(default_factory=dict)
    runs: dict[str, list[LoadResult]] = field(default_factory=lambda: {s: [] for s in SERVERS})
    skipped: str = ""

    def median(self, server: str) -> Optional[LoadResult]:
        """The median of each figure over the runs (req/s, p50 and p99 taken separately, so
        one run's outlier tail does not ride along with its throughput)."""
        runs = self.runs.get(server) or []
        if not runs:
            return None
        m = LoadResult(statistics.median(r.rps for r in runs),
                       statistics.median(r.p50_ms for r in runs),
                       statistics.median(r.p99_ms for r in runs),
                       sum(r.requests for r in runs), sum(r.errors for r in runs))
        m.cpu_s = sum(r.cpu_s for r in runs)
        m.wall_s = sum(r.wall_s for r in runs)
        return m

    def errors(self) -> int:
        return sum(r.errors for runs in self.runs.values() for r in runs)


def _f(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def table(rows: list[Row], floor: bool = False) -> str:
    """The markdown table of medians and ratios (plus the floor's columns with ``floor``)."""
    fh, fs = (" floor req/s | pyngora/floor |", "---:|---:|") if floor else ("", "")
    out = ["| scenario | nginx req/s | pyngora req/s | ratio | target | nginx p50 ms | "
           "pyngora p50 ms | nginx p99 ms | pyngora p99 ms | p99 ratio | errors | nginx CPU | "
           f"pyngora CPU | req per CPU-s ratio |{fh}",
           f"|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|{fs}"]
    for row in rows:
        s = SCENARIOS[row.scenario]
        n, p, fl = row.median("nginx"), row.median("pyngora"), row.median("floor")
        if row.skipped or n is None or p is None:
            out.append(f"| {row.scenario} | {_f(n.rps if n else None, '.0f')} | skipped: "
                       f"{row.skipped or 'no run'} | | | | | | | | | | | |"
                       + (" | |" if floor else ""))
            continue
        ratio = p.rps / n.rps if n.rps else float("nan")
        p99r = p.p99_ms / n.p99_ms if n.p99_ms else float("nan")
        target = ""
        if s.min_ratio is not None:
            target = f">= {s.min_ratio}" + (" " + ("met" if ratio >= s.min_ratio else "MISSED"))
        if s.max_p99_ratio is not None:
            met = p99r <= s.max_p99_ratio
            target += f"; p99 <= {s.max_p99_ratio}x {'met' if met else 'MISSED'}"
        out.append(f"| {row.scenario} | {n.rps:.0f} | {p.rps:.0f} | {ratio:.2f} | {target} | "
                   f"{n.p50_ms:.2f} | {p.p50_ms:.2f} | {n.p99_ms:.2f} | {p.p99_ms:.2f} | "
                   f"{p99r:.2f} | {row.errors()} | {_f(n.cpu_share, '.2f')} | "
                   f"{_f(p.cpu_share, '.2f')} | {_f(p.per_cpu_s / n.per_cpu_s, '.2f')} |"
                   + (f" {_f(fl.rps if fl else None, '.0f')} | "
                      f"{_f(p.rps / fl.rps if fl and fl.rps else None, '.2f')} |" if floor else ""))
    return "\n".join(out)


def memory_text(idle: dict[str, dict[str, int]], conns: dict[str, IdleConnResult | str],
                conns_target: str) -> str:
    """The memory section: idle RSS per process, then the idle keep-alive connections."""
    lines = ["| process | idle VmRSS MiB |", "|---|---:|"]
    for server, procs in idle.items():
        for t, kib in procs.items():
            lines.append(f"| {server}: {t} | {kib / 1024:.1f} |")
    if not conns:
        return "\n".join(lines)
    lines += ["", f"Idle keep-alive connections held on one worker ({conns_target} listener):",
              "", "| server | opened | held | 2nd request ok | worker RSS before MiB | after MiB "
              "| per connection KiB | after close MiB | worker FDs before/after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for server, r in conns.items():
        if isinstance(r, str):
            lines.append(f"| {server} | {r} | | | | | | | |")
            continue
        close = "-" if r.rss_after_close_kib is None else f"{r.rss_after_close_kib / 1024:.1f}"
        lines.append(f"| {server} | {r.opened}/{r.wanted} | {r.held} | {r.sample_ok}/{r.sample} "
                     f"| {r.rss_before_kib / 1024:.1f} | {r.rss_after_kib / 1024:.1f} | "
                     f"{r.per_conn_bytes / 1024:.2f} | {close} | {r.fds_before}/{r.fds_after} |"
                     + (f" {r.error}" if r.error else ""))
    return "\n".join(lines)


# The frames above the worker's event loop: on every stack, they say nothing.
_BOOT = ("pyngora/server/", "pyngora/cli.py", "pyngora/__main__.py")


def profile_text(p: Profile, what: str) -> str:
    """The top functions of the profile as markdown."""
    lines = [f"py-spy, {p.samples} samples of the pyngora worker during {what}.", "",
             "| # | function | file | self % | total % |", "|---:|---|---|---:|---:|"]
    for i, c in enumerate(p.top_self, 1):
        lines.append(f"| {i} | `{c.func}` | {c.file} | {c.self_pct:.1f} | {c.total_pct:.1f} |")
    lines += ["", "Inclusive (total %) of the request path's frames:", "",
              "| function | file | total % | self % |", "|---|---|---:|---:|"]
    for c in p.top_total:
        if c.file.startswith("pyngora/") and not c.file.startswith(_BOOT):
            lines.append(f"| `{c.func}` | {c.file} | {c.total_pct:.1f} | {c.self_pct:.1f} |")
    lines += ["", "Self time by file:", "", "| file | self % |", "|---|---:|"]
    lines += [f"| {f} | {pct:.1f} |" for f, pct in p.by_file]
    return "\n".join(lines)


def versions() -> str:
    """Tool and interpreter versions, for the record."""
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    commit = first(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return (f"commit {commit} (plus the working tree), Python {platform.python_version()}, "
            f"{first(['nginx', '-v'])}, {' '.join(first(['wrk', '-v']).split()[:2])}, "
            f"{first(['h2load', '--version'])}, "
            f"{os.cpu_count()} CPUs, loadavg at start {os.getloadavg()[0]:.2f}")


def record(started: dt.datetime, a: argparse.Namespace, env_line: str, rows: list[Row],
           report: str, mem: str, prof: Optional[Profile], prof_what: str,
           prof_error: str) -> None:
    """Append a dated section to RESULTS.md: date, environment, exact commands, table."""
    parts = [f"\n## {started:%Y-%m-%d %H:%M} UTC: {a.runs} x {a.duration} s per server, "
             f"alternating{' (quick)' if a.quick else ''}", ""]
    if a.note:
        parts += [a.note, ""]
    parts += [f"- {env_line}",
              f"- driver: `.venv/bin/python -m tests.bench.run {shlex.join(sys.argv[1:])}`".rstrip(),
              f"- loadavg at end {os.getloadavg()[0]:.2f}",
              f"- pinning: proxy under test on CPU {a.proxy_cpu}, origin + load generator on "
              f"CPU {a.load_cpu}", "", "Commands (ports change every run):", ""]
    for r in rows:
        for server, cmd in r.commands.items():
            parts.append(f"- {r.scenario}, {server}: `{cmd}`")
    parts += ["", report, "", mem, ""]
    if prof is not None:
        parts += [profile_text(prof, prof_what), ""]
    elif prof_error:
        parts += [f"Profile: {prof_error}", ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(parts))

