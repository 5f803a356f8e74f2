"""The master's side of a zero-downtime upgrade: a ``-u`` master receives the listening sockets
over ``upgrade_sock``; on SIGQUIT the running master hands them over, and drains only once the
new master says it serves (README "Zero-downtime upgrade").

A mixin of :class:`pyngora.server.master.Master`, whose state it uses; kept apart so that the
master's module stays about its loop and its workers.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Optional

from pyngora import log
from pyngora.server import counters, daemon
from pyngora.server.exits import EXIT_CONFIG, FatalError

if TYPE_CHECKING:  # pragma: no cover
    import collections

    from pyngora.config.schema import ServerConf
    from pyngora.server.listeners import SocketTable
    from pyngora.server.master_files import MasterFiles

__all__ = ["UpgradeHandover"]


class UpgradeHandover:
    """Receiving and handing over the listening sockets (Master's methods)."""

    # Master's state, as used here.
    conf: "ServerConf"
    table: "SocketTable"
    events: "collections.deque[str]"
    launcher_fd: int
    upgrade_conn: Any
    stopping: Optional[str]
    handover: Optional[threading.Thread]
    handed_over: bool
    _wake_r: int
    _wake_w: int
    pid: int
    files: "MasterFiles"
    _reload_after_handover: bool
    _handover_reason: str

    def _begin_stop(self, how: str) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def _count_event(self, name: str) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def _notify(self, *lines: str) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def handle_hup(self) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def _receive_sockets(self) -> bool:
        """At a -u start: wait on upgrade_sock for the old master's listening sockets.
        Returns False when SIGTERM or SIGINT came meanwhile: nothing was handed over, and
        the master stops at once (it used to sit out ``upgrade_timeout_seconds`` first)."""
        from pyngora.upgrade.transfer_fd import (TransferError, TransferInterrupted,
                                                 UpgradeListener)
        self._check_pid_file_writable()
        try:
            listener = UpgradeListener(self.conf.upgrade_sock)
        except (OSError, TransferError) as e:
            raise FatalError(f"cannot listen on upgrade_sock {self.conf.upgrade_sock}: {e}",
                             EXIT_CONFIG) from None
        # with -d the launcher returns now, so a SIGQUIT sent right after cannot miss us
        daemon.report(self.launcher_fd, True)
        self.launcher_fd = -1
        log.ERROR.info("waiting up to %ss on %s for the old master",
                       self.conf.upgrade_timeout_seconds, self.conf.upgrade_sock)
        try:
            self.upgrade_conn, adopted = listener.accept_sockets(
                self.conf.upgrade_timeout_seconds, self._wake_r,
                lambda: "term" in self.events or "int" in self.events)
        except TransferInterrupted:
            log.ERROR.info("stopped while waiting for the old master: nothing was handed over")
            return False
        except TransferError as e:
            raise FatalError(f"upgrade failed: {e}", EXIT_CONFIG) from None
        finally:
            listener.close()
        log.ERROR.info("received %d listening sockets from the old master", len(adopted))
        self.table.adopt(adopted)
        return True

    def _check_pid_file_writable(self) -> None:
        """A -u master writes pid_file only after the old master committed to drain: find
        out now that it can (a removed /run directory, a read-only one), when failing still
        leaves the old master serving. FatalError naming the file otherwise."""
        path = self.conf.pid_file
        try:
            daemon.write_pid_file(f"{path}.{os.getpid()}.check")
            os.unlink(f"{path}.{os.getpid()}.check")
        except OSError as e:
            raise FatalError(f"cannot write pid_file {path}: {e.strerror or e}; the old "
                             f"master keeps serving", EXIT_CONFIG) from None

    def _finish_upgrade(self, workers: int) -> None:
        """Every new worker accepts: say ``ready`` to the old master and take over its place
        (metrics directory, systemd's MAINPID, pid_file). FatalError when the old master
        did not commit: it keeps serving, so this one must not."""
        conn, self.upgrade_conn = self.upgrade_conn, None
        try:
            conn.send_ready()
        except Exception as e:
            raise FatalError(f"upgrade failed: the old master did not take our ready: {e}",
                             EXIT_CONFIG) from None
        finally:
            conn.close()
        counters.claim(self.conf)  # (only now: a failed upgrade leaves it the old master's)
        # systemd must know the new MAINPID before the old master can exit, and -s upgrade
        # returns as soon as it sees pid_file change: notify first, then write it.
        if os.environ.get("NOTIFY_SOCKET"):
            daemon.wait_launcher_gone()
        self._notify(f"MAINPID={self.pid}", "READY=1", f"STATUS=serving, {workers} workers")
        try:
            daemon.write_pid_file(self.conf.pid_file)
        except OSError as e:
            # The old master drains already: this one is the server now, pid file or not
            # (it used to die here, taking the service down with it).
            log.ERROR.error("cannot write pid_file %s: %s; serving without it (-s cannot "
                            "find this master: signal pid %d)", self.conf.pid_file,
                            e.strerror or e, self.pid)
            return
        self.files.pid_path = self.conf.pid_file

    def handle_quit(self) -> None:
        """Graceful upgrade: hand the sockets to a new master, drain only once it is ready."""
        if self.stopping or self.handover is not None:
            return
        from pyngora.upgrade.transfer_fd import send_sockets
        sockets = dict(self.table.sockets)
        timeout = self.conf.upgrade_timeout_seconds
        path = self.conf.upgrade_sock
        log.ERROR.info("SIGQUIT: handing %d sockets to the new master on %s", len(sockets), path)

        def work() -> None:
            result = send_sockets(path, sockets, timeout)
            self._handover_reason = result.reason
            self.events.append("handover_ok" if result.ok else "handover_failed")
            os.write(self._wake_w, b"!")

        self._handover_reason = ""
        self.handover = threading.Thread(target=work, name="upgrade", daemon=True)
        self.handover.start()

    def handle_handover_ok(self) -> None:
        """The new master serves on the sockets it received: this one drains and stops."""
        self.handover = None
        self.handed_over = True
        if self.stopping:  # a stop came during the hand-over: the sockets were left for it
            self.table.close_all(unlink=False)
        self._count_event("upgrade")
        log.ERROR.info("the new master is ready; draining")
        try:
            import setproctitle
            setproctitle.setproctitle("pyngora: old master (draining)")
        except Exception:
            pass
        self._begin_stop("graceful")

    def handle_handover_failed(self) -> None:
        """The hand-over failed (no new master, or it did not become ready): keep serving,
        and apply a SIGHUP that waited for the hand-over."""
        self.handover = None
        if self.stopping:
            self.table.close_all(unlink=True)
            log.ERROR.error("upgrade failed while stopping: %s", self._handover_reason)
        else:
            log.ERROR.error("upgrade failed, still serving: %s", self._handover_reason)
        self._count_event("upgrade_failed")
        if self._reload_after_handover:
            self._reload_after_handover = False
            self.handle_hup()
