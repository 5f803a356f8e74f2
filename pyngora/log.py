"""The error log and the access log, both through `logging`, reopened on SIGUSR1.

`ERROR` ("pyngora") is where the master, workers and phases report; `ACCESS` ("pyngora.access")
gets one pre-formatted line per request, only when `access_log` is not off (check
`access_enabled()` before formatting anything on the request path).
"""
from __future__ import annotations

import logging
import os
import stat
import sys
import time
from typing import Optional

ERROR = logging.getLogger("pyngora")
ACCESS = logging.getLogger("pyngora.access")
ACCESS.propagate = False

_access_on = False
_error_path: Optional[str] = None
_access_path: Optional[str] = None


# A log file that cannot be written (a full disk): said on stderr at most this often.
WRITE_ERROR_EVERY_SECONDS = 60.0

# The longest line of the error log, in characters; the rest of a longer one is cut and its
# length said. nginx cuts its error lines at 2048 bytes (NGX_MAX_ERROR_STR): a "Fail to proxy"
# line carries the client's URI and Host (up to max_header_bytes each), and over HTTP/2 an
# indexed header costs the client one byte per request for kilobytes of log.
MAX_ERROR_LINE = 4096

# Characters a logged value must not put raw into the error log: C0 controls but tab and LF
# (the lines of a traceback or of a list of configuration errors), DEL and C1 (ESC and CSI
# drive terminals that `tail -f` the log; CR rewrites what the line shows), and the Unicode
# line separators and bidirectional overrides (a line that reads other than it is).
_UNSAFE: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))
                           if c not in (9, 10)}
_UNSAFE.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F),
                                           *range(0x2066, 0x206A))})


class SafeFormatter(logging.Formatter):
    """The error log's formatter: each record as ``logging.Formatter`` writes it, with the
    characters of ``_UNSAFE`` escaped and each line cut at ``MAX_ERROR_LINE`` characters.
    Costs an ``isprintable()`` and a ``len()`` per record when there is nothing to do."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's text, safe to append to a log file (see the class)."""
        text = super().format(record)
        if not text.isprintable():  # (tab and LF, which stay, make it False too)
            text = text.translate(_UNSAFE)
        if len(text) > MAX_ERROR_LINE:
            text = "\n".join(line if len(line) <= MAX_ERROR_LINE else
                              f"{line[:MAX_ERROR_LINE]}... ({len(line) - MAX_ERROR_LINE} "
                              f"more characters cut)" for line in text.split("\n"))
        return text


class _ReopenableFileHandler(logging.StreamHandler):
    """Appends to a path; `reopen()` closes and reopens it (logrotate's copy-less rotation)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._error_said = -WRITE_ERROR_EVERY_SECONDS
        self._lost = 0
        # backslashreplace: a message with a lone surrogate (os.fsdecode of an undecodable
        # file name) must not cost its line (strict UTF-8 raised, and the line was lost).
        super().__init__(open(path, "a", buffering=1, encoding="utf-8",
                              errors="backslashreplace"))

    def handleError(self, record: logging.LogRecord) -> None:
        """A write that failed (ENOSPC, EIO): one line on stderr a minute, with the count of
        lines lost meanwhile, as nginx does; logging's default prints a traceback per
        record, which on a full disk cost 5 x the CPU of each request it logged."""
        self._lost += 1
        now = time.monotonic()
        if now - self._error_said < WRITE_ERROR_EVERY_SECONDS:
            return
        self._error_said = now
        exc = sys.exc_info()[1]
        try:
            sys.stderr.write(f"pyngora: cannot write {self.path}: {exc}; {self._lost} log "
                             f"line(s) lost (said at most once a minute)\n")
        except Exception:
            pass
        self._lost = 0

    def reopen(self) -> None:
        """Keeps writing to the old file when the new one cannot be opened (a missing
        directory, say): losing the log is better than losing the server."""
        self.acquire()
        try:
            try:
                stream = open(self.path, "a", buffering=1, encoding="utf-8",
                              errors="backslashreplace")
            except OSError as e:
                sys.stderr.write(f"pyngora: cannot reopen {self.path}: {e}\n")
                return
            old, self.stream = self.stream, stream
            old.close()
        finally:
            self.release()


def access_enabled() -> bool:
    return _access_on


def setup(error_log: Optional[str], level: str = "info", access_log: str = "off") -> None:
    """Configure both logs in this process (called by the master, and again in each worker)."""
    global _access_on, _error_path, _access_path
    _error_path, _access_path = error_log, None
    fmt = SafeFormatter("%(asctime)s %(levelname)s [%(process)d] %(message)s")
    for h in list(ERROR.handlers):
        ERROR.removeHandler(h)
    handler: logging.Handler = (_ReopenableFileHandler(error_log) if error_log
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(fmt)
    ERROR.addHandler(handler)
    ERROR.setLevel(level.upper())
    ERROR.propagate = False
    for h in list(ACCESS.handlers):
        ACCESS.removeHandler(h)
    _access_on = access_log != "off"
    if _access_on:
        ah: logging.Handler
        if access_log == "stdout":
            ah = logging.StreamHandler(sys.stdout)
        else:
            _access_path = access_log
            ah = _ReopenableFileHandler(access_log)
        ah.setFormatter(logging.Formatter("%(message)s"))
        ACCESS.addHandler(ah)
        ACCESS.setLevel(logging.INFO)


def reopen() -> None:
    """SIGUSR1: reopen every file handler so a rotated log is let go."""
    for logger in (ERROR, ACCESS):
        for h in logger.handlers:
            if isinstance(h, _ReopenableFileHandler):
                h.reopen()
    if _error_path:
        # stderr of daemons and workers points at the error log too: follow the rotation. So
        # does stdout when -d pointed it there (where "access_log: stdout" writes): when it
        # is the very file stderr is, not a terminal, pipe or journal socket.
        try:
            out_too = _same_regular_file(1, 2)
            fd = os.open(_error_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if out_too:
                sys.stdout.flush()
                os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        except OSError:
            pass


def _same_regular_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return stat.S_ISREG(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
