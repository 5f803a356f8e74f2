"""Bench plumbing: process groups that are always killed, free ports, /proc readers, and the
parsers of wrk's and h2load's output.

Runs only inside the benchmark driver (``python -m tests.bench.run``) and its smoke test;
nothing here is imported by pyngora.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["Procs", "free_port", "wait_until", "rss_kib", "children", "title", "fd_count",
           "LoadResult", "parse_wrk", "parse_h2load", "percentile", "pin", "cpu_seconds"]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, outside the ephemeral range (the
    load generators' own connections cannot take it meanwhile)."""
    from tests.support import free_port as outside_ephemeral
    return outside_ephemeral()


def wait_until(cond: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll ``cond`` until it returns something truthy; returns it, or None at ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    return None


def pin(cpu: Optional[str], argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``taskset -c CPU`` (taskset execs, so the PID stays the same)."""
    if cpu is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", cpu, *argv]


class Procs:
    """Every process the bench starts, each in its own session (= process group).

    ``stop_all`` runs from the driver's ``finally``: on a normal end, on an error and on
    Ctrl-C/SIGTERM alike, it signals each group it started (and only those), waits, and
    SIGKILLs what is left.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, argv: Sequence[str], stop_signal: int = signal.SIGTERM,
              env: Optional[dict] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
        """Start ``argv`` in a new session; stdout+stderr go to ``logdir/NAME.log``."""
        log = open(self.logdir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        finally:
            log.close()
        self.started.append((name, proc, stop_signal))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines a started process wrote (for error messages)."""
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """Stop one started group: its stop signal, then SIGKILL after ``timeout``."""
        for i, (_, p, sig) in enumerate(self.started):
            if p is proc:
                self._stop_group(p, sig, timeout)
                del self.started[i]
                return

    def stop_all(self) -> None:
        """Stop every group still running, newest first."""
        while self.started:
            _, p, sig = self.started.pop()
            self._stop_group(p, sig, 5.0)

    @staticmethod
    def _stop_group(p: subprocess.Popen, sig: int, timeout: float) -> None:
        pgid = p.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # Whatever the leader left behind in its group (workers) goes too.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def run(self, name: str, argv: Sequence[str], timeout: float) -> str:
        """Run a load tool to completion in its own group; returns stdout+stderr text.

        Own group so a Ctrl-C reaches the driver first and the driver kills it, rather than
        the tool dying half-way and the driver parsing a partial report.
        """
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append((name, proc, signal.SIGKILL))
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{name}: no result within {timeout:.0f}s")
        self.stop(proc)
        return out.decode(errors="replace")


# --- /proc ---------------------------------------------------------------------------------

def rss_kib(pid: int) -> Optional[int]:
    """VmRSS of ``pid`` in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def title(pid: int) -> str:
    """The process title (setproctitle rewrites /proc/PID/cmdline)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those still alive)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / _TICK


def fd_count(pid: int) -> Optional[int]:
    """How many file descriptors ``pid`` holds, or None if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# --- load tools ----------------------------------------------------------------------------

@dataclass
class LoadResult:
    """One load-tool run against one server."""
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    error_detail: str = ""
    raw: str = field(default="", repr=False)
    cpu_s: float = float("nan")   # CPU seconds the server under test used during the run
    wall_s: float = float("nan")

    @property
    def cpu_share(self) -> float:
        """The server's CPU use during the run, in cores (1.0 = one core busy throughout)."""
        return self.cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU second of the server: its efficiency, whatever else ran."""
        return self.requests / self.cpu_s if self.cpu_s else float("nan")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if not m:
        raise ValueError(f"unreadable latency {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> LoadResult:
    """Read req/s, p50/p99 (from ``--latency``), request count and errors from wrk's report.

    Errors are wrk's socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    Raises ValueError when the report is not there (wrk failed to start).
    """
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s*50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", text, re.M)
    reqs = re.search(r"(\d+) requests in", text)
    if not (rps and p50 and p99 and reqs):
        raise ValueError("no wrk report in:\n" + text[-2000:])
    errors = 0
    detail = []
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
        detail.append(sock.group(0))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
        detail.append(non2xx.group(0))
    return LoadResult(float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)),
                      int(reqs.group(1)), errors, "; ".join(detail), text)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def parse_h2load(text: str, log_file: Path) -> LoadResult:
    """Read req/s and failures from h2load's report, p50/p99 from its ``--log-file``.

    The log has one line per request: start time (us since start), status, duration (us).
    """
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (rps and reqs):
        raise ValueError("no h2load report in:\n" + text[-2000:])
    durations: list[float] = []
    try:
        with open(log_file) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    durations.append(int(parts[2]) / 1000.0)
    except OSError:
        pass
    durations.sort()
    failed, errored, timeout = (int(reqs.group(i)) for i in (5, 6, 7))
    errors = failed + errored + timeout
    detail = f"failed {failed}, errored {errored}, timeout {timeout}"
    if codes:
        bad = int(codes.group(3)) + int(codes.group(4))
        errors += bad
        detail += f", 4xx/5xx {bad}"
    return LoadResult(float(rps.group(1)), percentile(durations, 50), percentile(durations, 99),
                      int(reqs.group(4)), errors, detail, text)
