"""The master's metrics: the multiprocess directory, worker counts, restarts, reloads.

Runs in the master only. Metrics must never stop the proxy, so every call here swallows its
errors (`prepare` logs them), but one: a metrics directory another live master owns stops the
start (MetricsDirTaken), as two servers on one directory mix and wipe each other's figures.
``pyngora.metrics.multiproc`` is stdlib-only: no prometheus_client in the master.
"""
from __future__ import annotations

import os
from typing import Iterable

from pyngora import log
from pyngora.config.schema import ServerConf


class MetricsDirTaken(Exception):
    """Another live pyngora master owns the metrics directory: this server cannot start (its
    fresh start would wipe the other's figures, and each exporter would serve both)."""


def prepare(conf: ServerConf, fresh: bool, owner: object) -> None:
    """At start-up: make (``fresh``: empty) the metrics directory, publish build info.
    Raises MetricsDirTaken when another live master owns it; any other trouble is logged."""
    path = conf.metrics_path
    try:
        from pyngora.metrics import multiproc
    except ImportError:
        return
    try:
        multiproc.prepare_dir(path, fresh=fresh, owner=owner)
        from pyngora.version import __version__
        multiproc.build_info(__version__)
    except multiproc.MetricsDirInUse as e:
        raise MetricsDirTaken(str(e)) from None
    except Exception as e:  # metrics must never stop the proxy
        log.ERROR.warning("metrics directory %s unusable: %s", path, e)


def recreate(conf: ServerConf, owner: object) -> None:
    """A reload: the metrics directory in use went away (an operator's rm, a tmp cleaner), and
    the exporter answers 503: make it again, as this master's (the counts start over)."""
    try:
        from pyngora.metrics import multiproc
        path = multiproc.metrics_dir()
        if path is None or path != conf.metrics_path or os.path.isdir(path):
            return  # (a new metrics_dir needs a restart, as before)
        multiproc.prepare_dir(path, fresh=False, owner=owner)  # type: ignore[arg-type]
        multiproc.claim_dir(path)
        log.ERROR.warning("metrics directory %s was gone: made again (counts start over)", path)
    except Exception as e:
        log.ERROR.warning("metrics directory %s: cannot make it again: %s", conf.metrics_path, e)


def claim(conf: ServerConf) -> None:
    """An upgrade's new master serves (the old one took its hand-over): it now owns the
    metrics directory."""
    try:
        from pyngora.metrics import multiproc
        multiproc.claim_dir(conf.metrics_path)
    except Exception as e:
        log.ERROR.warning("metrics directory %s: cannot record this master as its owner: %s",
                          conf.metrics_path, e)


def mark_dead(pid: int) -> None:
    """A reaped worker: its live gauges leave the totals."""
    try:
        from pyngora.metrics import multiproc
        multiproc.mark_process_dead(pid)
    except Exception:
        pass


def publish_workers(service: str, services_of_workers: Iterable[str]) -> None:
    """The number of live worker processes of ``service`` (after a fork or a reap)."""
    try:
        from pyngora.metrics import multiproc
        multiproc.workers(service, sum(1 for s in services_of_workers if s == service))
    except Exception:
        pass


def event(name: str, service: str = "") -> None:
    """One master event: worker_restart (per service), reload, upgrade, upgrade_failed."""
    try:
        from pyngora.metrics import multiproc
        multiproc.record_master_event(name, service)
    except Exception:
        pass


def master_exit() -> None:
    try:
        from pyngora.metrics import multiproc
        multiproc.master_exit()
    except Exception:
        pass
