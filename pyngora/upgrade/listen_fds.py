"""systemd socket activation (``sd_listen_fds``): the sockets a unit's .socket passed at FD 3..

The master adopts them at start, keys them by address, and passes them on at every upgrade
like any other listening socket.
"""
from __future__ import annotations

import os
import socket
from typing import MutableMapping

from pyngora.upgrade.transfer_fd import TransferError

_SD_LISTEN_FDS_START = 3


def adopt_systemd_sockets(env: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """Adopt the sockets systemd passed by socket activation (``sd_listen_fds``).

    Called once by the master at start. Returns the sockets at FD 3.. when ``LISTEN_PID`` is
    our pid (an empty list otherwise), non-blocking with CLOEXEC set, and removes ``LISTEN_PID``,
    ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from ``env`` in every case so children do not
    see them. Raises TransferError when the variables are malformed or an FD is no socket.
    """
    pid_text = env.pop("LISTEN_PID", None)
    count_text = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise TransferError(
            f"bad socket activation variables LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}"
        ) from None
    if pid != os.getpid():
        return []  # meant for another process (e.g. a wrapper that exec'd us after a fork)
    if count < 0:
        raise TransferError(f"bad LISTEN_FDS={count_text!r}")
    adopted: list[socket.socket] = []
    try:
        for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + count):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                raise TransferError(
                    f"LISTEN_FDS: descriptor {fd} is not a socket ({e.strerror or e})"
                ) from None
            adopted.append(sock)
            os.set_inheritable(fd, False)
            sock.setblocking(False)  # as for sockets from the old master: workers need it
        return adopted
    except BaseException:
        for sock in adopted:
            sock.close()
        raise
