"""Pingora's `Server` and `Opt`: the Python entry point of a pyngora program.

    server = Server(Opt.parse_args())
    server.bootstrap()
    server.add_service(svc)
    server.run_forever()
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from pyngora import log
from pyngora.config.schema import ConfigError, ServerConf

if TYPE_CHECKING:  # pragma: no cover - services.base imports asyncio: not in the master
    from pyngora.services.base import Service


@dataclass
class Opt:
    """The command line of SPEC section 2."""

    conf: Optional[str] = None
    daemon: bool = False
    upgrade: bool = False
    test: bool = False
    signal: Optional[str] = None
    version: bool = False

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="pyngora", description="pyngora reverse proxy server")
        p.add_argument("-c", "--conf", help="YAML configuration file")
        p.add_argument("-d", "--daemon", action="store_true", help="run in the background")
        p.add_argument("-u", "--upgrade", action="store_true",
                       help="take over the listening sockets of a running master")
        p.add_argument("-t", "--test", action="store_true", help="validate the configuration")
        p.add_argument("-s", "--signal",
                       choices=["upgrade", "reload", "stop", "quit", "fast-stop", "reopen"],
                       help="talk to the running master named by pid_file")
        p.add_argument("--version", action="store_true", help="print the version")
        return p

    @classmethod
    def parse_args(cls, argv: Optional[Sequence[str]] = None) -> "Opt":
        ns = cls.parser().parse_args(argv)
        return cls(conf=ns.conf, daemon=ns.daemon, upgrade=ns.upgrade, test=ns.test,
                   signal=ns.signal, version=ns.version)


class Server:
    """Holds the configuration and the services; `run_forever()` becomes the master."""

    def __init__(self, opt: Optional[Opt] = None,
                 build_services: Optional[Callable[[ServerConf], list[Service]]] = None) -> None:
        self.opt = opt or Opt()
        self.configuration = ServerConf()
        self.services: list[Service] = []
        self.build_services = build_services
        self._bootstrapped = False

    def bootstrap(self) -> None:
        """Load the configuration named by ``-c`` (exit 1 with every error when invalid)."""
        if self.opt.conf:
            from pyngora.config.loader import load
            try:
                self.configuration = load(self.opt.conf)
            except ConfigError as e:
                sys.stderr.write(f"{e}\n")
                sys.exit(1)
        self._bootstrapped = True

    def add_service(self, svc: Service) -> None:
        self.services.append(svc)

    def add_services(self, services: Sequence[Service]) -> None:
        self.services.extend(services)

    def run_forever(self) -> None:
        """Become the master (daemonising first with ``-d``); exits the process with its code."""
        sys.exit(self.run())

    def run(self) -> int:
        from pyngora.server.daemon import daemonize
        from pyngora.server.master import Master
        if not self._bootstrapped:
            self.bootstrap()
        conf = self.configuration
        if self.opt.daemon or conf.daemon:
            launcher_fd = daemonize(conf.error_log, conf.working_directory,
                                    conf.graceful_shutdown_timeout_seconds)
        else:
            launcher_fd = -1
            if conf.working_directory:
                os.chdir(conf.working_directory)
        log.setup(conf.error_log, conf.log_level, "off")
        reload_conf: Optional[Callable[[], ServerConf]] = None
        if self.opt.conf and self.build_services is not None:
            reload_conf = _loader(os.path.abspath(self.opt.conf))
        title = f"pyngora: master -c {self.opt.conf}" if self.opt.conf else "pyngora: master"
        master = Master(conf, self.services, upgrade=self.opt.upgrade,
                        build_services=self.build_services, reload_conf=reload_conf,
                        launcher_fd=launcher_fd, title=title)
        return master.run()


def _loader(path: str) -> Callable[[], ServerConf]:
    """SIGHUP re-reads the same file, wherever the master's working directory is now."""
    def load() -> ServerConf:
        from pyngora.config.loader import load as load_file
        return load_file(path)
    return load
