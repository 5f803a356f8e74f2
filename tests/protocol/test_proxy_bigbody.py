"""Back-pressure through a real worker: 1 GiB down and 1 GiB up through ``pyngora`` (master +
one worker) with curl, and a rate-limited slow client, while the worker's RSS is sampled from
/proc. The worker must stay within 50 MB of its idle RSS (issue 4's bound)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or not os.path.exists("/proc"),
                                reason="needs curl and /proc")

GIB = 1 << 30

ORIGIN = textwrap.dedent('''
    import asyncio, sys
    N = int(sys.argv[2])
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\\r\\n\\r\\n")
                if head.startswith(b"GET"):
                    w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % N)
                    chunk = b"x" * (1 << 20)
                    left = N
                    while left:
                        n = min(left, len(chunk))
                        w.write(chunk[:n])
                        left -= n
                        await w.drain()
                    continue
                chunked = b"transfer-encoding: chunked" in head.lower()
                cl = 0
                for line in head.split(b"\\r\\n"):
                    if line.lower().startswith(b"content-length:"):
                        cl = int(line.split(b":")[1])
                got = 0
                if chunked:
                    while True:
                        size = int((await r.readuntil(b"\\r\\n")).split(b";")[0], 16)
                        if size == 0:
                            await r.readuntil(b"\\r\\n")
                            break
                        while size:
                            d = await r.read(min(size, 1 << 20))
                            got += len(d)
                            size -= len(d)
                        await r.readexactly(2)
                else:
                    while got < cl:
                        d = await r.read(min(cl - got, 1 << 20))
                        got += len(d)
                body = str(got).encode()
                w.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()
    async def main():
        s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with s:
            await s.serve_forever()
    asyncio.run(main())
''')


def _free_port() -> int:
    from tests.support import free_port
    return free_port()


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_one_gib_each_way_keeps_worker_rss_flat(tmp_path: Path) -> None:
    oport, pport = _free_port(), _free_port()
    (tmp_path / "origin.py").write_text(ORIGIN)
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""
        version: 1
        threads: 1
        pid_file: {tmp_path}/p.pid
        upgrade_sock: {tmp_path}/u.sock
        grace_period_seconds: 1
        graceful_shutdown_timeout_seconds: 1
        services:
          - name: proxy
            type: http_proxy
            listeners: ["127.0.0.1:{pport}"]
            upstreams:
              - name: o
                backends: [{{addr: "127.0.0.1:{oport}"}}]
    """))
    origin = subprocess.Popen([sys.executable, str(tmp_path / "origin.py"), str(oport), str(GIB)],
                              start_new_session=True)
    master = subprocess.Popen([sys.executable, "-m", "pyngora", "-c", str(tmp_path / "p.yaml")],
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{pport}/"
    try:
        deadline = time.monotonic() + 20
        worker = 0
        while time.monotonic() < deadline:
            kids = _children(master.pid)
            ok = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "-X", "POST", "-d", "x", url], capture_output=True,
                                text=True).stdout == "200"
            if kids and ok:
                worker = kids[0]
                break
            time.sleep(0.1)
        assert worker, "proxy did not come up"
        idle = _rss_kb(worker)
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kb(worker))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            down = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                   url + "down"], capture_output=True, text=True, timeout=120)
            assert down.stdout == f"200 {GIB}"
            with subprocess.Popen(["head", "-c", str(GIB), "/dev/zero"],
                                  stdout=subprocess.PIPE) as src:
                up = subprocess.run(["curl", "-s", "-T", "-", url + "up"], stdin=src.stdout,
                                    capture_output=True, text=True, timeout=120)
            assert up.stdout == str(GIB)
            # A slow client: the upstream is fast, the proxy must not buffer what it reads.
            slow = subprocess.run(["curl", "-s", "-o", "/dev/null", "--limit-rate", "50M",
                                   "-r", "0-", "-w", "%{http_code}", "--max-time", "3", url],
                                  capture_output=True, text=True, timeout=30)
            assert slow.returncode in (0, 28)  # 28: our own --max-time cut it short
        finally:
            stop.set()
            sampler.join()
        grown_mb = (peak[0] - idle) / 1024
        print(f"worker RSS idle {idle / 1024:.1f} MB, peak {peak[0] / 1024:.1f} MB "
              f"(+{grown_mb:.1f} MB) over 1 GiB down, 1 GiB up and a 50 MB/s client")
        assert grown_mb < 50
    finally:
        for p in (master, origin):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in (master, origin):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
