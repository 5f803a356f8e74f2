"""What a configuration file names that this machine lacks: checked before anything starts.

Used by ``-t`` and before a start or a reload (the YAML command line, ``pyngora.cli``), and by
``Server.bootstrap`` for a Python program's ``-t``. Not for ``-s``: stopping a running master
must not depend on them."""
from __future__ import annotations

import grp
import os
import pwd

from pyngora.config.schema import ConfigIssue, ServerConf

__all__ = ["server_issues"]


def server_issues(conf: ServerConf, need_services: bool = True) -> list[ConfigIssue]:
    """What would keep ``conf`` from serving, beyond its own syntax: no service at all when
    ``need_services`` (an empty or truncated file would start, or reload into, a server with
    no listener; a Python program adds its services in code), and what the file names that
    this machine lacks: the user and group, the directories of the log files, the working
    directory. As nginx -t looks the user up and opens its logs: found here, not as a
    traceback once started."""
    issues: list[ConfigIssue] = []

    def issue(key: str, message: str) -> None:
        issues.append(ConfigIssue((key,), message, conf.line_of((key,))))
    if need_services and not conf.services:
        issue("services", "no service to run (an empty or truncated file?)")
    if conf.user:
        try:
            pwd.getpwnam(conf.user)
        except KeyError:
            issue("user", f"no such user {conf.user!r}")
    if conf.group:
        try:
            grp.getgrnam(conf.group)
        except KeyError:
            issue("group", f"no such group {conf.group!r}")
    for key in ("error_log", "access_log"):
        path = getattr(conf, key)
        if path and path.startswith("/") and not os.path.isdir(os.path.dirname(path)):
            issue(key, f"directory {os.path.dirname(path)} does not exist")
    if conf.working_directory and not os.path.isdir(conf.working_directory):
        issue("working_directory", f"{conf.working_directory} is not a directory")
    return issues
