"""The standard ``process_*`` metrics of every pyngora process, read from /proc at scrape time.

prometheus-client's ``ProcessCollector`` describes the one process it runs in: here that would
be the exporter alone, while SPEC 8 promises each process's. So the exporter reads the master
(its parent) and every child of the master (workers, background services, itself) and gives
each sample the labels ``pid`` and ``process`` (the process title without its ``pyngora:``
prefix: ``master``, ``worker proxy/0``, ...). The names, types and units are the standard
ones, so a dashboard sums them (``sum by (instance)``) or splits them by ``process``.

A process that exits between the listing and the reading is skipped; a value that cannot be
read (another user's fd table after a privilege drop) is left out for that process only.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["ProcessesCollector"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LABELS = ["pid", "process"]
# The gauges, in the order collect() fills them (prometheus-client's names and help texts).
_GAUGES = (("process_virtual_memory_bytes", "Virtual memory size in bytes."),
           ("process_resident_memory_bytes", "Resident memory size in bytes."),
           ("process_start_time_seconds", "Start time of the process since unix epoch in "
                                          "seconds."),
           ("process_open_fds", "Number of open file descriptors."),
           ("process_max_fds", "Maximum number of open file descriptors."))


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def _children(pid: int) -> list[int]:
    """The children of ``pid``: its threads' ``children`` files, else a scan of /proc."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(c) for c in f.read().split()]
        return found
    except OSError:
        pass
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and int(stat[1]) == pid:
                found.append(int(name))
    return found


def _stat(pid: int) -> Optional[list[bytes]]:
    """/proc/PID/stat's fields after the command name (field 3, the state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    title = raw.replace(b"\0", b" ").strip().decode("utf-8", "replace")
    return title[len("pyngora: "):] if title.startswith("pyngora: ") else title


def _max_fds(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max open files"):
                    return float(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None


class ProcessesCollector:
    """Yields the six standard ``process_*`` families for ``root`` (the master) and its
    children, labelled ``pid`` and ``process``. ``collect`` runs once per scrape."""

    def __init__(self, root: int) -> None:
        self.root = root

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time "
                                  "spent in seconds.", labels=_LABELS)
        vsz, rss, start, fds, maxfds = (GaugeMetricFamily(name, doc, labels=_LABELS)
                                        for name, doc in _GAUGES)
        try:
            boot = _boot_time()
            pids = [self.root] + sorted(_children(self.root))
        except OSError:  # no /proc: nothing to say
            return []
        for pid in pids:
            stat = _stat(pid)
            if stat is None:
                continue  # exited meanwhile
            labels = [str(pid), _title(pid)]
            cpu.add_metric(labels, (int(stat[11]) + int(stat[12])) / _TICKS)
            vsz.add_metric(labels, float(stat[20]))
            rss.add_metric(labels, float(int(stat[21]) * _PAGE))
            start.add_metric(labels, boot + int(stat[19]) / _TICKS)
            try:
                fds.add_metric(labels, float(len(os.listdir(f"/proc/{pid}/fd"))))
            except OSError:
                pass
            limit = _max_fds(pid)
            if limit is not None:
                maxfds.add_metric(labels, limit)
        return [cpu, vsz, rss, start, fds, maxfds]
