"""The master's own files: its pid file and its error log, which a reload may move (as
nginx's do), and the log files it hands to the workers' user for a rotation (SIGUSR1)."""
from __future__ import annotations

import os
from typing import Optional

from pyngora import log
from pyngora.config.schema import ServerConf
from pyngora.server import daemon
from pyngora.server.worker import worker_ids

__all__ = ["MasterFiles", "give_logs"]


class MasterFiles:
    """The pid file one master wrote, and what its own log was set up with (Server.run)."""

    __slots__ = ("pid_path", "log_conf")

    def __init__(self, conf: ServerConf) -> None:
        self.pid_path: Optional[str] = None  # written by the master once it may serve
        self.log_conf = (conf.error_log, conf.log_level)

    def follow(self, conf: ServerConf) -> None:
        """Runs when a reload's generation serves: the pid file moves to a new ``pid_file``
        (the old one removed; kept, and said, when the new one cannot be written), and the
        master's log to a new ``error_log`` or ``log_level``."""
        path = self.pid_path
        if path is not None and conf.pid_file != path:
            try:
                daemon.write_pid_file(conf.pid_file)
            except OSError as e:
                log.ERROR.error("cannot write the new pid_file %s: %s; %s stays",
                                conf.pid_file, e.strerror or e, path)
            else:
                daemon.remove_pid_file(path)
                self.pid_path = conf.pid_file
        if (conf.error_log, conf.log_level) != self.log_conf:
            old = self.log_conf
            try:
                log.setup(conf.error_log, conf.log_level, "off")
            except (OSError, ValueError) as e:  # unwritable: the old log is better than none
                log.setup(old[0], old[1], "off")
                log.ERROR.error("cannot write the new error_log %s: %s; %s stays",
                                conf.error_log, e, old[0])
                return
            self.log_conf = (conf.error_log, conf.log_level)
            log.reopen()  # stderr (where -d sent it) follows the new file too


def give_logs(conf: ServerConf) -> None:
    """Runs on SIGUSR1 after the master's own reopen, before the workers': with
    ``user``/``group``, as nginx's reopen, the master creates each log file the workers
    write and hands it to that user, so workers that dropped root can open it again after a
    rotation (the new file would otherwise be root's, or not creatable in a directory only
    root may write)."""
    try:
        ids = worker_ids(conf)
    except KeyError:
        return  # an unknown user: the workers could not have started either
    if ids is None:
        return
    uid, gid = ids
    for path in (conf.error_log, conf.access_log):
        if not path or not path.startswith("/"):
            continue  # off, stdout, or stderr
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            finally:
                os.close(fd)
        except OSError as e:
            log.ERROR.warning("cannot give %s to the workers' user: %s", path, e)
