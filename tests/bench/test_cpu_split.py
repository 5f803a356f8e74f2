"""tests/bench/cpu_split.py: its reading of ``perf report --sort comm,dso``, and one short
end-to-end run where perf can sample a CPU (the figures are for a quiet machine, by hand: see
tests/bench/README.md; here only that the tool works and splits something)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.cpu_split import category, shares

REPORT = """\
# Overhead  Command          Shared Object
# ........  ...............  ...................................
#
    50.00%  pyngora: worker  [kernel.kallsyms]
    30.00%  pyngora: worker  libpython3.11.so.1.0
     5.00%  pyngora: worker  loop.cpython-311-x86_64-linux-gnu.so
     2.50%  pyngora: worker  libc.so.6
     2.50%  pyngora: worker  parser.cpython-311-x86_64-linux-gnu.so
     7.00%  nginx            [kernel.kallsyms]
     3.00%  nginx            nginx
"""


def test_a_servers_samples_are_split_by_where_they_fell_and_others_ignored() -> None:
    got = shares(REPORT, ("pyngora: worker", "pyngora: master"))
    assert got["kernel"] == pytest.approx(50 / 90)
    assert got["python"] == pytest.approx(30 / 90)
    assert got["uvloop"] == pytest.approx(5 / 90)
    assert got["httptools"] == got["libc"] == pytest.approx(2.5 / 90)
    assert got["nginx"] == got["other"] == 0
    ng = shares(REPORT, ("nginx",))
    assert ng["kernel"] == pytest.approx(0.7) and ng["nginx"] == pytest.approx(0.3)


def test_no_samples_of_a_server_give_zero_shares_not_an_error() -> None:
    assert set(shares(REPORT, ("haproxy",)).values()) == {0.0}


@pytest.mark.parametrize("dso, cat", [
    ("[kernel.kallsyms]", "kernel"), ("libpython3.11.so.1.0", "python"),
    ("python3.11", "python"), ("loop.cpython-311-x86_64-linux-gnu.so", "uvloop"),
    ("nginx", "nginx"), ("libc.so.6", "libc"), ("[vdso]", "other"), ("[unknown]", "other"),
    ("[nf_conntrack]", "kernel"),
])
def test_categories(dso: str, cat: str) -> None:
    assert category(dso) == cat


def _perf_works() -> bool:
    if any(shutil.which(t) is None for t in ("perf", "wrk", "nginx")):
        return False
    try:
        r = subprocess.run(["perf", "record", "-q", "-C", "0", "-o", "/dev/null", "--", "true"],
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(not _perf_works(), reason="needs perf allowed to sample a CPU, wrk, nginx")
def test_a_short_run_splits_both_servers_cpu() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "tests.bench.cpu_split", "--scenarios", "small",
                           "--runs", "1", "--duration", "3"], cwd=root, capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| small |")}
    assert set(rows) == {"nginx", "pyngora"}, proc.stdout
    cols = ["req/s", "CPU us/req", "kernel", "python", "uvloop", "httptools", "nginx", "libc",
            "other", "left"]
    ng, py = (dict(zip(cols, rows[s])) for s in ("nginx", "pyngora"))
    assert float(ng["req/s"]) > 0 and float(py["req/s"]) > 0
    # each server's samples fell where its code is, and the parts add up to its CPU
    assert float(ng["nginx"]) > 0 and float(ng["python"]) == 0
    assert float(py["python"]) > 0 and float(py["nginx"]) == 0
    for row in (ng, py):
        parts = sum(float(row[c]) for c in cols[2:9])
        assert abs(parts - float(row["CPU us/req"])) <= 0.1 * float(row["CPU us/req"]) + 0.5
    assert "(now " in py["left"]  # the budget at the target, for the small scenario

