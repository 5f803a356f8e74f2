"""A peer on ``upgrade_sock`` that sends the right magic and then stalls, with real masters
(2026-11-29 review). Before: the ``-u`` master read that peer with blocking reads until
``upgrade_timeout_seconds``, the old master (queued behind it, SIGQUIT) was never read, and
the upgrade failed ("upgrade failed, still serving"). Now connections are read side by side
and the old master's sockets are taken at once."""
from __future__ import annotations

import os
import signal
import socket
import time

from pyngora.upgrade.transfer_fd import MAGIC
from tests.process.test_process_attacks import _conf, _log, _serving, start  # noqa: F401
from tests.support import alive, free_port, get, wait_for


def test_a_peer_that_sends_the_magic_and_stalls_does_not_hold_up_the_upgrade(
        tmp_path, start) -> None:  # noqa: F811
    port = free_port()
    old = start(_conf(tmp_path, port, upgrade_timeout=10))
    _serving(old, port, 2)
    new = start(_conf(tmp_path, port, upgrade_timeout=10), "-u", name="b.yaml")
    sock_path = str(tmp_path / "a.sock")
    wait_for(lambda: os.path.exists(sock_path), 10, "upgrade_sock")
    stalled, trickle = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        stalled.connect(sock_path)
        stalled.sendall(MAGIC)  # the right magic, then nothing
        trickle.connect(sock_path)
        trickle.sendall(MAGIC[:3])  # the first bytes, the rest "a byte a second"
        time.sleep(0.5)  # the new master is reading them before the old one connects
        trickle.sendall(MAGIC[3:4])
        sent = time.monotonic()
        old.signal(signal.SIGQUIT)
        wait_for(lambda: "the new master is ready; draining" in _log(tmp_path), 8,
                 "the hand-over past the stalled peers")
        assert time.monotonic() - sent < 8
        assert old.wait_exit(20) == 0
        assert alive(new.pid) and get(port)[0] == 200
        assert "upgrade failed" not in _log(tmp_path), _log(tmp_path)
    finally:
        stalled.close()
        trickle.close()
