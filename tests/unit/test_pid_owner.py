"""``daemon.is_pyngora``: whether the process a pid file names is a pyngora master, so that
``-s`` signals it and a second start refuses. A process that merely mentions the word in its
arguments (``tail -f pyngora.log``, an editor on ``pyngora.yaml``) is not one: ``-s reload``
used to send it SIGHUP."""
from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest

from pyngora.server.daemon import is_pyngora
from tests.support import wait_for

_SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def spawn() -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(argv0: str, *args: str) -> int:
        p = subprocess.Popen([argv0, "-c", _SLEEP, *args], executable=sys.executable,
                             stdin=subprocess.DEVNULL)
        procs.append(p)
        return p.pid
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _wait_exec(pid: int, want: bytes) -> None:
    """Until the child has exec'd (its cmdline is its own, not the fork's copy of ours)."""
    wait_for(lambda: want in open(f"/proc/{pid}/cmdline", "rb").read(), 10, "the exec")


@pytest.mark.parametrize("argv0, args, expected", [
    ("pyngora: master -c /etc/pyngora/pyngora.yaml", (), True),   # its title
    ("pyngora: old master (draining)", (), True),
    ("python3", ("-m", "pyngora"), True),                         # before its title is set
    ("/opt/pyngora/bin/pyngora", (), True),
    ("tail", ("-f", "/var/log/pyngora/error.log"), False),
    ("vim", ("/etc/pyngora/pyngora.yaml",), False),
    ("python3", ("pyngora-notes.txt",), False),
])
def test_only_pyngora_itself_counts(spawn, argv0: str, args: tuple, expected: bool) -> None:
    pid = spawn(argv0, *args)
    _wait_exec(pid, _SLEEP.encode())
    assert is_pyngora(pid) is expected
