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
    this machine lacks: the user and group, the directories of the pid and log files (which
    must not be a file the configuration reads), of Unix listeners, the working directory.
    As nginx -t looks the user up and opens its logs: found here, not as a traceback once
    started. (The master runs this: nothing here may import ssl or asyncio.)"""
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
    read = _files_read(conf)
    for key in ("pid_file", "error_log", "access_log"):
        path = getattr(conf, key)
        if key == "pid_file" and not path:
            issue(key, "must name a file")
        if not path or not path.startswith("/"):  # (access_log: off | stdout)
            continue
        # (the pid file's directory may not exist yet: systemd's RuntimeDirectory, a tmpfs
        # /run, make it when the service starts; the master says so if it still cannot)
        if key != "pid_file" and not os.path.isdir(os.path.dirname(path)):
            issue(key, f"directory {os.path.dirname(path)} does not exist")
        elif os.path.isdir(path):
            issue(key, f"{path} is a directory")
        elif os.path.realpath(path) in read:
            # the pid file is rewritten and removed, the logs appended to: a configuration
            # file or a key named here would be lost
            what = read[os.path.realpath(path)]
            issue(key, f"{path} is a file this configuration reads ({what})")
    if conf.metrics_dir and os.path.exists(conf.metrics_dir) and not os.path.isdir(
            conf.metrics_dir):
        issue("metrics_dir", f"{conf.metrics_dir} is not a directory")
    if conf.working_directory and not os.path.isdir(conf.working_directory):
        issue("working_directory", f"{conf.working_directory} is not a directory")
    for i, sc in enumerate(conf.services):
        for j, listener in enumerate(sc.listeners):
            folder = os.path.dirname(listener.path)
            if listener.family == "unix" and folder and not os.path.isdir(folder):
                path = ("services", i, "listeners", j)
                issues.append(ConfigIssue(path, f"directory {folder} does not exist",
                                          conf.line_of(path)))
    return issues


def _files_read(conf: ServerConf) -> dict[str, str]:
    """The real paths of the files ``conf`` reads (itself, certificates and keys, the CA
    bundle) -> what each is, for the message."""
    read = {os.path.realpath(conf.source): "the configuration"} if conf.source else {}
    if conf.ca_file:
        read[os.path.realpath(conf.ca_file)] = "ca_file"
    for sc in conf.services:
        for listener in sc.listeners:
            tls = listener.tls
            for cert in ((tls, *tls.sni) if tls is not None else ()):
                read[os.path.realpath(cert.cert)] = "a certificate"
                read[os.path.realpath(cert.key)] = "a key"
    return read
