"""sd_notify from the real master, read on a real AF_UNIX datagram socket as systemd would."""
from __future__ import annotations

import signal
import socket

from tests.support import free_port, wait_for


def test_ready_status_reloading_watchdog_stopping(tmp_path, pyngora_factory) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    got: list[str] = []

    def read() -> list[str]:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except BlockingIOError:
                return got
    port = free_port()
    conf = (f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
            f"metrics_dir: {tmp_path}/m\nservices:\n  - name: origin\n    type: static\n"
            f"    listeners: ['127.0.0.1:{port}']\n")
    p = pyngora_factory(conf, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}).start()
    try:
        wait_for(lambda: any("READY=1" in m for m in read()), 20, "READY=1")
        assert any("STATUS=serving" in m for m in got)
        wait_for(lambda: sum("WATCHDOG=1" in m for m in read()) >= 3, 10, "watchdog pings")
        # counted before the signal: one read may bring both RELOADING=1 and the next READY=1
        n_ready = sum("READY=1" in m for m in read())
        p.signal(signal.SIGHUP)
        wait_for(lambda: any("RELOADING=1" in m for m in read()), 10, "RELOADING=1")
        wait_for(lambda: sum("READY=1" in m for m in read()) > n_ready, 10, "READY=1 after reload")
        p.signal(signal.SIGTERM)
        assert p.wait_exit(20) == 0
        assert any("STOPPING=1" in m for m in read())
    finally:
        sock.close()
