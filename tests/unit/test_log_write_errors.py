"""A log file that cannot be written (a full disk): the server goes on, and says so once a
minute instead of a traceback per line (which cost 5 x the CPU of every logged request)."""
from __future__ import annotations

import contextlib
import logging
import os

import pytest

from pyngora import log


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_said_once_not_per_line(capfd: pytest.CaptureFixture[str]) -> None:
    handler = log._ReopenableFileHandler("/dev/full")  # every write: ENOSPC
    logger = logging.getLogger("pyngora.test.full")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.warning("line %d", i)
    finally:
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # (what is still buffered cannot be written)
            handler.stream.close()
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err[:500]
    lines = [ln for ln in err.splitlines() if "cannot write /dev/full" in ln]
    assert len(lines) == 1 and "No space left on device" in lines[0], err[:500]
