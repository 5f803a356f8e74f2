"""Profile one pyngora worker under load with py-spy (a bench-only tool, not a runtime
dependency: ``.venv/bin/python -m pip install py-spy``) and summarise the hottest functions.

Runs inside the benchmark driver after the measured runs, so the sampler never perturbs a
number that goes into the table.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tests.bench.tools import Procs

__all__ = ["FuncCost", "Profile", "py_spy", "profile_worker", "summarise"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass
class FuncCost:
    """One function's share of the samples: ``self_pct`` as the leaf, ``total_pct`` anywhere
    on the stack (counted once per sample)."""
    func: str
    file: str
    self_pct: float
    total_pct: float


@dataclass
class Profile:
    samples: int
    top_self: list[FuncCost]
    top_total: list[FuncCost]
    by_file: list[tuple[str, float]]   # (file, self %) summed over its functions
    raw_path: Path


def py_spy() -> Optional[str]:
    """The py-spy executable next to this interpreter, or on PATH, or None."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _short(path: str) -> str:
    """A file path shortened to what a reader needs (package-relative, or the stdlib tail)."""
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(raw_path: Path, top: int = 15) -> Profile:
    """Aggregate py-spy's raw (collapsed-stack) output per function (lines merged)."""
    self_counts: dict[tuple[str, str], int] = {}
    total_counts: dict[tuple[str, str], int] = {}
    file_counts: dict[str, int] = {}
    samples = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            samples += count
            seen: set[tuple[str, str]] = set()
            key: Optional[tuple[str, str]] = None
            for frame in stack.split(";"):
                m = _FRAME.match(frame)
                key = (m.group("func"), _short(m.group("file"))) if m else (frame, "")
                if key not in seen:
                    seen.add(key)
                    total_counts[key] = total_counts.get(key, 0) + count
            if key is not None:
                self_counts[key] = self_counts.get(key, 0) + count
                file_counts[key[1]] = file_counts.get(key[1], 0) + count
    if not samples:
        return Profile(0, [], [], [], raw_path)

    def cost(key: tuple[str, str]) -> FuncCost:
        return FuncCost(key[0], key[1], 100.0 * self_counts.get(key, 0) / samples,
                        100.0 * total_counts.get(key, 0) / samples)

    top_self = [cost(k) for k, _ in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]]
    top_total = [cost(k) for k, _ in sorted(total_counts.items(), key=lambda kv: -kv[1])[:top * 3]]
    by_file = sorted(((f, 100.0 * c / samples) for f, c in file_counts.items()),
                     key=lambda fc: -fc[1])[:top]
    return Profile(samples, top_self, top_total, by_file, raw_path)


def profile_worker(procs: Procs, pid: int, load_argv: Sequence[str], seconds: int,
                   raw_path: Path, rate: int = 250) -> Profile:
    """Run ``load_argv`` (a wrk command of ``seconds`` + 2 s) and sample ``pid`` with py-spy
    for ``seconds`` in the middle of it; returns the summary.

    ``--nonblocking`` so the sampler does not stop the worker for each sample (the figures
    are shares, the worker runs at its own speed).
    """
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/python -m pip install py-spy)")
    load = procs.start("wrk-profile", load_argv)
    try:
        time.sleep(1.0)
        out = procs.run("py-spy", [exe, "record", "--pid", str(pid), "--duration", str(seconds),
                                   "--rate", str(rate), "--nonblocking", "--format", "raw",
                                   "--output", str(raw_path)], timeout=seconds + 30)
        if not raw_path.exists():
            raise RuntimeError("py-spy wrote nothing:\n" + out[-1500:])
        load.wait(seconds + 30)
    except subprocess.TimeoutExpired:
        raise RuntimeError("the profiling load did not end")
    finally:
        procs.stop(load)
    return summarise(raw_path)
