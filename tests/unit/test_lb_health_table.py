"""The shared health table across real processes (fork), no event loop."""
from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import pytest

from pyngora.lb import Backend, HealthTable, LoadBalancer, health_key
from pyngora.lb.health_table import HEADER_SIZE, HEALTHY, UNHEALTHY, UNKNOWN

CTX = multiprocessing.get_context("fork")


def wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _reader(path: str, conn: Any) -> None:
    """Child: answers each key list it receives with the health it reads."""
    table = HealthTable.open(path)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            table.refresh()
            conn.send([table.is_healthy(k) for k in msg])
    finally:
        table.close()


def _writer(path: str, conn: Any) -> None:
    """Child: the prober. Applies (key, healthy) commands, acks each."""
    table = HealthTable.create(path, ["g/a:1", "g/b:1"])
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            key, healthy = msg
            table.set(key, healthy)
            conn.send("ok")
    finally:
        table.close()


def _join(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def test_reader_process_sees_writer_changes(tmp_path: Any) -> None:
    path = str(tmp_path / "run" / "health.tbl")
    writer = HealthTable.create(path, ["g/a:1", "g/b:1"])
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_reader, args=(path, child))
    proc.start()
    try:
        parent.send(["g/a:1", "g/b:1", "g/unknown:1"])
        assert parent.recv() == [True, True, True]  # unknown reads healthy (fail-open)
        writer.set("g/a:1", False)
        parent.send(["g/a:1", "g/b:1"])
        assert parent.recv() == [False, True]
        writer.set("g/a:1", True)
        writer.set("g/b:1", False)
        writer.set("g/new:1", False)  # a key added later: the reader reloads the index
        parent.send(["g/a:1", "g/b:1", "g/new:1"])
        assert parent.recv() == [True, False, False]
        parent.send(None)
    finally:
        _join(proc)
        writer.close()
    assert proc.exitcode == 0


def test_writer_process_and_reopen_sees_current_state(tmp_path: Any) -> None:
    path = str(tmp_path / "health.tbl")
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_writer, args=(path, child))
    proc.start()
    try:
        assert wait_for(lambda: os.path.exists(path + ".index.json"))
        reader = HealthTable.open(path)
        assert reader.is_healthy("g/b:1") and reader.state("g/b:1") == UNKNOWN
        parent.send(("g/b:1", False))
        assert parent.recv() == "ok"
        assert wait_for(lambda: not reader.is_healthy("g/b:1"))
        assert reader.writer_pid == proc.pid
        parent.send(None)
    finally:
        _join(proc)
    reader.close()
    # A worker respawned after the prober's death, or a new master: current state, not healthy.
    again = HealthTable.open(path)
    assert again.state("g/b:1") == UNHEALTHY and again.state("g/a:1") == UNKNOWN
    again.close()
    # A restarted prober keeps the states it finds.
    writer = HealthTable.create(path)
    assert writer.state("g/b:1") == UNHEALTHY
    assert writer.slot("g/b:1") == 1
    writer.close()


def test_open_missing_or_foreign_file(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        HealthTable.open(str(tmp_path / "nope"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 200)
    with pytest.raises(ValueError):
        HealthTable.open(str(junk))
    t = HealthTable.create(str(junk), ["a/b:1"])  # the writer replaces it
    assert t.slot("a/b:1") == 0
    t.close()
    r = HealthTable.open(str(junk))
    with pytest.raises(PermissionError):
        r.set("a/b:1", True)
    r.close()


def test_groups_slots_survive_discovery_changes(tmp_path: Any) -> None:
    path = str(tmp_path / "h.tbl")
    w = HealthTable.create(path, capacity=4)
    r = HealthTable.open(path)
    b1, b2, b3 = Backend("10.0.0.1:80"), Backend("10.0.0.2:80", 3), Backend("10.0.0.3:80")
    w.set_group("api", [b1, b2])
    w.set(health_key("api", b2.addr), False)
    assert r.refresh() and r.group("api") == [b1, b2] and r.group("api")[1].weight == 3
    slot2 = r.slot("api/10.0.0.2:80")
    assert not r.refresh()  # unchanged index: nothing reloaded
    w.set_group("api", [b2, b3])  # b1 left, b3 joined
    assert r.refresh()
    assert r.slot("api/10.0.0.2:80") == slot2 and not r.is_healthy("api/10.0.0.2:80")
    assert r.slot("api/10.0.0.1:80") == -1
    assert r.state("api/10.0.0.3:80") == UNKNOWN
    # Capacity 4: slots 0..2 used, one never-used left, then the freed one (reset to unknown).
    w.set("api/10.0.0.3:80", True)
    w.set_group("web", [Backend("10.1.0.1:80"), Backend("10.1.0.2:80")])
    assert w.slot("web/10.1.0.2:80") >= 0 and w.state("web/10.1.0.2:80") == UNKNOWN
    w.set_group("web", [Backend("10.1.0.1:80"), Backend("10.1.0.2:80"), Backend("10.1.0.3:80")])
    assert w.slot("web/10.1.0.3:80") == -1  # full: reads as healthy
    assert r.is_healthy("web/10.1.0.3:80")
    snap = r.snapshot()
    assert snap["api/10.0.0.3:80"] == HEALTHY and snap["api/10.0.0.2:80"] == UNHEALTHY
    w.remove_group("web")
    r.refresh()
    assert r.group("web") is None and "web/10.1.0.1:80" not in r.keys()
    w.close()
    r.close()


def _lb_reader(path: str, conn: Any) -> None:
    """Child: a worker's LoadBalancer following the table; answers 'pick' with the set of
    backends a few selects return."""
    lb = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"])
    lb.sync_interval = 0.0  # follow at once (the default is once a second)
    lb.attach_health_table(path, "api")
    while True:
        msg = conn.recv()
        if msg is None:
            lb.close()
            return
        picks = {b.addr if b else None for b in (lb.select(b"") for _ in range(20))}
        conn.send(sorted(picks, key=str))


def test_worker_load_balancer_follows_table(tmp_path: Any) -> None:
    path = str(tmp_path / "h.tbl")
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_lb_reader, args=(path, child))
    proc.start()
    try:
        parent.send("pick")  # no table yet: fail open on the configured set
        assert parent.recv() == ["10.0.0.1:80", "10.0.0.2:80"]
        w = HealthTable.create(path)
        w.set_group("api", [Backend("10.0.0.1:80"), Backend("10.0.0.2:80")])
        w.set("api/10.0.0.1:80", False)
        parent.send("pick")
        assert parent.recv() == ["10.0.0.2:80"]
        w.set_group("api", [Backend("10.0.0.2:80"), Backend("10.0.0.3:80")])  # discovery moved
        parent.send("pick")
        assert parent.recv() == ["10.0.0.2:80", "10.0.0.3:80"]
        w.set("api/10.0.0.2:80", False)
        w.set("api/10.0.0.3:80", False)
        parent.send("pick")
        assert parent.recv() == [None]
        parent.send(None)
        w.close()
    finally:
        _join(proc)
    assert proc.exitcode == 0


def test_layout_header_fields(tmp_path: Any) -> None:
    path = str(tmp_path / "h.tbl")
    w = HealthTable.create(path, ["a/x:1"], capacity=16)
    assert os.path.getsize(path) == HEADER_SIZE + 16
    seq = w.seq
    w.set("a/x:1", False)
    assert w.seq == seq + 2 and w.seq % 2 == 0
    assert w.updated_at == 0.0
    w.heartbeat()
    assert w.updated_at > 0
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == b"PYNGHT01" and raw[HEADER_SIZE + w.slot("a/x:1")] == UNHEALTHY
    w.close()


def test_reader_follows_a_recreated_table(tmp_path: Any) -> None:
    path = str(tmp_path / "h.tbl")
    w = HealthTable.create(path, capacity=8)
    w.set_group("api", [Backend("10.0.0.1:80"), Backend("10.0.0.2:80")])
    lb = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"])
    lb.sync_interval = 0.0
    lb.attach_health_table(path, "api")
    assert len({lb.select(b"") for _ in range(4)}) == 2
    w.close()
    w = HealthTable.create(path, capacity=16)  # incompatible: a new file replaces the old one
    w.set_group("api", [Backend("10.0.0.1:80"), Backend("10.0.0.2:80")])
    w.set("api/10.0.0.1:80", False)
    assert {lb.select(b"") for _ in range(4)} == {Backend("10.0.0.2:80")}
    lb.close()
    w.close()


def test_backend_health_samples_for_the_gauge(tmp_path: Any) -> None:
    w = HealthTable.create(str(tmp_path / "h.tbl"))
    w.set_group("api", [Backend("10.0.0.1:80"), Backend("10.0.0.2:80"), Backend("10.0.0.3:80")])
    w.set("api/10.0.0.1:80", True)
    w.set("api/10.0.0.2:80", False)
    r = HealthTable.open(w.path)
    assert r.backend_health() == [("api", "10.0.0.1:80", 1), ("api", "10.0.0.2:80", 0)]
    r.close()
    w.close()
