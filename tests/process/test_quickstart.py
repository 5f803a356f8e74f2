"""bin/quickstart: the README's first command, with a real curl, stopped by Ctrl-C."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.support import ROOT, port_open, wait_for

PORTS = (6188, 6189, 6192)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_quickstart_proxies_to_its_origin_and_stops_on_ctrl_c(tmp_path) -> None:
    taken = [p for p in PORTS if port_open(p)]
    if taken:
        pytest.skip(f"ports {taken} are in use on this machine")
    log = open(tmp_path / "quickstart.log", "wb")
    proc = subprocess.Popen([str(ROOT / "bin" / "quickstart")], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: all(port_open(p) for p in PORTS) or proc.poll() is not None, 120,
                 "the quickstart ports")
        assert proc.poll() is None, (tmp_path / "quickstart.log").read_text()
        r = subprocess.run(["curl", "-si", "localhost:6188/"], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.startswith("HTTP/1.1 200"), r.stdout
        assert "hello from the pyngora quickstart origin" in r.stdout
        m = subprocess.run(["curl", "-s", "localhost:6192/metrics"], capture_output=True,
                           text=True, timeout=30)
        assert "pyngora_build_info" in m.stdout
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        assert proc.wait(30) == 0
        assert not any(port_open(p) for p in PORTS)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
