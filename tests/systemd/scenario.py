#!/usr/bin/python3
"""The systemd e2e scenario; runs INSIDE the nspawn container, as root, with
the container's own /usr/bin/python3 (stdlib only; systemd is PID 1 there).

    scenario.py install --pyngora TARGET     once per boot: /opt/pyngora/bin/pyngora,
                                              /etc/pyngora/pyngora.yaml, the slow origin
    scenario.py run UNIT [--socket SOCKET]   one unit: start, 3 reloads under load, stop

``run`` installs the repository's unit file unchanged, then checks: the unit
starts; requests succeed (curl); each of 3 ``systemctl reload`` (the
zero-downtime upgrade) fails no request of a concurrent curl loop, moves
MainPID to a master whose parent is PID 1, and leaves pid_file right; a slow
request in flight across the first reload completes; a reload with a broken
config fails and changes nothing; SIGHUP renews the workers under the same
master without a failed request; old masters exit; ``systemctl stop`` right
after one more reload lets a slow request on the draining old master and one
on the new master complete, and ends with Result=success, no SIGKILL in the
journal, no process left. It prints a line per check and, last, one JSON line
that tests/systemd/nspawn.py parses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXE = "/opt/pyngora/bin/pyngora"  # where the unit files expect the console script
CONF = "/etc/pyngora/pyngora.yaml"
URL = "http://127.0.0.1:80/"  # static service "web" of tests/systemd/e2e.yaml
BODY = "hello from pyngora\n"
SLOW_URL = "http://127.0.0.1:8080/slow"  # through pyngora to the slow origin
ORIGIN = "127.0.0.1:9000"
ORIGIN_UNIT = "pyngora-e2e-origin"
ORIGIN_DELAY = 2.0
RELOADS = 3
# Only a development config (nspawn.py --config) lacks the slow proxy service.
HAS_SLOW = not os.path.exists(CONF) or "name: slow" in open(CONF).read()


def sh(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its text output; never raises on exit status."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout}s: {exc}")


def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll ``pred`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def curl(url: str, max_time: float = 10) -> tuple[int, str, str]:
    """One request by curl: (HTTP status or 0, body, curl's error text)."""
    r = sh("curl", "-sS", "--max-time", str(max_time), "-w", "\n%{http_code}", url, timeout=max_time + 5)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body, r.stderr.strip()


def show(unit: str, prop: str) -> str:
    return sh("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()


def pid_file() -> int:
    """The pid in pyngora's pid_file (0 if missing or empty)."""
    try:
        with open("/run/pyngora/pyngora.pid") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def ppid(pid: int) -> int:
    """The parent of ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and ppid(int(entry)) == pid:
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


class Checks:
    """Collects PASS/FAIL lines; ``ok`` is False once any check failed."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.items: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}: {self.unit}: {name}" + (f" ({detail})" if detail else ""), flush=True)
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(i["ok"] for i in self.items)


class Loop(threading.Thread):
    """Requests by curl, one after another, until stopped; counts failures."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        for _ in range(100_000):  # bounded; stop() ends it long before
            if self.done.is_set():
                return
            code, body, err = curl(URL)
            if code == 200 and body == BODY:
                self.ok += 1
            else:
                self.failures.append(f"status={code} err={err!r}")

    def stop(self) -> None:
        self.done.set()
        self.join(30)


class Slow(threading.Thread):
    """One slow request through the proxy; ``result`` is (status, body, error)."""

    def __init__(self, delay: float = ORIGIN_DELAY) -> None:
        super().__init__(daemon=True)
        self.delay = delay
        self.result: tuple[int, str, str] | None = None

    def run(self) -> None:
        self.result = curl(f"{SLOW_URL}?delay={self.delay}", max_time=60)

    def start_in_flight(self) -> bool:
        """Start it and wait until the origin holds it (it is in flight)."""
        if not HAS_SLOW:
            return True
        before = origin_inflight()
        self.start()
        return bool(wait_until(lambda: origin_inflight() > before, 15))

    def completed(self) -> tuple[bool, str]:
        if not HAS_SLOW:
            return True, "skipped: the config has no 'slow' service"
        self.join(60)
        r = self.result
        ok = r is not None and r[0] == 200 and r[1] == "slow response complete\n"
        return ok, "" if ok else f"result={r!r}"


def origin_inflight() -> int:
    code, body, _ = curl(f"http://{ORIGIN}/inflight", max_time=2)
    return int(body) if code == 200 and body.strip().isdigit() else 0


def install(pyngora: str, config: str) -> int:
    """Put the command where the units expect it, the config, the origin."""
    # The service runs as a DynamicUser: it must be able to walk to the venv's
    # interpreter (here under /root/.pyenv; /root is 0750 in the container's
    # throw-away tmpfs root, so opening it up changes nothing on the host).
    real = os.path.realpath(os.path.join(REPO, ".venv", "bin", "python3"))
    d = os.path.dirname(real)
    while d != "/":
        st = os.stat(d)
        if not st.st_mode & 0o001 and os.path.ismount(d) is False and d.count("/") == 1:
            os.chmod(d, st.st_mode | 0o011)
        d = os.path.dirname(d)
    os.makedirs(os.path.dirname(EXE), exist_ok=True)
    if os.path.lexists(EXE):
        os.unlink(EXE)
    if pyngora.endswith(".py"):  # the harness self-check stand-in
        with open(EXE, "w") as f:
            f.write(f'#!/bin/sh\nexec {REPO}/.venv/bin/python {pyngora} "$@"\n')
        os.chmod(EXE, 0o755)
    else:
        # The checkout's venv, reached where the container binds it: its console script's
        # shebang names the host path, which units with PrivateTmp= may not see, so run the
        # venv's python on the package directly.
        with open(EXE, "w") as f:
            f.write(f'#!/bin/sh\nPYTHONPATH={REPO} exec {REPO}/.venv/bin/python -m pyngora "$@"\n')
        os.chmod(EXE, 0o755)
    os.makedirs(os.path.dirname(CONF), exist_ok=True)
    shutil.copy(config, CONF)
    os.chmod(CONF, 0o644)
    r = sh("systemd-run", f"--unit={ORIGIN_UNIT}", "--property=DynamicUser=yes",
           "/usr/bin/python3", os.path.join(HERE, "origin.py"), ORIGIN, "--delay", str(ORIGIN_DELAY))
    if r.returncode != 0:
        print(f"origin did not start: {r.stderr}", flush=True)
        return 1
    if not wait_until(lambda: curl(f"http://{ORIGIN}/", max_time=1)[0] == 200, 15):
        print("origin does not answer", flush=True)
        return 1
    print(f"installed {EXE} -> {pyngora}, {CONF}, origin on {ORIGIN}", flush=True)
    return 0


def journal_cursor() -> str:
    out = sh("journalctl", "-n0", "--show-cursor", "--no-pager").stdout
    return out.rsplit("-- cursor: ", 1)[-1].strip()


def run(unit: str, socket_unit: str | None) -> int:
    """One unit through start, RELOADS reloads under load, stop."""
    name = socket_unit or unit
    c = Checks(name)
    files = [unit] + ([socket_unit] if socket_unit else [])
    for f in files:
        shutil.copy(os.path.join(REPO, "systemd", f), f"/etc/systemd/system/{f}")
    sh("systemctl", "daemon-reload")
    cursor = journal_cursor()
    started = time.monotonic()
    pids: list[int] = []
    try:
        _run(c, unit, socket_unit, pids)
    finally:
        sh("systemctl", "stop", *files, timeout=120)
        journal = sh("journalctl", f"--after-cursor={cursor}", "--no-pager", "-o", "short-monotonic",
                     "-u", unit, *(["-u", socket_unit] if socket_unit else [])).stdout
        errlog = sh("tail", "-n", "40", "/var/log/pyngora/error.log").stdout
        for f in files:
            os.unlink(f"/etc/systemd/system/{f}")
        sh("systemctl", "daemon-reload")
        sh("systemctl", "reset-failed")
    bad = [ln for ln in journal.splitlines() if "SIGKILL" in ln or "not our child" in ln]
    c.check("journal: no SIGKILL, no alien main PID", not bad, "; ".join(bad)[:500])
    print(json.dumps({"unit": name, "ok": c.ok, "checks": c.items, "pids": pids,
                      "seconds": round(time.monotonic() - started, 1),
                      "journal": journal[-6000:], "error_log": errlog[-3000:]}), flush=True)
    return 0 if c.ok else 1


def _run(c: Checks, unit: str, socket_unit: str | None, pids: list[int]) -> None:
    t0 = time.monotonic()
    if socket_unit:
        if not c.check("socket starts", sh("systemctl", "start", socket_unit).returncode == 0):
            return
        c.check("service waits for the first connection", show(unit, "ActiveState") == "inactive")
        code, body, err = curl(URL, max_time=30)  # this connection activates the service
        c.check("first request activates the service", code == 200 and body == BODY,
                f"status={code} err={err!r} in {time.monotonic() - t0:.1f}s")
    else:
        r = sh("systemctl", "start", unit, timeout=90)
        if not c.check("start", r.returncode == 0, f"{time.monotonic() - t0:.1f}s {r.stderr.strip()}"):
            return
    c.check("active", wait_until(lambda: show(unit, "ActiveState") == "active", 30),
            show(unit, "ActiveState"))
    pid = int(show(unit, "MainPID") or 0)
    pids.append(pid)
    c.check("MainPID is set", pid > 0, f"MainPID={pid}")
    if show(unit, "Type") == "notify":
        c.check("STATUS= is shown", show(unit, "StatusText") != "", show(unit, "StatusText"))
    results = [curl(URL) for _ in range(5)]
    c.check("requests succeed", all(r[0] == 200 and r[1] == BODY for r in results),
            "" if all(r[0] == 200 for r in results) else repr(results[:2]))
    if socket_unit:
        listening = sh("ss", "-Hltn", "sport = :80").stdout.strip().splitlines()
        c.check("one socket listens on :80 (the one systemd passed)", len(listening) == 1, repr(listening))
    for i in range(1, RELOADS + 1):
        loop = Loop()
        loop.start()
        wait_until(lambda: loop.ok >= 3 or loop.failures, 20)
        slow = Slow() if i == 1 else None
        if slow is not None:
            c.check(f"reload #{i}: slow request in flight", slow.start_in_flight())
        t = time.monotonic()
        r = sh("systemctl", "reload", unit, timeout=90)
        took = time.monotonic() - t
        c.check(f"reload #{i}: systemctl reload", r.returncode == 0, f"{took:.1f}s {r.stderr.strip()}")
        # Type=notify moves MainPID on MAINPID=; Type=forking only once the old
        # master has drained and exited (systemd then re-reads PIDFile=).
        def moved() -> int | str:
            p = int(show(unit, "MainPID") or 0)
            if p not in (0, pid):
                return p
            state = show(unit, "ActiveState")
            return "" if state in ("active", "reloading") else state  # a truthy str ends the wait

        new = wait_until(moved, 30)
        new = new if isinstance(new, int) else 0
        c.check(f"reload #{i}: MainPID changed", bool(new), f"{pid} -> {new or show(unit, 'MainPID')}")
        c.check(f"reload #{i}: still active", show(unit, "ActiveState") == "active", show(unit, "ActiveState"))
        n0 = loop.ok
        wait_until(lambda: loop.ok >= n0 + 3 or len(loop.failures) > 20, 20 if new else 2)
        loop.stop()
        c.check(f"reload #{i}: 0 failed requests", not loop.failures and loop.ok > 0,
                f"{loop.ok} ok, {len(loop.failures)} failed {loop.failures[:3]}")
        if slow is not None:
            c.check(f"reload #{i}: slow request completed", *slow.completed())
        if new:
            pid = new
            pids.append(new)
            # systemd only waits for a main process that is its own child
            c.check(f"reload #{i}: new master's parent is PID 1", ppid(new) == 1, f"ppid={ppid(new)}")
        if show(unit, "ActiveState") != "active":
            c.check("unit survived the reloads", False, f"gave up after reload #{i}")
            return
        in_file = pid_file()
        c.check(f"reload #{i}: pid_file names MainPID", in_file == pid, f"pid_file={in_file} MainPID={pid}")
    # A reload with a broken config must fail loudly and change nothing.
    with open(CONF) as f:
        good = f.read()
    with open(CONF, "a") as f:
        f.write("no_such_key: 1\n")
    try:
        r = sh("systemctl", "reload", unit, timeout=90)
    finally:
        with open(CONF, "w") as f:
            f.write(good)
    c.check("bad config: systemctl reload fails", r.returncode != 0, r.stderr.strip()[:200])
    code, body, _ = curl(URL)
    c.check("bad config: same master still serving",
            show(unit, "ActiveState") == "active" and show(unit, "MainPID") == str(pid) and code == 200,
            f"{show(unit, 'ActiveState')} MainPID {pid} -> {show(unit, 'MainPID')} status={code}")
    # SIGHUP = reload in place (same master, new generation of workers); a
    # Type=notify master says RELOADING=1 ... READY=1 around it.
    loop = Loop()
    loop.start()
    wait_until(lambda: loop.ok >= 3 or loop.failures, 20)
    workers = children(pid)
    r = sh("systemctl", "kill", "-s", "SIGHUP", "--kill-who=main", unit)
    c.check("SIGHUP: sent to the main process", r.returncode == 0, r.stderr.strip())
    n0 = loop.ok
    wait_until(lambda: loop.ok >= n0 + 10 or len(loop.failures) > 20, 20)
    state = wait_until(lambda: show(unit, "ActiveState") == "active", 20)
    if workers:  # (the harness self-check stand-in has no worker processes)
        renewed = wait_until(lambda: children(pid) and not children(pid) & workers, 30)
        c.check("SIGHUP: a new generation of workers replaced the old", bool(renewed),
                f"before {sorted(workers)}, after {sorted(children(pid))}")
    loop.stop()
    c.check("SIGHUP: active again, same MainPID", bool(state) and show(unit, "MainPID") == str(pid),
            f"{show(unit, 'ActiveState')} MainPID {pid} -> {show(unit, 'MainPID')}")
    c.check("SIGHUP: 0 failed requests", not loop.failures and loop.ok > 0,
            f"{loop.ok} ok, {len(loop.failures)} failed {loop.failures[:3]}")
    old = pids[:-1]
    c.check("old masters exited after draining", wait_until(lambda: not any(alive(p) for p in old), 30),
            f"alive: {[p for p in old if alive(p)]}")
    c.check("no restarts", show(unit, "NRestarts") in ("0", ""), f"NRestarts={show(unit, 'NRestarts')}")
    # The stop comes right after one more upgrade: one slow request is in flight
    # on the old (draining) master, another on the new one. Both must complete;
    # the one on the old master lasts longer, so it outlives the new master's drain.
    on_old = Slow(delay=2 * ORIGIN_DELAY)
    c.check("stop: slow request in flight (old master)", on_old.start_in_flight())
    r = sh("systemctl", "reload", unit, timeout=90)
    c.check("stop: reload just before", r.returncode == 0, r.stderr.strip())
    for p in (int(show(unit, "MainPID") or 0), pid_file()):
        if p and p not in pids:
            pids.append(p)
    on_new = Slow(delay=ORIGIN_DELAY / 2)
    c.check("stop: slow request in flight (new master)", on_new.start_in_flight())
    t = time.monotonic()
    r = sh("systemctl", "stop", *([socket_unit] if socket_unit else []), unit, timeout=120)
    c.check("stop", r.returncode == 0, f"{time.monotonic() - t:.1f}s {r.stderr.strip()}")
    c.check("stop: slow request on the old master completed", *on_old.completed())
    c.check("stop: slow request on the new master completed", *on_new.completed())
    c.check("inactive", show(unit, "ActiveState") == "inactive", show(unit, "ActiveState"))
    res = show(unit, "Result")
    c.check("Result=success", res == "success",
            f"Result={res} ExecMainCode={show(unit, 'ExecMainCode')} ExecMainStatus={show(unit, 'ExecMainStatus')}")
    c.check("no process left", not any(alive(p) for p in pids), f"alive: {[p for p in pids if alive(p)]}")
    code, _, _ = curl(URL, max_time=2)
    c.check("port closed after stop", code == 0, f"status={code}")


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install")
    p.add_argument("--pyngora", required=True)
    p.add_argument("--config", default=os.path.join(HERE, "e2e.yaml"))
    p = sub.add_parser("run")
    p.add_argument("unit")
    p.add_argument("--socket")
    a = ap.parse_args()
    if a.cmd == "install":
        return install(a.pyngora, a.config)
    return run(a.unit, a.socket)


if __name__ == "__main__":
    sys.exit(main())
