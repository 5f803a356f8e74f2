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
                 build_services: Optional[Callable[[ServerConf], list[Service]]] = None,
                 test_file: Optional[Callable[[str], ServerConf]] = None,
                 program: Optional[list[str]] = None) -> None:
        """``build_services``: the services of a configuration, for SIGHUP (None: a reload
        keeps this program's services). ``test_file``: what ``-t`` checks, loading the file
        and raising ConfigError with every issue (None: the file and the machine's side of
        it, as a program's services are its own code). ``program``: the command that starts
        this program, without its options (None: the one this process was started with),
        which ``-s upgrade`` runs with ``-c FILE -u -d``."""
        self.opt = opt or Opt()
        self.configuration = ServerConf()
        self.services: list[Service] = []
        self.build_services = build_services
        self.test_file = test_file or _test_file
        self.program = program
        self._bootstrapped = False

    def bootstrap(self) -> None:
        """Load the configuration named by ``-c`` (exit 1 with every error when invalid).

        Also where a program's command line ends early, as Pingora's ``bootstrap`` does for
        ``-t``: ``--version`` prints it; ``-t`` checks the file and what it names on this
        machine (the program's services are its own code) and exits 0 or 1; ``-s SIGNAL``
        talks to the running master named by ``pid_file`` and exits with the answer (``-s
        upgrade`` starts this same program again with ``-u -d``)."""
        opt = self.opt
        if opt.version:
            from pyngora.version import __version__
            print(f"pyngora {__version__} (Python {sys.version.split()[0]})")
            sys.exit(0)
        if opt.conf:
            # absolute before anything changes directory (-d goes to /): SIGHUP re-reads
            # this path, and -s upgrade hands it to the new master
            opt.conf = os.path.abspath(opt.conf)
            from pyngora.config.loader import load
            try:
                # -s needs the file's pid_file only: stopping, reopening or reloading a
                # running master must not depend on importing its apps or loading its
                # certificates here (-s reload and -s upgrade have a master check them)
                self.configuration = self.test_file(opt.conf) if opt.test else load(opt.conf)
            except ConfigError as e:
                sys.stderr.write(f"{e}\n")
                partial = _signal_anyway(opt.signal, e)
                if partial is None:
                    if opt.test:
                        sys.stderr.write(f"configuration {opt.conf} test failed\n")
                    sys.exit(1)
                # The running master was started from an older file, or by an older
                # pyngora: logrotate's -s reopen must still reach it
                sys.stderr.write(f"pyngora: signalling the running master anyway (the "
                                 f"file's pid_file is {partial.pid_file})\n")
                self.configuration = partial
        if opt.test:
            print(f"configuration {opt.conf or '(built-in defaults)'} is ok")
            sys.exit(0)
        if opt.signal:
            if opt.upgrade:  # a new master started by -s upgrade never signals in turn
                sys.stderr.write("pyngora: -s and -u do not go together\n")
                sys.exit(2)
            if not opt.conf:
                sys.stderr.write("pyngora: -s needs -c FILE (to find pid_file)\n")
                sys.exit(2)
            from pyngora.server.control import send
            program = ([*self.program, "-c", opt.conf] if self.program is not None
                       else _this_program(opt.conf))
            if program is None:
                sys.stderr.write("pyngora: cannot tell this command's own options apart: "
                                 "write -s SIGNAL, -d and -u as separate options\n")
                sys.exit(2)
            sys.exit(send(self.configuration, opt.conf, opt.signal, program))
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


def _this_program(conf: str) -> Optional[list[str]]:
    """The command that started this process (``python -m pkg.mod ...`` or ``python prog.py
    ...``) without its ``-s``/``--signal``, ``-d`` and ``-u``, and with ``conf`` (absolute)
    as its ``-c``: what ``-s upgrade`` starts again, with ``-u -d`` added. None when an
    option of Opt is left in it, spelled in a way this does not take apart (``-supgrade``,
    ``--sig``): copied through, the new master would upgrade in turn, without end."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    # The program's own arguments follow the interpreter's: the script, or -m and the module
    # (-X and -W take a value).
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 2 if argv[i] in ("-X", "-W") else 1
    start = min(i + (2 if i < len(argv) and argv[i] == "-m" else 1), len(argv))
    out, rest = argv[:start], iter(argv[start:])
    for a in rest:
        if a in ("-s", "--signal"):
            next(rest, None)
        elif a in ("-c", "--conf"):
            next(rest, None)
            out += [a, conf]
        elif a.startswith("--conf="):
            out.append("--conf=" + conf)
        elif not (a.startswith("--signal=") or a in ("-d", "--daemon", "-u", "--upgrade")):
            out.append(a)
    left, _ = Opt.parser().parse_known_args(out[start:])
    if left.signal or left.daemon or left.upgrade or left.test or left.version:
        return None
    return out


def _signal_anyway(signal: Optional[str], e: ConfigError) -> Optional[ServerConf]:
    """For ``-s`` other than upgrade, a file with issues that still names its pid_file
    clearly: what was read of it (None: no signal is sent)."""
    if not signal or signal == "upgrade" or e.partial is None:
        return None
    if any(i.path[:1] == ("pid_file",) for i in e.issues):
        return None
    return e.partial[0]


def _test_file(path: str) -> ServerConf:
    """``-t`` of a program whose services are its own code: the file, and what it names on
    this machine (user, directories, ...)."""
    from pyngora.config.loader import load
    from pyngora.server.preflight import server_issues
    conf = load(path)
    issues = server_issues(conf, need_services=False)
    if issues:
        raise ConfigError(path, issues)
    return conf


def _loader(path: str) -> Callable[[], ServerConf]:
    """SIGHUP re-reads the same file, wherever the master's working directory is now."""
    def load() -> ServerConf:
        from pyngora.config.loader import load as load_file
        return load_file(path)
    return load
