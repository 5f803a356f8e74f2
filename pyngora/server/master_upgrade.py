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
from pyngora.server import daemon
from pyngora.server.exits import EXIT_CONFIG, FatalError

if TYPE_CHECKING:  # pragma: no cover
    import collections

    from pyngora.config.schema import ServerConf
    from pyngora.server.listeners import SocketTable

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
    _wake_w: int
    _reload_after_handover: bool
    _handover_reason: str

    def _begin_stop(self, how: str) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def _count_event(self, name: str) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def handle_hup(self) -> None:  # pragma: no cover - Master's
        raise NotImplementedError

    def _receive_sockets(self) -> None:
        """At a -u start: wait on upgrade_sock for the old master's listening sockets."""
        from pyngora.upgrade.transfer_fd import TransferError, UpgradeListener
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
            self.upgrade_conn, adopted = listener.accept_sockets(self.conf.upgrade_timeout_seconds)
        except TransferError as e:
            raise FatalError(f"upgrade failed: {e}", EXIT_CONFIG) from None
        finally:
            listener.close()
        log.ERROR.info("received %d listening sockets from the old master", len(adopted))
        self.table.adopt(adopted)

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
        log.ERROR.error("upgrade failed, still serving: %s", self._handover_reason)
        self._count_event("upgrade_failed")
        if self._reload_after_handover:
            self._reload_after_handover = False
            self.handle_hup()
