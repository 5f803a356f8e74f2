"""Smoke test of the benchmark driver: ``python -m tests.bench.run --quick`` runs every
scenario against nginx and pyngora for about a second each and produces numbers with no
errors. Never a timing assertion: the figures themselves live in tests/bench/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("wrk", "nginx", "curl")),
    reason="the bench needs wrk, nginx and curl (bin/test installs them as root)")

# h2 is the one scenario allowed to be skipped, and only while pyngora's h2c listener does not
# answer (HTTP/2 not landed) or h2load is missing.
OPTIONAL = {"h2"}


def test_quick_bench_produces_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.run", "--quick", "--no-record", "--idle-conns", "100",
         "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the driver then stops the servers it started (their own
        # process groups) before it exits.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail("the quick bench did not finish in 100 s:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    result = json.loads(out.read_text())
    names = [r["scenario"] for r in result["rows"]]
    assert {"static", "static-churn", "small", "large", "churn"} <= set(names)
    for row in result["rows"]:
        if row["skipped"]:
            assert row["scenario"] in OPTIONAL, f"{row['scenario']} skipped: {row['skipped']}"
            assert row["skipped"], "a skipped scenario says why"
            continue
        for server in ("nginx", "pyngora"):
            runs = row["runs"][server]
            assert runs, f"{row['scenario']}: no run against {server}"
            for r in runs:
                assert r["requests"] > 0 and r["rps"] > 0, (row["scenario"], server, r)
                assert r["errors"] == 0, (row["scenario"], server, r["error_detail"])
    assert result["idle_rss_kib"]["pyngora"]["master"] > 0
    for server, held in result["idle_conns"].items():
        assert isinstance(held, dict), (server, held)
        assert held["opened"] == held["wanted"] == 100, (server, held)
        assert held["held"] == 100 and held["sample_ok"] == held["sample"], (server, held)


def test_h2_floor_reports_both_columns() -> None:
    """``python -m tests.bench.h2_floor`` runs a few hundred streams through the h2 library and
    through pyngora's H2Server, answering every request, and prints a figure for each."""
    proc = subprocess.run([sys.executable, "-m", "tests.bench.h2_floor", "--streams", "300",
                           "--rounds", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["h2", "H2Server"], proc.stdout
    for line in lines:
        assert float(line.split()[1]) > 0, line


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed")
@pytest.mark.parametrize("variant", ["frames", "library"])
def test_h2_lean_floor_answers_h2load(tmp_path: Path, variant: str) -> None:
    """The h2 floor column (``tests.bench.h2_lean``, its own frame code or the h2 library)
    serves h2load's streams through the proxy with no failed request, beside pyngora."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYNGORA_FLOOR_H2=variant)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--quick", "--no-record", "--idle-conns", "0",
         "--scenarios", "h2", "--floor", "--floor-module", "tests.bench.h2_lean",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert not row["skipped"], row["skipped"]
    for server in ("nginx", "pyngora", "floor"):
        (run,) = row["runs"][server]
        assert run["requests"] > 0 and run["errors"] == 0, (server, run)


def test_layers_reports_every_stand_in() -> None:
    """``python -m tests.bench.layers`` proxies with each stand-in and reports every mode, none
    of them broken (a stand-in that stopped proxying correctly would be a wrong figure)."""
    proc = subprocess.run([sys.executable, "-m", "tests.bench.layers", "--rounds", "1",
                           "--seconds", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stand-in")]
    assert rows == ["real", "metrics", "pool", "timers", "all", "lean"], proc.stdout
    for line in proc.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| stand-in"):
            assert float(line.split("|")[2]) > 0, line


@pytest.mark.parametrize("tool", ["calls", "fastpath_ab"])
def test_in_process_tools_run(tool: str) -> None:
    """``tests.bench.calls`` counts the lane's calls per request and ``tests.bench.fastpath_ab``
    compares the fast path with the engine: both run the proxy in their own process over the
    shared origin helpers, and print their figures."""
    args = {"calls": ["--requests", "80", "--top", "3"],
            "fastpath_ab": ["--rounds", "1", "--seconds", "1"]}[tool]
    proc = subprocess.run([sys.executable, "-m", f"tests.bench.{tool}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = {"calls": r"80 requests: [\d.]+ pyngora Python calls",
            "fastpath_ab": r"median: fast path [\d.]+ us, engine [\d.]+ us"}[tool]
    assert re.search(want, proc.stdout), proc.stdout
