"""prometheus-client's multiprocess file format, and the names of pyngora's files (a leaf).

Standard library only, without importing prometheus_client, so that the master (DESIGN rule
5) can write these files too. ``multiproc`` builds on it (the directory, and ``ProcessFiles``,
the writer of the master and, through ``registry``, of the workers); the exporter matches file
names with :data:`FILE_RE`.

File format: the one of ``prometheus_client.mmap_dict.MmapedDict`` -- a little-endian int32
``used`` byte count, 4 bytes of padding, then entries of (int32 key length, UTF-8 JSON key padded
to 8-byte alignment, float64 value, float64 timestamp). The key is
``json.dumps([metric_name, sample_name, labels, help], sort_keys=True)`` (``metric_defs`` builds
it). The tests check both directions against the installed prometheus-client, so a change of
format fails the suite.

pyngora's own files are named ``<prefix>_<pid>-pyngora.db`` (prefix ``counter``, ``histogram`` or
``gauge_<mode>``; the master's end in ``-pyngora-master.db``) so they never collide with the
``<prefix>_<pid>.db`` files prometheus-client writes for a user's own metrics in the same process.
Each write replaces the whole file (write to a temporary name, then ``rename``): a reader sees
the old or the new file, never a torn value, and a process never needs an mmap.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Iterable, Iterator

__all__ = ["SUFFIX", "ARCHIVE", "FILE_RE", "TMP_RE", "encode", "decode", "read_file",
           "write_file", "own_path"]

SUFFIX = "-pyngora"
ARCHIVE = "archive"

# Which file names in the directory are metrics files, and whose. ``owner`` is a pid or "archive".
FILE_RE = re.compile(
    r"^(?P<prefix>counter|histogram|summary|gauge_(?P<mode>[a-z]+))_"
    r"(?P<owner>\d+|archive)(?P<suffix>-pyngora(?:-[a-z]+)?)?\.db$"
)
# A temporary file ``write_file`` left behind (its process died between write and rename).
TMP_RE = re.compile(r"^\.[^/]*\.db\.\d+\.tmp$")

_INT = struct.Struct("<i")
_DOUBLES = struct.Struct("<dd")


# --------------------------------------------------------------------------- file format
def encode(entries: Iterable[tuple[str, float, float]]) -> bytes:
    """Serialise ``(key, value, timestamp)`` entries into MmapedDict's layout; returns the bytes."""
    parts = [b"\0" * 8]
    used = 8
    for key, value, ts in entries:
        raw = key.encode("utf-8")
        padded = raw + b" " * (8 - (len(raw) + 4) % 8)
        parts.append(_INT.pack(len(raw)) + padded + _DOUBLES.pack(value, ts))
        used += 4 + len(padded) + 16
    data = bytearray(b"".join(parts))
    _INT.pack_into(data, 0, used)
    return bytes(data)


def decode(data: bytes) -> Iterator[tuple[str, float, float]]:
    """Parse MmapedDict bytes; yields ``(key, value, timestamp)``; raises ValueError if corrupt
    (never struct.error: an entry that runs past ``used`` is corruption too)."""
    if len(data) < 8:
        return
    used = _INT.unpack_from(data, 0)[0]
    if used > len(data):
        raise ValueError("metrics file is truncated")
    pos = 8
    while pos < used:
        if pos + 4 > used:
            raise ValueError("metrics file is corrupted")
        n = _INT.unpack_from(data, pos)[0]
        if n < 0 or pos + 4 + n > used:
            raise ValueError("metrics file is corrupted")
        key = data[pos + 4:pos + 4 + n].decode("utf-8")
        pos += 4 + n + (8 - (n + 4) % 8)
        if pos + 16 > used:
            raise ValueError("metrics file is corrupted")
        value, ts = _DOUBLES.unpack_from(data, pos)
        pos += 16
        yield key, value, ts


def read_file(path: str) -> list[tuple[str, float, float]]:
    """Read every entry of a metrics file (ours or prometheus-client's); [] if it does not
    exist or is empty. Raises ValueError if it is corrupt, OSError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return []
            used = _INT.unpack_from(head, 0)[0]
            # Never more than the file holds: a corrupt ``used`` (up to 2 GiB) must not make
            # the reader allocate it.
            size = os.fstat(f.fileno()).st_size
            data = head + f.read(max(0, min(used, size) - 8))
    except FileNotFoundError:
        return []
    return list(decode(data))


def write_file(path: str, entries: Iterable[tuple[str, float, float]]) -> None:
    """Replace ``path`` atomically with ``entries`` (temporary file + rename in the same dir)."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(encode(entries))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # (a full disk: no temporary file left behind)
        except OSError:
            pass
        raise


def own_path(directory: str, prefix: str, pid: int, role: str = "") -> str:
    """Path of pyngora's file of ``prefix`` for process ``pid``; ``role`` ("master") keeps the
    master's own files apart from a worker's (they can share a pid in tests and embeddings)."""
    tag = f"-{role}" if role else ""
    return os.path.join(directory, f"{prefix}_{pid}{SUFFIX}{tag}.db")
