"""The shared health table: one prober process writes, every worker reads, without locks.

Why: a pre-fork server with N workers must not probe N times, and a worker respawned (or a new
master after an upgrade) must start from the current health, not "all healthy". So the prober
(`HealthService`) writes each backend's state into a small file under the runtime directory, and
every worker maps that file and reads one byte per selection.

Two files, both next to each other:

``PATH`` - fixed size, mmap'ed by everyone. Little-endian::

    offset size  field
         0    8  magic  b"PYNGHT01"
         8    4  u32    layout version (1)
        12    4  u32    capacity: the number of slots
        16    8  u64    seq: seqlock counter, odd while the writer is in the middle of a batch
        24    8  u64    index_version: version of PATH.index.json that describes the slots
        32    8  u64    writer pid
        40    8  f64    updated_at: time.time() at the end of the last full probe round
        48   16         reserved (zero)
        64  cap  u8[]   one byte per slot: 0 unknown, 1 healthy, 2 unhealthy

  A slot byte is written and read with a single byte access, so no reader ever sees a torn
  value; 0 (never probed) counts as healthy, as in Pingora, where a new backend is healthy
  until a check says otherwise. `seq` lets a reader take a consistent snapshot of several slots
  (`snapshot()` retries while seq is odd or moved). The file is created whole (temp file +
  rename), so a reader never maps a half-written header.

``PATH.index.json`` - which key lives in which slot, and which backends each group has now
(for `discovery: dns`, workers follow the prober's view instead of resolving DNS themselves)::

    {"format": 1, "version": 7, "capacity": 4096,
     "slots": {"api/10.0.0.1:80": 0, "api/10.0.0.2:80": 1},
     "groups": {"api": [["10.0.0.1:80", 1], ["10.0.0.2:80", 1]]}}

  Rewritten atomically (temp + rename) by the writer, which then stores its version in the
  header; a reader reloads it when the header's index_version moves. A key keeps its slot while
  it exists; a freed slot is reused only once no never-used slot is left (and is reset to 0
  first), so a reader with a stale index reads at worst "unknown". Keys are "GROUP/ADDR".

Reopening: `HealthTable.create` on an existing, compatible file keeps its states and index (a
restarted prober or a new master resumes where the old one was); `HealthTable.open` maps it
read-only.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import time
from typing import Iterable, Optional, Sequence

from pyngora.lb.backend import Backend

__all__ = ["HealthTable", "UNKNOWN", "HEALTHY", "UNHEALTHY", "HEADER_SIZE", "health_key"]

MAGIC = b"PYNGHT01"
LAYOUT_VERSION = 1
HEADER_SIZE = 64
DEFAULT_CAPACITY = 4096
UNKNOWN, HEALTHY, UNHEALTHY = 0, 1, 2

_HEAD = struct.Struct("<8sII")           # magic, layout, capacity
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_OFF_SEQ, _OFF_INDEX, _OFF_PID, _OFF_UPDATED = 16, 24, 32, 40


def health_key(group: str, addr: str) -> str:
    """The table key of one backend of one group."""
    return f"{group}/{addr}"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # (a full disk: no temporary file left behind, one per retry)
        raise


class HealthTable:
    """A mapped health table. Writers come from `create`, readers from `open`."""

    __slots__ = ("path", "index_path", "writable", "capacity", "_fd", "_mm", "_slots", "_groups",
                 "_index_version", "_free", "_next_unused", "_ident")

    def __init__(self, path: str, fd: int, mm: mmap.mmap, writable: bool) -> None:
        self.path = path
        self.index_path = path + ".index.json"
        self.writable = writable
        self._fd = fd
        self._mm = mm
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)
        magic, layout, capacity = _HEAD.unpack_from(mm, 0)
        if magic != MAGIC or layout != LAYOUT_VERSION or len(mm) != HEADER_SIZE + capacity:
            raise ValueError(f"{path}: not a pyngora health table (layout {LAYOUT_VERSION})")
        self.capacity: int = capacity
        self._slots: dict[str, int] = {}
        self._groups: dict[str, list[tuple[str, int]]] = {}
        self._index_version = -1
        self._free: list[int] = []
        self._next_unused = 0
        self.refresh()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, keys: Iterable[str] = (),
               capacity: int = DEFAULT_CAPACITY) -> "HealthTable":
        """Open for writing (the one prober). An existing compatible table is kept as it is, with
        its states; otherwise a new one (all unknown) replaces it. ``keys`` get slots now."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        table: Optional[HealthTable] = None
        try:
            table = cls._map(path, writable=True)
            if table.capacity != capacity:
                table.close()
                table = None
        except (OSError, ValueError):
            table = None
        if table is None:
            buf = bytearray(HEADER_SIZE + capacity)
            _HEAD.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, capacity)
            _atomic_write(path, bytes(buf))
            try:
                os.unlink(path + ".index.json")
            except FileNotFoundError:
                pass
            table = cls._map(path, writable=True)
        _U64.pack_into(table._mm, _OFF_PID, os.getpid())
        table._init_allocator()
        if keys:
            table.assign(keys)
        return table

    @classmethod
    def open(cls, path: str) -> "HealthTable":
        """Map an existing table read-only (a worker). Raises FileNotFoundError / ValueError."""
        return cls._map(path, writable=False)

    @classmethod
    def _map(cls, path: str, writable: bool) -> "HealthTable":
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: too short for a health table")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls(path, fd, mm, writable)
        except BaseException:
            mm.close()
            os.close(fd)
            raise

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "HealthTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the index -----------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload the index if the writer published a new one. Cheap when nothing changed (one
        8-byte read). Returns True when the index was reloaded."""
        version = _U64.unpack_from(self._mm, _OFF_INDEX)[0]
        if version == self._index_version:
            return False
        try:
            with open(self.index_path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            doc = {"version": 0, "slots": {}, "groups": {}}
        except ValueError:
            return False  # a foreign writer mid-write: try again at the next refresh
        self._slots = {str(k): int(v) for k, v in doc.get("slots", {}).items()
                       if 0 <= int(v) < self.capacity}
        self._groups = {str(g): [(str(a), int(w)) for a, w in items]
                        for g, items in doc.get("groups", {}).items()}
        self._index_version = max(version, int(doc.get("version", 0)))
        return True

    def replaced(self) -> bool:
        """True when PATH is now another file (a writer recreated an incompatible table): the
        reader should close and `open` again. One stat; readers call it about once a second."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self._ident

    @property
    def index_version(self) -> int:
        """The version of the index this handle has loaded."""
        return self._index_version

    def slot(self, key: str) -> int:
        """The slot of ``key``, or -1 when it has none (then it reads as healthy)."""
        return self._slots.get(key, -1)

    def keys(self) -> list[str]:
        """Every key that has a slot."""
        return list(self._slots)

    def groups(self) -> list[str]:
        """The groups the writer published."""
        return list(self._groups)

    def group(self, name: str) -> Optional[list[Backend]]:
        """The backends the writer published for ``name`` (None when it published none)."""
        items = self._groups.get(name)
        if items is None:
            return None
        return [Backend(a, w) for a, w in items]

    def _init_allocator(self) -> None:
        used = set(self._slots.values())
        self._next_unused = max(used) + 1 if used else 0
        self._free = sorted(set(range(self._next_unused)) - used)

    def _publish(self) -> None:
        version = self._index_version + 1
        doc = {"format": 1, "version": version, "capacity": self.capacity,
               "slots": self._slots,
               "groups": {g: [[a, w] for a, w in items] for g, items in self._groups.items()}}
        _atomic_write(self.index_path, json.dumps(doc, sort_keys=True).encode())
        _U64.pack_into(self._mm, _OFF_INDEX, version)
        self._index_version = version

    def _allocate(self, key: str) -> int:
        if self._next_unused < self.capacity:
            slot = self._next_unused
            self._next_unused += 1
        elif self._free:
            slot = self._free.pop(0)
        else:
            return -1
        self._mm[HEADER_SIZE + slot] = UNKNOWN
        self._slots[key] = slot
        return slot

    def assign(self, keys: Iterable[str], drop_others_of: Sequence[str] = ()) -> bool:
        """Writer: give every key a slot. Keys starting with one of ``drop_others_of`` (group
        prefixes like "api/") that are not in ``keys`` lose theirs. Publishes the index if
        anything changed; returns whether it did."""
        self._need_writer()
        wanted = list(dict.fromkeys(keys))
        changed = False
        if drop_others_of:
            keep = set(wanted)
            for k in [k for k in self._slots if k.startswith(tuple(drop_others_of))]:
                if k not in keep:
                    self._free.append(self._slots.pop(k))
                    changed = True
        for k in wanted:
            if k not in self._slots:
                if self._allocate(k) < 0:
                    continue  # full: this key reads as healthy (fail-open)
                changed = True
        if changed:
            self._publish()
        return changed

    def set_group(self, group: str, backends: Iterable[Backend]) -> bool:
        """Writer: publish ``group``'s current backends and give each a slot ("GROUP/ADDR");
        backends that left the group free theirs. Returns whether the index changed."""
        self._need_writer()
        items = [(b.addr, b.weight) for b in sorted(set(backends))]
        changed_members = self._groups.get(group) != items
        self._groups[group] = items
        changed = self.assign([health_key(group, a) for a, _ in items],
                              drop_others_of=(group + "/",))
        if changed_members and not changed:
            self._publish()
        return changed or changed_members

    def remove_group(self, group: str) -> None:
        """Writer: forget a group and free its slots."""
        self._need_writer()
        self._groups.pop(group, None)
        self.assign([], drop_others_of=(group + "/",))
        self._publish()

    # -- states --------------------------------------------------------------------------------

    def _need_writer(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path}: opened read-only (use HealthTable.create)")

    def set(self, key: str, healthy: bool) -> None:
        """Writer: store one backend's health. A key without a slot gets one."""
        self._need_writer()
        slot = self._slots.get(key)
        if slot is None:
            self.assign([key])
            slot = self._slots.get(key)
            if slot is None:
                return
        self.set_slot(slot, HEALTHY if healthy else UNHEALTHY)

    def set_slot(self, slot: int, state: int) -> None:
        """Writer: store one slot's state, bracketed by the seqlock."""
        mm = self._mm
        seq = _U64.unpack_from(mm, _OFF_SEQ)[0]
        _U64.pack_into(mm, _OFF_SEQ, seq + 1)       # odd: a batch is in progress
        mm[HEADER_SIZE + slot] = state
        _U64.pack_into(mm, _OFF_SEQ, seq + 2)

    def heartbeat(self) -> None:
        """Writer: note that a full probe round just ended (readers may watch `updated_at`)."""
        _F64.pack_into(self._mm, _OFF_UPDATED, time.time())

    def state(self, key: str) -> int:
        """UNKNOWN, HEALTHY or UNHEALTHY for ``key`` (UNKNOWN when it has no slot)."""
        slot = self._slots.get(key, -1)
        return self._mm[HEADER_SIZE + slot] if slot >= 0 else UNKNOWN

    def state_at(self, slot: int) -> int:
        """The state byte of one slot: the per-request read."""
        return self._mm[HEADER_SIZE + slot]

    def is_healthy(self, key: str) -> bool:
        """False only when the prober marked ``key`` unhealthy."""
        return self.state(key) != UNHEALTHY

    @property
    def buffer(self) -> mmap.mmap:
        """The mapped file, for readers that index ``HEADER_SIZE + slot`` themselves."""
        return self._mm

    @property
    def seq(self) -> int:
        return _U64.unpack_from(self._mm, _OFF_SEQ)[0]

    @property
    def updated_at(self) -> float:
        """time.time() of the prober's last full round (0.0 before the first)."""
        return _F64.unpack_from(self._mm, _OFF_UPDATED)[0]

    @property
    def writer_pid(self) -> int:
        return _U64.unpack_from(self._mm, _OFF_PID)[0]

    def snapshot(self) -> dict[str, int]:
        """Every key's state, consistent across keys (seqlock read; retries a bounded number of
        times while the writer is mid-batch). For metrics and the admin view."""
        self.refresh()
        mm = self._mm
        states: dict[str, int] = {}
        for _ in range(100):
            before = _U64.unpack_from(mm, _OFF_SEQ)[0]
            if before & 1:
                time.sleep(0)
                continue
            states = {k: mm[HEADER_SIZE + s] for k, s in self._slots.items()}
            if _U64.unpack_from(mm, _OFF_SEQ)[0] == before:
                break
        return states

    def backend_health(self) -> list[tuple[str, str, int]]:
        """(upstream, backend addr, 1 healthy / 0 unhealthy) for every probed key: the samples
        of ``pyngora_backend_healthy``. Unknown (never probed) keys are left out. Read by the
        metrics exporter at scrape time, so the gauge is never stale and sums nothing."""
        out = []
        for key, state in sorted(self.snapshot().items()):
            if state == UNKNOWN:
                continue
            group, _, addr = key.partition("/")
            out.append((group, addr, 1 if state == HEALTHY else 0))
        return out

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"<HealthTable {self.path} {mode} {len(self._slots)}/{self.capacity} slots>"
