"""The master's bookkeeping: one `Worker` per forked process, one `Generation` per set of
services (SIGHUP starts a new one and retires the old once the new one serves)."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Optional

from pyngora.config.schema import ServerConf
from pyngora.server.worker import WorkerSpec

if TYPE_CHECKING:  # pragma: no cover - services.base imports asyncio: not in the master
    from pyngora.services.base import Service


def _worker_owner(conf: ServerConf) -> Optional[tuple[int, int]]:
    """(uid, gid) the workers drop to, when they do: they must be able to write metrics."""
    if os.getuid() != 0 or not (conf.user or conf.group):
        return None
    import grp
    import pwd
    uid, gid = 0, 0
    if conf.user:
        pw = pwd.getpwnam(conf.user)
        uid, gid = pw.pw_uid, pw.pw_gid
    if conf.group:
        gid = grp.getgrnam(conf.group).gr_gid
    return uid, gid


class Worker:
    __slots__ = ("pid", "spec", "ready", "fd", "started", "gen")

    def __init__(self, pid: int, spec: WorkerSpec, fd: int) -> None:
        self.pid = pid
        self.spec = spec
        self.ready = False
        self.fd = fd
        self.started = time.monotonic()
        self.gen = spec.generation


class Generation:
    """One set of services and their workers; SIGHUP starts a new one, then retires the old."""

    def __init__(self, number: int, conf: ServerConf, services: list[Service]) -> None:
        self.number = number
        self.conf = conf
        self.services = services
        self.retired = False
        self.served = False   # every slot was ready once (it took over from the previous one)
        self.started: set[str] = set()           # service names whose workers were forked
        self.boot_failures: dict[tuple[str, int], int] = {}
        self.respawn_at: dict[tuple[str, int], float] = {}
        self.ready_slots: set[tuple[str, int]] = set()
        self.born = time.monotonic()
        self.waiting_said = 0.0  # when the master last logged what this generation waits for

    def slots(self, svc: Service) -> int:
        return 1 if svc.is_background else self.conf.service_threads(svc.threads)

    def pinned(self, svc: Service) -> bool:
        ws = svc.work_stealing if svc.work_stealing is not None else self.conf.work_stealing
        return not ws

    def service_ready(self, svc: Service) -> bool:
        return all((svc.name, n) in self.ready_slots for n in range(self.slots(svc)))

    def waiting_for_dependencies(self) -> str:
        """"web (for health-web); ..." for the services not started because a dependency is
        not ready ("" when none waits)."""
        ready = {s.name for s in self.services if self.service_ready(s)}
        waits = []
        for svc in self.services:
            missing = [d.name for d in svc.dependencies if d.name not in ready]
            if svc.name not in self.started and missing:
                waits.append(f"{svc.name} (for {', '.join(missing)})")
        return "; ".join(waits)

    def all_ready(self) -> bool:
        return all(self.service_ready(s) for s in self.services)
