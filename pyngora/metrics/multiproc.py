"""Metrics files shared by every pyngora process (a leaf: standard library only).

pyngora publishes metrics through prometheus-client's *multiprocess* directory: each process
owns a few small files there, and the exporter process sums them all with prometheus-client's
``MultiProcessCollector``. This module knows that directory and its file format, without
importing prometheus_client, so that the master (DESIGN rule 5) can use it:

* ``prepare_dir(path, fresh)``     the master, before forking anything.
* ``mark_process_dead(pid)``       the master, when it reaps a child (worker, exporter, background).
* ``workers()``, ``worker_restart()``, ``upgrade()``, ``upgrade_failed()``, ``reload()``,
  ``build_info()``, ``master_exit()``  the master's own metrics.
* ``ProcessFiles``                 the writer that both the master and ``registry`` (workers) use.

The file format (prometheus-client's ``MmapedDict``, written whole and renamed into place) and
the file names are in ``multiproc_format.py``; the metrics themselves (SPEC section 8) in
``metric_defs.py``. Their names are re-exported here.

Dead processes: a dead process's live-mode gauge files are deleted; its counter, histogram and
summary files (ours and prometheus-client's) are folded into one ``<prefix>_archive.db`` per
prefix, so the directory does not grow with every restart and totals stay exact. Folding swaps
files under an exclusive ``flock`` on ``.pyngora.lock``; the exporter reads under a shared lock,
so a scrape sees either the dead process's file or the archive that includes it, never both and
never neither: a counter does not go backwards when a worker dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from typing import Iterator

# Re-exported: these lived here before the definitions and the file format got their modules.
from pyngora.metrics.metric_defs import (CONNECT_BUCKETS, MAX_NAMES, METRICS, OTHER,
                                        REQUEST_BUCKETS, MetricDef, float_to_go, sample_key,
                                        series_key)
from pyngora.metrics.multiproc_format import (ARCHIVE, FILE_RE, SUFFIX, TMP_RE, decode, encode,
                                             own_path, read_file, write_file)

__all__ = [
    "ENV_VAR", "LOCK_NAME", "OWNER_NAME", "SUFFIX", "ARCHIVE", "FILE_RE",
    "MetricDef", "REQUEST_BUCKETS", "CONNECT_BUCKETS", "METRICS", "float_to_go", "series_key",
    "sample_key", "encode", "decode", "read_file", "write_file", "own_path",
    "metrics_dir", "MetricsDirInUse", "prepare_dir", "claim_dir", "dir_lock", "mark_process_dead",
    "prune_dead_live_gauges", "ProcessFiles", "workers", "worker_restart", "upgrade",
    "upgrade_failed", "reload", "build_info", "record_master_event", "master_exit",
]

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
LOCK_NAME = ".pyngora.lock"
OWNER_NAME = ".pyngora.owner"  # pid of the master that owns the directory

# Files of these prefixes hold totals that must survive their process: they are archived.
_ARCHIVED = ("counter", "histogram", "summary")


# --------------------------------------------------------------------------- the directory
def metrics_dir() -> str | None:
    """The directory from the environment (set by ``prepare_dir``), or None if metrics are off."""
    return os.environ.get(ENV_VAR) or None


class MetricsDirInUse(RuntimeError):
    """A fresh start found the directory owned by another live pyngora master."""


def _owner_pid(path: str) -> int | None:
    """The live pyngora master recorded as the directory's owner, or None (none, or stale)."""
    try:
        with open(os.path.join(path, OWNER_NAME)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    # Our own -d launcher is no owner (a recycled pid may now be it).
    if pid <= 0 or pid == os.getpid() or pid == os.getppid() or not _pid_exists(pid):
        return None
    try:  # a recycled pid of some other program is not an owner
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return pid  # no /proc: trust the pid
    # A master's title ("pyngora: master ..."), or pyngora itself as an argument (python -m
    # pyngora): not any process naming the word (tail -F /var/log/pyngora/error.log), as
    # server.daemon.is_pyngora decides for -s.
    if raw.startswith(b"pyngora: ") or any(
            a == b"pyngora" or a.endswith(b"/pyngora") for a in raw.split(b"\0")):
        return pid
    return None


def prepare_dir(path: str, fresh: bool, owner: tuple[int, int] | None = None) -> None:
    """Create the metrics directory and export it as ``PROMETHEUS_MULTIPROC_DIR``.

    Runs in the master before it forks anything. ``fresh`` (a cold start): delete every metrics
    file and leftover temporary file in it (other files are left alone). Not fresh (an upgrade:
    the old master's workers still write here): keep everything. A fresh start makes this
    master the directory's owner; an upgrading one becomes it only once the old master took
    its hand-over (:func:`claim_dir`): a failed upgrade must leave the serving master the
    owner. ``owner`` (uid, gid) chowns the directory and its lock file, for a master that
    starts as root and runs workers as ``user``.

    Raises MetricsDirInUse on a fresh start while another live pyngora master owns ``path``
    (two servers sharing one ``metrics_dir`` would wipe and mix each other's counts).
    """
    os.makedirs(path, mode=0o755, exist_ok=True)
    if fresh:
        other = _owner_pid(path)
        if other is not None:
            raise MetricsDirInUse(f"metrics_dir {path} is in use by the pyngora master pid "
                                  f"{other}; give this server its own metrics_dir")
        for name in os.listdir(path):
            if FILE_RE.match(name) or TMP_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
    lock = os.path.join(path, LOCK_NAME)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)
    if fresh:
        claim_dir(path)
    if owner is not None:
        for p in (path, lock):
            os.chown(p, owner[0], owner[1])
    os.environ[ENV_VAR] = path


def claim_dir(path: str) -> None:
    """Record this master as the directory's owner (a fresh start, or an upgrade whose old
    master took the hand-over)."""
    write_owner = os.path.join(path, f".{OWNER_NAME}.{os.getpid()}.tmp")
    with open(write_owner, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(write_owner, os.path.join(path, OWNER_NAME))


@contextlib.contextmanager
def dir_lock(directory: str, exclusive: bool, timeout: float | None = None) -> Iterator[bool]:
    """Hold the directory's flock; yields True if held, False if ``timeout`` passed first.

    Shared: the exporter while it reads every file. Exclusive: whoever swaps files (archive).
    A filesystem without flock yields True without a lock (best effort, never an error).
    """
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            yield True
            return
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        held = False
        if timeout is None:
            try:
                fcntl.flock(fd, op)
            except OSError as exc:  # no flock on this filesystem
                if exc.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            held = True
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.002)
        yield held
    finally:
        os.close(fd)  # closing releases the flock


def _files_of(directory: str, pid: int) -> list[tuple[str, str, str]]:
    """(name, prefix, mode) of every metrics file whose owner is ``pid``."""
    found = []
    for name in os.listdir(directory):
        m = FILE_RE.match(name)
        if m and m.group("owner") == str(pid):
            found.append((name, m.group("prefix"), m.group("mode") or ""))
    return found


_pending: set[int] = set()  # dead pids whose files could not be archived yet (lock busy)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_process_dead(pid: int, path: str | None = None, lock_timeout: float = 0.25) -> bool:
    """Account for a dead process; runs in the master right after it reaps ``pid``.

    Deletes the pid's live-mode gauge files (its connections and health views vanish) and folds
    its counter, histogram and summary files into the archive files, exactly (counts never drop).
    Returns True if everything was archived; False if the lock stayed busy for ``lock_timeout``
    seconds, in which case the pid is remembered and archived on a later call (its files are
    still counted meanwhile, so nothing is lost or double-counted).
    """
    directory = path or metrics_dir()
    if not directory or not os.path.isdir(directory):
        return True
    for name, prefix, mode in _files_of(directory, pid):
        if prefix.startswith("gauge_") and mode.startswith("live"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
    todo = {pid}
    # A pid left pending is archived only if no new process reuses it now: a reused pid writes
    # on top of the old file (both writers continue from its totals), so leaving it is exact too.
    todo.update(p for p in _pending if not _pid_exists(p))
    with dir_lock(directory, exclusive=True, timeout=lock_timeout) as held:
        if not held:
            _pending.update(todo)
            return False
        for p in todo:
            _archive(directory, p)
            _pending.discard(p)
    return True


def _archive(directory: str, pid: int) -> None:
    """Fold ``pid``'s cumulative files into the archives. Caller holds the exclusive lock."""
    by_prefix: dict[str, list[str]] = {}
    for name, prefix, _mode in _files_of(directory, pid):
        if prefix in _ARCHIVED:
            by_prefix.setdefault(prefix, []).append(os.path.join(directory, name))
    for prefix, sources in by_prefix.items():
        archive = os.path.join(directory, f"{prefix}_{ARCHIVE}.db")
        totals: dict[str, float] = {}
        # A file that does not decode is one the exporter already leaves out (its counts are
        # not shown): the archive's goes aside, a dead process's goes, and folding goes on.
        # It used to raise here, and the dead pid's files then stayed for ever.
        for path in (archive, *sources):
            try:
                entries = read_file(path)
            except ValueError as exc:
                _set_aside(path, exc, keep=path == archive)
                continue
            for key, value, _ts in entries:
                totals[key] = totals.get(key, 0.0) + value
        write_file(archive, ((k, v, 0.0) for k, v in _bounded_backends(totals).items()))
        # Only now remove the sources: a reader holds the shared lock, so it saw neither step.
        for src in sources:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)


def _set_aside(path: str, why: Exception, keep: bool) -> None:
    """A metrics file that does not decode: renamed to ``.corrupt-<name>`` (which no pattern
    here matches; one per name, so they cannot pile up) if ``keep``, else deleted. Said on
    stderr, the master's error log. Returns nothing."""
    directory, name = os.path.split(path)
    try:
        if keep:
            os.replace(path, os.path.join(directory, f".corrupt-{name}"))
        else:
            os.unlink(path)
        sys.stderr.write(f"pyngora: metrics file {path} does not decode ({why}): "
                         f"{'set aside as .corrupt-' + name if keep else 'removed'}\n")
    except OSError:
        pass


def _bounded_backends(totals: dict[str, float]) -> dict[str, float]:
    """``totals`` with at most MAX_NAMES backend values per upstream, the rest counted as
    ``other`` (sums stay exact). Each worker bounds its own labels; without this, every
    restarted worker of a proxy whose backends vary (a forward proxy) would add its own
    MAX_NAMES to the archive, for ever. Keys come in insertion order: the archive's first; a
    backend kept is kept in every family of the file (per-backend ratios stay whole)."""
    seen: dict[str, set[str]] = {}
    out: dict[str, float] = {}
    for key, value in totals.items():
        if '"backend"' in key:
            metric, sample, labels, help_text = json.loads(key)
            backend = labels.get("backend")
            if backend is not None and backend != OTHER:
                names = seen.setdefault(labels.get("upstream", ""), set())
                if backend not in names:
                    if len(names) >= MAX_NAMES:
                        labels["backend"] = OTHER
                        key = series_key(metric, sample, labels, help_text)
                    else:
                        names.add(backend)
        out[key] = out.get(key, 0.0) + value
    return out


def prune_dead_live_gauges(directory: str) -> int:
    """Delete live-mode gauge files of pids that no longer exist; returns how many.

    The exporter runs it before each scrape, for processes that died without being marked
    dead (a master killed with SIGKILL, whose children were reaped by init).
    """
    removed = 0
    for name in os.listdir(directory):
        m = FILE_RE.match(name)
        if not m or not (m.group("mode") or "").startswith("live") or m.group("owner") == ARCHIVE:
            continue
        if not _pid_exists(int(m.group("owner"))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


# --------------------------------------------------------------------------- per-process writer
class ProcessFiles:
    """The metrics of one process, held in memory and written as whole files on ``write()``.

    Counters and histograms hold absolute totals of this process; ``add`` bumps them. Gauges
    hold values set with ``set``. Used by the master (rare events, written at once) and by
    workers through ``registry`` (written by ``registry.flush()`` about once a second).
    """

    def __init__(self, directory: str, pid: int | None = None, role: str = "") -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.role = role
        self._tables: dict[str, dict[str, list[float]]] = {}
        self._dirty: set[str] = set()

    def _table(self, prefix: str) -> dict[str, list[float]]:
        table = self._tables.get(prefix)
        if table is None:
            table = self._tables[prefix] = {}
            if prefix in _ARCHIVED:
                # A file left by a dead process with our pid (not archived yet): continue from
                # its totals instead of overwriting them, so no count is lost.
                for key, value, ts in read_file(self.path(prefix)):
                    table[key] = [value, ts]
        return table

    def add(self, prefix: str, key: str, amount: float) -> None:
        """Add ``amount`` to a cumulative sample (counter, histogram bucket or sum)."""
        cell = self._table(prefix).get(key)
        if cell is None:  # a new series is written even at 0, so that it shows up as 0
            self._tables[prefix][key] = [float(amount), 0.0]
        elif amount:
            cell[0] += amount
        else:
            return
        self._dirty.add(prefix)

    def set(self, prefix: str, key: str, value: float, timestamp: float = 0.0) -> None:
        """Set a gauge sample; ``timestamp`` matters only in the ``mostrecent`` modes."""
        table = self._table(prefix)
        cell = table.get(key)
        if cell is None or cell[0] != value or cell[1] != timestamp:
            table[key] = [float(value), timestamp]
            self._dirty.add(prefix)

    def value(self, prefix: str, key: str) -> float | None:
        """The value held for a sample (tests and the master's bookkeeping), None if never set."""
        cell = self._tables.get(prefix, {}).get(key)
        return None if cell is None else cell[0]

    def path(self, prefix: str) -> str:
        """The file this process writes for ``prefix``."""
        return own_path(self.directory, prefix, self.pid, self.role)

    def write(self) -> int:
        """Write every file changed since the last write; returns how many were written."""
        written = 0
        for prefix in sorted(self._dirty):
            entries = ((k, c[0], c[1]) for k, c in self._tables[prefix].items())
            write_file(self.path(prefix), entries)
            self._dirty.discard(prefix)  # only once written: a failed write is retried next time
            written += 1
        return written


# --------------------------------------------------------------------------- the master's metrics
_master: ProcessFiles | None = None


def _master_files() -> ProcessFiles | None:
    """This master's writer, created on first use (and anew in a forked child); None if off."""
    global _master
    directory = metrics_dir()
    if not directory:
        return None
    if _master is None or _master.pid != os.getpid() or _master.directory != directory:
        _master = ProcessFiles(directory, role="master")
    return _master


def _bump(name: str, values: tuple[str, ...] = ()) -> None:
    files = _master_files()
    if files is not None:
        d = METRICS[name]
        files.add(d.prefix, sample_key(d, values), 1)
        files.write()


def workers(service: str, n: int) -> None:
    """Master: ``service`` has ``n`` worker processes running now (call on every change)."""
    files = _master_files()
    if files is not None:
        d = METRICS["pyngora_workers"]
        files.set(d.prefix, sample_key(d, (service,)), float(n))
        # The restart counter exists from the start at 0: Prometheus's increase() ignores the
        # first sample of a series, so a counter born at 1 would hide the first restart.
        r = METRICS["pyngora_worker_restarts_total"]
        files.add(r.prefix, sample_key(r, (service,)), 0)
        files.write()


def worker_restart(service: str) -> None:
    """Master: a worker of ``service`` died unexpectedly and is being replaced."""
    _bump("pyngora_worker_restarts_total", (service,))


def upgrade() -> None:
    """Master: an upgrade completed (the old master calls it when the new one said ``ready``)."""
    _bump("pyngora_upgrades_total")


def upgrade_failed() -> None:
    """Master: an upgrade hand-over failed and this master keeps serving."""
    _bump("pyngora_upgrade_failures_total")


def reload() -> None:
    """Master: a SIGHUP reload was applied (a new generation of workers started)."""
    _bump("pyngora_reloads_total")


def build_info(version: str, python: str | None = None) -> None:
    """Master: publish ``pyngora_build_info{version, python} 1`` (call once at start)."""
    files = _master_files()
    if files is not None:
        d = METRICS["pyngora_build_info"]
        py = python or "%d.%d.%d" % sys.version_info[:3]
        files.set(d.prefix, sample_key(d, (version, py)), 1.0)
        for name in ("pyngora_upgrades_total", "pyngora_upgrade_failures_total",
                     "pyngora_reloads_total"):  # born at 0, see workers()
            c = METRICS[name]
            files.add(c.prefix, sample_key(c, ()), 0)
        files.write()


_EVENTS = {"worker_restart": worker_restart, "upgrade": upgrade, "upgrade_failed": upgrade_failed,
           "reload": reload}


def record_master_event(name: str, service: str = "") -> None:
    """Master: count event ``name`` (worker_restart, upgrade, upgrade_failed, reload).

    ``service`` is used by ``worker_restart`` only. ValueError for an unknown name.
    """
    fn = _EVENTS.get(name)
    if fn is None:
        raise ValueError(f"unknown master event {name!r}")
    if name == "worker_restart":
        fn(service)
    else:
        fn()


def master_exit() -> None:
    """Master: last call before it exits; drops its live gauges, archives its counters and
    gives up ownership of the directory (unless a new master took it over in an upgrade)."""
    global _master
    if _master is not None and _master.pid == os.getpid():
        mark_process_dead(_master.pid, _master.directory, lock_timeout=1.0)
        _master = None
    directory = metrics_dir()
    if directory:
        path = os.path.join(directory, OWNER_NAME)
        try:
            with open(path) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(path)
        except OSError:
            pass
