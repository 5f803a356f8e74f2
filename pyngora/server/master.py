"""The master: binds (or adopts) every listener, forks and supervises workers, and turns signals
into stops, reloads and upgrades.

It is a loop over events. Signal handlers only enqueue; ``handle_*`` do the work. The one signal
table is `SIGNALS`. The master never imports uvloop, httptools, h2 or prometheus_client, so it
stays small and forks cheaply.
"""
from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from pyngora import log
from pyngora.config.schema import ConfigError, ServerConf
from pyngora.server import counters, daemon
from pyngora.server.exits import EXIT_CONFIG, EXIT_OK, EXIT_WORKERS, FatalError
from pyngora.server.generation import Generation, Worker, _worker_owner
from pyngora.server.listeners import SocketTable, close_listener, socket_key
from pyngora.server.master_files import MasterFiles, give_logs
from pyngora.server.master_upgrade import UpgradeHandover
from pyngora.server.worker import EXIT_BOOT_FAILED, EXIT_FINISHED, WorkerSpec, run_worker

if TYPE_CHECKING:  # pragma: no cover - services.base imports asyncio: not in the master
    from pyngora.services.base import Service

try:
    from pyngora.server import systemd as sd
except ImportError:  # pragma: no cover - until the systemd room lands
    sd = None  # type: ignore[assignment]

# A generation not ready after this long: log what waits for what (tests shorten it).
WAIT_WARN_SECONDS = float(os.environ.get("PYNGORA_WAIT_WARN_SECONDS", "10"))
MAX_BOOT_FAILURES = 5

SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "hup",
    signal.SIGUSR1: "usr1",
    signal.SIGCHLD: "chld",
}


class Master(UpgradeHandover):
    """One pyngora master process. `run()` returns the exit code."""

    def __init__(self, conf: ServerConf, services: list[Service], *, upgrade: bool = False,
                 build_services: Optional[Callable[[ServerConf], list[Service]]] = None,
                 reload_conf: Optional[Callable[[], ServerConf]] = None,
                 launcher_fd: int = -1, title: str = "pyngora: master") -> None:
        self.conf = conf
        self.upgrade_mode = upgrade
        self.build_services = build_services
        self.reload_conf = reload_conf
        self.launcher_fd = launcher_fd
        self._foreground = launcher_fd < 0  # stderr is the operator's, not the error log
        self.title = title
        self.table = SocketTable()
        self.gens: list[Generation] = [Generation(1, conf, services)]
        self.workers: dict[int, Worker] = {}
        self.events: collections.deque[str] = collections.deque()
        self.stopping: Optional[str] = None       # "graceful" | "fast"
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.handed_over = False
        self.handover: Optional[threading.Thread] = None
        self.upgrade_conn = None
        self.pid = os.getpid()
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._serving_reported = False
        # "serving" was told to someone who acted on it (a -d launcher that exited 0, an old
        # master that drains): from then on no crash loop may stop this master (exit 3).
        self._promised = False
        self._reload_after_handover = False  # a SIGHUP came during a hand-over (handle_hup)
        self.files = MasterFiles(conf)  # its pid file and log, moved by a reload
        self._serving_since = 0.0
        # sockets generation N no longer names: (N, key, socket), closed once every older
        # generation is draining (its workers take what is queued first), or put back when N
        # fails to start
        self._dropped: list[tuple[int, str, socket.socket]] = []

    # ------------------------------------------------------------------ start-up
    def run(self) -> int:
        try:
            self._setup_signals()
            if self._bootstrap():
                self._loop()
        except FatalError as e:
            log.ERROR.error("%s", e)
            if self._foreground and self.conf.error_log:
                sys.stderr.write(f"pyngora: {e} (see {self.conf.error_log})\n")
            daemon.report(self.launcher_fd, False, str(e), e.code)
            self.launcher_fd = -1
            self._kill_all(signal.SIGKILL)
            self.exit_code = e.code
        finally:
            self._cleanup()
        return self.exit_code

    def _setup_signals(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig, name in SIGNALS.items():
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.events.append(SIGNALS[signum])

    def _bootstrap(self) -> bool:
        """Bind or adopt every socket and fork the first workers; False when a stop came
        while a -u master waited for the old one (nothing to serve, nothing to stop)."""
        conf = self.conf
        try:
            import setproctitle
            setproctitle.setproctitle(self.title)
        except Exception:
            pass
        daemon.raise_nofile()
        if not self.upgrade_mode:
            try:
                daemon.check_pid_file(conf.pid_file)
            except daemon.PidFileError as e:
                raise FatalError(str(e), EXIT_CONFIG) from None
        self._prepare_metrics(fresh=not self.upgrade_mode)
        if self.upgrade_mode:
            if not self._receive_sockets():
                return False
        else:
            self._adopt_systemd()
        self._bind(self.gens[0])
        if not self.upgrade_mode:
            try:
                daemon.write_pid_file(conf.pid_file)
            except OSError as e:
                raise FatalError(f"cannot write pid_file {conf.pid_file}: {e.strerror or e}",
                                 EXIT_CONFIG) from None
            self.files.pid_path = conf.pid_file
        self._spawn_ready_services(self.gens[0])
        return True

    def _prepare_metrics(self, fresh: bool) -> None:
        try:
            counters.prepare(self.conf, fresh, _worker_owner(self.conf))
        except counters.MetricsDirTaken as e:
            raise FatalError(str(e), EXIT_CONFIG) from None

    def _adopt_systemd(self) -> None:
        try:
            from pyngora.upgrade.listen_fds import adopt_systemd_sockets
        except ImportError:
            return
        socks = adopt_systemd_sockets()
        if socks:
            log.ERROR.info("adopted %d sockets from systemd", len(socks))
            self.table.adopt_by_address(socks)

    def _bind(self, gen: Generation) -> None:
        """Make sure every socket of ``gen`` exists; drop the ones no longer named. On a bind
        error, the sockets this call bound are closed again and nothing is dropped."""
        from pyngora.server.listeners import BindError
        keys: set[str] = set()
        before = set(self.table.sockets)
        try:
            for svc in gen.services:
                for listener in svc.listeners:
                    slots = range(gen.slots(svc)) if gen.pinned(svc) else [None]
                    for slot in slots:
                        self.table.ensure(svc.name, listener, slot)
                        keys.add(socket_key(svc.name, listener, slot))
        except BindError as e:
            for key in set(self.table.sockets) - before:
                sock = self.table.sockets.pop(key)
                if not self.table.holds(sock):  # (a renamed service's shares an old key's)
                    close_listener(sock, unlink=False)
            raise FatalError(str(e), EXIT_CONFIG) from None
        for key, sock in self.table.keep_only(keys):
            self._dropped.append((gen.number, key, sock))

    # ------------------------------------------------------------------ workers
    def _spawn_ready_services(self, gen: Generation) -> None:
        names_ready = {s.name for s in gen.services if gen.service_ready(s)}
        for svc in gen.services:
            if svc.name in gen.started:
                continue
            if all(d.name in names_ready for d in svc.dependencies):
                gen.started.add(svc.name)
                for slot in range(gen.slots(svc)):
                    self._spawn(gen, svc, slot)

    def _sockets_for(self, gen: Generation, svc: Service, slot: int) -> list:
        out = []
        for listener in svc.listeners:
            key = socket_key(svc.name, listener, slot if gen.pinned(svc) else None)
            out.append((listener, self.table.sockets[key]))
        return out

    def _spawn(self, gen: Generation, svc: Service, slot: int) -> None:
        kind = "background" if svc.is_background else "worker"
        title = (f"pyngora: background {svc.name}" if svc.is_background
                 else f"pyngora: worker {svc.name}/{slot}")
        spec = WorkerSpec(svc, slot, gen.number, gen.conf, self._sockets_for(gen, svc, slot),
                          title, sharers=1 if gen.pinned(svc) else gen.slots(svc))
        rfd, wfd = os.pipe()
        spec.ready_fd = wfd
        keep = {wfd} | {s.fileno() for _, s in spec.sockets}
        pid = os.fork()
        if pid == 0:
            run_worker(spec, keep)  # never returns
        os.close(wfd)
        os.set_blocking(rfd, False)
        w = Worker(pid, spec, rfd)
        self.workers[pid] = w
        self.selector.register(rfd, selectors.EVENT_READ, w)
        self._publish_workers(svc.name)
        log.ERROR.debug("started %s %s/%d pid %d (generation %d)", kind, svc.name, slot, pid,
                        gen.number)

    def _on_worker_readable(self, w: Worker) -> None:
        try:
            data = os.read(w.fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(w.fd)
            os.close(w.fd)
            w.fd = -1
            return
        if b"R" in data and not w.ready:
            w.ready = True
            gen = self._gen(w.gen)
            if gen is not None:
                key = (w.spec.service.name, w.spec.slot)
                gen.ready_slots.add(key)
                self._spawn_ready_services(gen)

    def _gen(self, number: int) -> Optional[Generation]:
        for g in self.gens:
            if g.number == number:
                return g
        return None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            if w.fd >= 0:
                self.selector.unregister(w.fd)
                os.close(w.fd)
            self._mark_dead(pid)
            self._publish_workers(w.spec.service.name)
            code = os.waitstatus_to_exitcode(status)
            gen = self._gen(w.gen)
            key = (w.spec.service.name, w.spec.slot)
            if gen is not None:
                gen.ready_slots.discard(key)
            if self.stopping or gen is None or gen.retired:
                continue
            if code == EXIT_FINISHED and w.spec.service.is_background:
                # Its start() returned: the work is done (Pingora calls start once). Not
                # restarted; ready for the services that depend on it, notified or not.
                log.ERROR.info("%s (pid %d) finished", w.spec.title, pid)
                gen.ready_slots.add(key)
                self._spawn_ready_services(gen)
                continue
            # A worker that dies within a second of its start is crash-looping, ready or not.
            if w.ready and time.monotonic() - w.started >= 1.0:
                log.ERROR.warning("%s (pid %d) exited with %s; restarting", w.spec.title, pid,
                                  code)
                gen.respawn_at[key] = time.monotonic()
                gen.boot_failures.pop(key, None)
                self._count_restart(w.spec.service.name)
            else:
                if w.ready:
                    self._count_restart(w.spec.service.name)
                n = gen.boot_failures.get(key, 0) + 1
                gen.boot_failures[key] = n
                why = "failed to boot" if code == EXIT_BOOT_FAILED else f"exited with {code}"
                if n >= MAX_BOOT_FAILURES and self._abandon(gen, f"{w.spec.title} {why}"):
                    continue
                # A crash loop right after the first start is a server that cannot start,
                # even when its services said "ready" before dying.
                starting = not self._serving_reported or (
                    gen.number == 1 and not self._promised
                    and time.monotonic() - self._serving_since < 10.0)
                if n >= MAX_BOOT_FAILURES and not starting:
                    # Exit 3 is for a server that cannot start. Once serving, one failing
                    # service never takes the others down: keep retrying, slowly, loudly.
                    log.ERROR.error("%s %s %d times in a row; retrying every 5 s",
                                    w.spec.title, why, n)
                    gen.respawn_at[key] = time.monotonic() + 5.0
                    continue
                if n >= MAX_BOOT_FAILURES:
                    raise FatalError(f"{w.spec.title} {why} {n} times in a row; stopping "
                                     f"(see the error log above)", EXIT_WORKERS)
                delay = min(0.1 * 2 ** (n - 1), 5.0)
                log.ERROR.warning("%s (pid %d) %s; retry %d in %.1fs", w.spec.title, pid, why,
                                  n, delay)
                gen.respawn_at[key] = time.monotonic() + delay

    def _abandon(self, gen: Generation, why: str) -> bool:
        """A reload's generation that cannot start is given up, and the generation serving
        now keeps serving (SIGHUP's promise: never an outage). False when ``gen`` is the only
        one, or already served: then the master must stop."""
        older = [g for g in self.gens if g.number < gen.number and not g.retired]
        if gen.served or not older:
            return False
        log.ERROR.error("reload failed: %s %d times in a row; keeping generation %d",
                        why, MAX_BOOT_FAILURES, older[-1].number)
        gen.retired = True
        self._kill_all(signal.SIGTERM, gen.number)
        self.gens.remove(gen)
        for item in [d for d in self._dropped if d[0] == gen.number and d[1]]:
            self.table.sockets[item[1]] = item[2]  # the serving generation's again
            self._dropped.remove(item)
        self.conf = older[-1].conf
        self._bind(older[-1])  # what only the failed generation bound is dropped again
        self._notify("READY=1", f"STATUS=reload failed, generation {older[-1].number} serving")
        return True

    def _say_what_waits(self, gen: Generation) -> None:
        """A generation not ready after WAIT_WARN_SECONDS: say, every WAIT_WARN_SECONDS, which
        services wait for which dependency (connections queue meanwhile on the listeners the
        master holds; without this line nothing would say why they get no answer)."""
        now = time.monotonic()
        if now - gen.born < WAIT_WARN_SECONDS or now - gen.waiting_said < WAIT_WARN_SECONDS:
            return
        waits = gen.waiting_for_dependencies()
        if waits:
            gen.waiting_said = now
            log.ERROR.warning("generation %d not serving after %.0f s: %s wait for their "
                              "dependencies to be ready", gen.number, now - gen.born, waits)

    def _respawn_due(self) -> float:
        """Fork the replacements whose back-off is over; returns seconds to the next one."""
        now = time.monotonic()
        nxt = 1.0
        for gen in self.gens:
            if gen.retired:
                gen.respawn_at.clear()
                continue
            for key, at in list(gen.respawn_at.items()):
                if at <= now:
                    del gen.respawn_at[key]
                    svc = next(s for s in gen.services if s.name == key[0])
                    self._spawn(gen, svc, key[1])
                else:
                    nxt = min(nxt, at - now)
        return nxt

    def _mark_dead(self, pid: int) -> None:
        counters.mark_dead(pid)

    def _publish_workers(self, service: str) -> None:
        counters.publish_workers(service, (w.spec.service.name for w in self.workers.values()))

    def _count_restart(self, service: str) -> None:
        counters.event("worker_restart", service)

    def _kill_all(self, sig: int, gen: Optional[int] = None) -> None:
        for pid, w in list(self.workers.items()):
            if gen is None or w.gen == gen:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        watchdog = sd.watchdog_interval(any_pid=self.upgrade_mode) if sd is not None else None
        next_ping = 0.0
        while True:
            timeout = self._respawn_due()
            if self.stopping:
                timeout = min(timeout, 0.1)
            if watchdog:
                now = time.monotonic()
                if now >= next_ping:  # WatchdogSec= (the interval is already half of it)
                    sd.watchdog_ping()
                    next_ping = now + watchdog
                timeout = min(timeout, max(0.0, next_ping - now))
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._on_worker_readable(key.data)
            while self.events:
                name = self.events.popleft()
                try:
                    getattr(self, "handle_" + name)()
                except FatalError:
                    raise
                except Exception:  # a signal must never take the server down
                    log.ERROR.exception("error while handling %s; still serving", name)
            self._reap()
            self._transitions()
            # A graceful stop that came during a hand-over waits for its outcome (at most
            # upgrade_timeout_seconds): the new master may hold our sockets already and serve
            # once we commit; leaving mid-way made it give up too (an outage).
            if self.stopping and not self.workers and (
                    self.handover is None or self.stopping == "fast"):
                return
            if self.stopping and time.monotonic() > self.stop_deadline:
                log.ERROR.warning("killing %d workers still running after the shutdown timeout",
                                  len(self.workers))
                self._kill_all(signal.SIGKILL)
                self.stop_deadline = float("inf")

    def _transitions(self) -> None:
        """Act on generations that just became ready."""
        newest = self.gens[-1]
        if self.stopping or not newest.all_ready():
            if not self.stopping:
                self._say_what_waits(newest)
            return
        newest.served = True
        if not self._serving_reported:
            self._serving_reported = True
            self._serving_since = time.monotonic()
            self._announce_serving()
        for gen in self.gens[:-1]:
            if not gen.retired:
                gen.retired = True
                log.ERROR.info("generation %d serves; draining generation %d", newest.number,
                               gen.number)
                self._kill_all(signal.SIGTERM, gen.number)
                self.files.follow(self.conf)
                self._notify("READY=1", f"STATUS=serving, generation {newest.number}")
        for item in list(self._dropped):
            # Every generation that still used it was told to drain just now or before, and a
            # draining worker takes its queue before closing: nobody will accept here again.
            if all(g.retired for g in self.gens if g.number < item[0]):
                self.table.close_dropped(item[2])
                self._dropped.remove(item)
        self.gens = [g for g in self.gens if not g.retired or any(
            w.gen == g.number for w in self.workers.values())]

    def _announce_serving(self) -> None:
        n = len(self.workers)
        log.ERROR.info("pyngora serving: %d processes, pid %d", n, self.pid)
        self._promised = self.upgrade_conn is not None or self.launcher_fd >= 0
        if self.upgrade_conn is not None:
            self._finish_upgrade(n)
        else:
            self._notify("READY=1", f"STATUS=serving, {n} workers")
        daemon.report(self.launcher_fd, True)
        self.launcher_fd = -1

    def _notify(self, *lines: str) -> None:
        if sd is not None:
            try:
                sd.notify("\n".join(lines))
            except Exception:
                pass

    # ------------------------------------------------------------------ signals
    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def handle_term(self) -> None:
        if not self.stopping:
            log.ERROR.info("SIGTERM: graceful stop")
        self._begin_stop("graceful")

    def handle_int(self) -> None:
        if self.stopping != "fast":
            log.ERROR.info("SIGINT: fast stop")
        self._begin_stop("fast")

    def handle_usr1(self) -> None:
        log.reopen()
        give_logs(self.conf)
        log.ERROR.info("SIGUSR1: logs reopened")
        self._kill_all(signal.SIGUSR1)

    def handle_hup(self) -> None:
        """Reload in place: a new generation with the re-read config; the old one drains.
        During a hand-over to a new master (which reads the file itself) it waits: applied
        if the hand-over fails, moot if it succeeds."""
        if self.stopping:
            return
        if self.handover is not None:
            log.ERROR.warning("SIGHUP during an upgrade hand-over: the reload waits for it "
                              "(applied if it fails; the new master reads the file itself)")
            self._reload_after_handover = True
            return
        self._notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        if self.reload_conf is None or self.build_services is None:
            log.ERROR.warning("SIGHUP: this server has no configuration file to reload")
            self._notify("READY=1")
            return
        try:
            conf = self.reload_conf()
            services = self.build_services(conf)
        except ConfigError as e:
            log.ERROR.error("reload refused, keeping the running configuration:\n%s", e)
            self._notify("READY=1")
            return
        except Exception as e:
            log.ERROR.error("reload refused, keeping the running configuration: %s", e)
            self._notify("READY=1")
            return
        gen = Generation(self.gens[-1].number + 1, conf, services)
        try:
            self._bind(gen)
        except FatalError as e:
            log.ERROR.error("reload refused: %s", e)
            self._notify("READY=1")
            return
        self.conf = conf
        counters.recreate(conf, _worker_owner(conf))
        self.gens.append(gen)
        self._count_event("reload")
        log.ERROR.info("reloading: starting generation %d", gen.number)
        self._spawn_ready_services(gen)

    def _count_event(self, name: str) -> None:
        counters.event(name)

    def _begin_stop(self, how: str) -> None:
        if self.stopping == "fast" or (self.stopping and how == "graceful"):
            return
        self.stopping = how
        # With NotifyAccess=all any process speaks for the unit: a master that handed over (or a
        # -u master that never became the main PID) must not tell systemd the service stops.
        speaks = not self.handed_over and (not self.upgrade_mode or self._serving_reported)
        if how == "graceful":
            if speaks:
                self._notify("STOPPING=1")
            self.stop_deadline = time.monotonic() + self.conf.grace_period_seconds + \
                self.conf.graceful_shutdown_timeout_seconds
            self._kill_all(signal.SIGTERM)
        else:
            if speaks:
                self._notify("STOPPING=1")
            self.stop_deadline = time.monotonic() + self.conf.graceful_shutdown_timeout_seconds
            self._kill_all(signal.SIGINT)
        # Workers hold their own copies; ours only keep the queues alive for nobody. While a
        # hand-over is sending them, they stay open (closed when it ends).
        if self.handover is None:
            self.table.close_all(unlink=not self.handed_over)
        for _, _, sock in self._dropped:
            self.table.close_dropped(sock)
        self._dropped.clear()

    def _cleanup(self) -> None:
        daemon.report(self.launcher_fd, False, "pyngora: the master stopped during startup",
                      self.exit_code or 1)
        if self.upgrade_conn is not None:
            try:
                self.upgrade_conn.send_failed("the new master could not start its workers")
                self.upgrade_conn.close()
            except Exception:
                pass
        self.table.close_all(unlink=not self.handed_over and not self.upgrade_mode)
        if not self.handed_over:  # after a hand-over the pid file is the new master's
            daemon.remove_pid_file(self.files.pid_path or self.conf.pid_file)
        counters.master_exit()
        for w in self.workers.values():
            if w.fd >= 0:
                os.close(w.fd)
