"""Daemon mode and the pid file.

`daemonize()` double-forks: the launching process stays in the foreground, waiting on a pipe,
and exits 0 only once the master reports it serves (or, with ``-u``, listens on
``upgrade_sock``); it exits 1 with the master's reason otherwise.
"""
from __future__ import annotations

import os
import sys
from typing import Optional


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
            return b"pyngora" in f.read()
    except OSError:
        return True  # cannot tell: assume it is, and refuse rather than run twice


def check_pid_file(path: str) -> None:
    """Refuse to start when the pid file names a live pyngora."""
    pid = read_pid(path)
    if pid is not None and pid != os.getpid() and is_pyngora(pid):
        raise PidFileError(f"pyngora already runs as pid {pid} (pid_file {path}); "
                           f"stop it, or upgrade with -s upgrade")


def write_pid_file(path: str, pid: Optional[int] = None) -> None:
    """Atomic: write a temporary file beside it, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{pid or os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str) -> None:
    """Remove it only if it still names this process (a new master may own it now)."""
    if read_pid(path) == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


def daemonize(error_log: Optional[str], working_directory: Optional[str]) -> int:
    """Fork twice, detach. Returns, in the daemon, the fd to report readiness on.
    The launcher never returns: it waits for that report and exits."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:  # the launcher
        os.close(wfd)
        _launcher_wait(rfd, pid)
    os.close(rfd)
    os.setsid()
    # the intermediate process: the master waits until it is gone before sending MAINPID=
    os.environ["PYNGORA_LAUNCHER_PID"] = str(os.getpid())
    if os.fork() > 0:
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


def _launcher_wait(rfd: int, child: int) -> None:
    data = b""
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass
    msg = data.decode("utf-8", "replace").strip()
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
