"""Atomic writes on a full disk leave no temporary file behind (a crash-looping prober left
one per try): /dev/full is a real device whose every write fails with ENOSPC, so its
directory stands in for a full filesystem by writing through a symlink named like the file."""
from __future__ import annotations

import os

import pytest

from pyngora.lb import health_table
from pyngora.metrics import multiproc_format


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_failed_atomic_write_removes_its_temporary_file(tmp_path) -> None:
    # The temporary names are known: make each a symlink to /dev/full, so the write fails.
    table = tmp_path / "h.tbl"
    os.symlink("/dev/full", f"{table}.tmp.{os.getpid()}")
    with pytest.raises(OSError):
        health_table._atomic_write(str(table), b"x" * 65536)
    metrics = tmp_path / "counter_1.db"
    os.symlink("/dev/full", tmp_path / f".counter_1.db.{os.getpid()}.tmp")
    with pytest.raises(OSError):
        multiproc_format.write_file(str(metrics), [("k", 1.0, 0.0)] * 4096)
    assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
