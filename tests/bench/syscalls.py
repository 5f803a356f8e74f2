"""System calls per request of a server's worker under load, with ``strace -c`` (the bench's
``--syscalls``). strace slows the traced process a lot: the counts matter, not the times, and
no number from a traced run goes into the speed table.

Runs inside the benchmark driver after the measured runs.
"""
from __future__ import annotations

import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tests.bench.tools import Procs, parse_wrk

__all__ = ["SyscallCount", "count_syscalls", "syscalls_text"]

_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


@dataclass
class SyscallCount:
    """``calls``: {syscall: count} while ``requests`` requests were served."""
    requests: int
    calls: dict[str, int]

    def per_request(self) -> list[tuple[str, float]]:
        """(syscall, calls per request), most frequent first."""
        n = max(self.requests, 1)
        return sorted(((k, v / n) for k, v in self.calls.items()), key=lambda kv: -kv[1])


def count_syscalls(procs: Procs, pid: int, load_argv: Sequence[str], seconds: int,
                   out: Path) -> SyscallCount:
    """Attach ``strace -c -f`` to ``pid``, run ``load_argv`` (wrk, ``seconds`` long) to the
    end, detach; returns the counts and wrk's request total."""
    if shutil.which("strace") is None:
        raise RuntimeError("strace is not installed")
    tracer = procs.start(f"strace-{pid}", ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                         signal.SIGINT)
    try:
        time.sleep(0.5)  # attached
        if tracer.poll() is not None:
            raise RuntimeError(f"strace could not attach: {procs.log_tail(f'strace-{pid}')}")
        report = parse_wrk(procs.run("wrk-strace", load_argv, timeout=seconds + 60))
    finally:
        procs.stop(tracer)  # SIGINT: strace detaches and writes its summary
    calls: dict[str, int] = {}
    try:
        text = out.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    if not calls:
        raise RuntimeError("strace wrote no summary:\n" + text[-1000:])
    return SyscallCount(report.requests, calls)


def syscalls_text(counts: dict[str, SyscallCount], what: str) -> str:
    """A markdown table: calls per request of each syscall, per server."""
    names: list[str] = []
    for c in counts.values():
        for k, _ in c.per_request():
            if k not in names:
                names.append(k)
    servers = list(counts)
    lines = [f"System calls per request ({what}, `strace -c -f` on the worker; traced runs are "
             "slow, only the counts matter):", "",
             "| syscall | " + " | ".join(servers) + " |", "|---|" + "---:|" * len(servers)]
    per = {s: dict(counts[s].per_request()) for s in servers}
    for k in names:
        vals = [per[s].get(k, 0.0) for s in servers]
        if max(vals) < 0.01:
            continue
        lines.append(f"| {k} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines.append("| **total** | " + " | ".join(
        f"{sum(per[s].values()):.2f}" for s in servers) + " |")
    lines.append("| (requests traced) | " + " | ".join(
        str(counts[s].requests) for s in servers) + " |")
    return "\n".join(lines)
