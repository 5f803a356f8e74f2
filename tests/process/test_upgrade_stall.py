"""A peer on ``upgrade_sock`` that sends the right magic and then stalls, with real masters
(2026-11-29 review). Before: the ``-u`` master read that peer with blocking reads until
``upgrade_timeout_seconds``, the old master (queued behind it, SIGQUIT) was never read, and
the upgrade failed ("upgrade failed, still serving"). Now connections are read side by side
and the old master's sockets are taken at once."""
from __future__ import annotations

import time

from pyngora.upgrade.transfer_fd import MAGIC
from tests.process.test_process_attacks import _log, hand_over_past, start  # noqa: F401


def test_a_peer_that_sends_the_magic_and_stalls_does_not_hold_up_the_upgrade(
        tmp_path, start) -> None:  # noqa: F811
    def say(peers: list) -> None:
        stalled, trickle = peers
        stalled.sendall(MAGIC)  # the right magic, then nothing
        trickle.sendall(MAGIC[:3])  # the first bytes, the rest "a byte a second"
        time.sleep(0.5)  # the new master is reading them before the old one connects
        trickle.sendall(MAGIC[3:4])

    hand_over_past(tmp_path, start, 2, say)
    assert "upgrade failed" not in _log(tmp_path), _log(tmp_path)
