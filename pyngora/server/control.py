"""`pyngora -s SIGNAL`: talk to the running master named by pid_file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

from pyngora.config.schema import ServerConf
from pyngora.server.daemon import is_pyngora, pid_alive, read_pid

SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "quit": signal.SIGQUIT,
           "fast-stop": signal.SIGINT, "reopen": signal.SIGUSR1}


def send(conf: ServerConf, conf_path: str, name: str,
         program: Optional[list[str]] = None) -> int:
    """Returns the exit code; prints the reason on failure. ``program``: the command that
    ``upgrade`` starts the new master with (``-u -d`` added); pyngora's own by default."""
    pid = read_pid(conf.pid_file)
    if pid is None or not is_pyngora(pid):
        sys.stderr.write(f"pyngora: no running master (pid_file {conf.pid_file})\n")
        return 1
    if name == "upgrade":
        return upgrade(conf, conf_path, pid, program)
    os.kill(pid, SIGNALS[name])
    return 0


def upgrade(conf: ServerConf, conf_path: str, old_pid: int,
            program: Optional[list[str]] = None) -> int:
    """Start a new master with -u -d, SIGQUIT the old one, wait until the new one serves."""
    started = time.monotonic()
    cmd = [*(program or [sys.executable, "-m", "pyngora", "-c", conf_path]), "-u", "-d"]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(f"pyngora: upgrade failed: the new master did not start: "
                         f"{proc.stderr.strip() or proc.returncode}\n")
        return 1
    new_pid = 0
    for word in proc.stdout.split():
        if word.isdigit():
            new_pid = int(word)
    os.kill(old_pid, signal.SIGQUIT)
    deadline = time.monotonic() + conf.upgrade_timeout_seconds + 5
    while time.monotonic() < deadline:
        if new_pid and not pid_alive(new_pid):
            sys.stderr.write(f"pyngora: upgrade failed: the new master {new_pid} exited; the old "
                             f"master {old_pid} keeps serving (see error_log)\n")
            return 1
        pid = read_pid(conf.pid_file)
        # Our new master's pid, not any other: two upgrades at once must not both see the
        # first one's pid and say success (the second new master gets no sockets).
        if pid is not None and pid != old_pid and (pid == new_pid or not new_pid) \
                and pid_alive(pid):
            sys.stdout.write(f"pyngora: upgraded: master {old_pid} -> {pid} in "
                             f"{time.monotonic() - started:.2f}s\n")
            return 0
        time.sleep(0.02)
    sys.stderr.write("pyngora: upgrade failed: the new master did not take over within "
                     f"{conf.upgrade_timeout_seconds}s; the old master {old_pid} keeps serving "
                     "(see error_log)\n")
    return 1
