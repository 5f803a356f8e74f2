"""Daemon mode and the pid file.

`daemonize()` double-forks: the launching process stays in the foreground, waiting on a pipe,
and exits 0 only once the master reports it serves (or, with ``-u``, listens on
``upgrade_sock``); it exits 1 with the master's reason otherwise. It waits at most
`start_timeout()` seconds (60, or ``PYNGORA_START_TIMEOUT``): a master that has not reported
by then is stopped (SIGINT, then SIGKILL for its whole process group) and the launcher exits 1,
well before systemd's own TimeoutStartSec (90 s by default) would kill a forking unit.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import sys
import time
from typing import Optional

from pyngora import log

START_TIMEOUT = 60.0
EXIT_START_TIMEOUT = 1


class PidFileError(Exception):
    pass


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def is_pyngora(pid: int) -> bool:
    """A live process that runs pyngora (a stale pid file may name a recycled pid)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return True  # cannot tell: assume it is, and refuse rather than run twice
    # Its title ("pyngora: master -c ...", setproctitle), or before it has one, an argument
    # that is pyngora itself (python -m pyngora, bin/pyngora): not any process that merely
    # names the word (tail -f pyngora.log, an editor on pyngora.yaml), which -s would signal.
    if raw.startswith(b"pyngora: "):
        return True
    return any(a == b"pyngora" or a.endswith(b"/pyngora") for a in raw.split(b"\0"))


def check_pid_file(path: str) -> None:
    """Refuse to start when the pid file names a live pyngora."""
    pid = read_pid(path)
    if pid is not None and pid != os.getpid() and is_pyngora(pid):
        raise PidFileError(f"pyngora already runs as pid {pid} (pid_file {path}); "
                           f"stop it, or upgrade with -s upgrade")


def write_pid_file(path: str, pid: Optional[int] = None) -> None:
    """Atomic: write a temporary file beside it, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{pid or os.getpid()}\n")
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # (a full disk: no half-written file left behind)
        except OSError:
            pass
        raise


def remove_pid_file(path: str) -> None:
    """Remove it only if it still names this process (a new master may own it now)."""
    if read_pid(path) == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


def start_timeout() -> float:
    """Seconds ``pyngora -d`` waits for its master to report (``PYNGORA_START_TIMEOUT``)."""
    try:
        value = float(os.environ.get("PYNGORA_START_TIMEOUT", "") or START_TIMEOUT)
    except ValueError:
        return START_TIMEOUT
    return value if value > 0 else START_TIMEOUT


def daemonize(error_log: Optional[str], working_directory: Optional[str],
              stop_timeout: float = 5.0) -> int:
    """Fork twice, detach. Returns, in the daemon, the fd to report readiness on.
    The launcher never returns: it waits for that report (at most `start_timeout()`; then it
    stops the daemon, giving it ``stop_timeout`` seconds before SIGKILL) and exits."""
    timeout = start_timeout()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:  # the launcher
        os.close(wfd)
        _launcher_wait(rfd, pid, timeout, stop_timeout, error_log)
    os.close(rfd)
    os.setsid()
    # the intermediate process: the master waits until it is gone before sending MAINPID=
    os.environ["PYNGORA_LAUNCHER_PID"] = str(os.getpid())
    master = os.fork()
    if master > 0:
        # the launcher's first line: whom to stop should the master never report
        os.write(wfd, f"pid {master}\n".encode())
        os._exit(0)
    os.umask(0o022)
    os.chdir(working_directory or "/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = devnull
    if error_log:
        out = os.open(error_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    if out != devnull:
        os.close(out)
    os.close(devnull)
    return wfd


def wait_launcher_gone(limit: float = 5.0) -> None:
    """systemd adopts a MAINPID only once it is its child: in a ``-d`` master, wait (at most
    ``limit`` seconds) for the launcher's intermediate process to be gone."""
    deadline = time.monotonic() + limit
    start_ppid = int(os.environ.get("PYNGORA_LAUNCHER_PID", "0") or 0)
    while start_ppid and os.getppid() == start_ppid and time.monotonic() < deadline:
        time.sleep(0.01)


def _read_until(rfd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything written on ``rfd`` until EOF or ``deadline``; (data, reached EOF)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        try:
            ready, _, _ = select.select([rfd], [], [], left)
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(rfd, 4096)
        if not chunk:
            return data, True
        data += chunk


def _launcher_wait(rfd: int, child: int, timeout: float = START_TIMEOUT,
                   stop_timeout: float = 5.0, error_log: Optional[str] = None) -> None:
    """The launcher's whole life after fork: relay the master's report, exit with its code.
    ``child`` (the intermediate, gone at once) leads the daemon's session and process group."""
    data, eof = _read_until(rfd, time.monotonic() + timeout)
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass
    master = None
    lines = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("pid ") and line[4:].isdigit():
            master = int(line[4:])
        else:
            lines.append(line)
    msg = "\n".join(lines).strip()
    if not eof and not msg:
        _stop_daemon(rfd, child, master, stop_timeout)
        where = f" (see {error_log})" if error_log else ""
        sys.stderr.write(f"pyngora: the master (pid {master}) did not report ready within "
                         f"{timeout:g}s; stopped it{where}\n")
        sys.stderr.flush()
        os._exit(EXIT_START_TIMEOUT)
    os.close(rfd)
    if msg.startswith("ok"):
        pid = msg[2:].strip()
        if pid:
            sys.stdout.write(f"pyngora: master pid {pid}\n")
            sys.stdout.flush()
        os._exit(0)
    parts = msg.split(" ", 2)
    text = parts[2] if len(parts) == 3 and parts[0] == "err" else \
        "pyngora: the master exited during startup (see error_log)"
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    os._exit(_code(msg))


def _stop_daemon(rfd: int, group: int, master: Optional[int], stop_timeout: float) -> None:
    """Stop a master that never reported: SIGINT (a fast stop: it stops its workers and
    removes its pid file), then, after ``stop_timeout`` + 5 s, SIGKILL to its process group
    (the session ``daemonize`` made: the master and every process it forked). No orphan."""
    if master is not None:
        try:
            os.kill(master, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + stop_timeout + 5.0
    _read_until(rfd, deadline)  # EOF: the master reported its stop and is cleaning up
    os.close(rfd)
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # everyone is gone
        except PermissionError:
            return
        time.sleep(0.05)
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _code(msg: str) -> int:
    parts = msg.split(" ", 2)
    if len(parts) >= 2 and parts[0] == "err" and parts[1].isdigit():
        return int(parts[1])
    return 1


def report(fd: int, ok: bool, message: str = "", code: int = 1) -> None:
    """The daemon tells its launcher how startup went (once)."""
    if fd < 0:
        return
    text = f"ok {os.getpid()}\n" if ok else f"err {code} {message}\n"
    try:
        os.write(fd, text.encode())
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def raise_nofile() -> None:
    """The soft RLIMIT_NOFILE up to the hard one, for the master and the workers it forks (as
    Go does; a soft limit of 1024 is 500 proxied connections). Started by systemd, the unit's
    LimitNOFILE sets both already."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            log.ERROR.info("open files limit raised from %d to %d", soft, new)
    except (OSError, ValueError) as e:
        log.ERROR.warning("cannot raise the open files limit: %s", e)
