"""server/accepting.py on real listening sockets in-process: the handle count follows the
kernel's accept queue (doubling while connections wait, halving once it stays empty), no
connection is lost while handles come and go, and closing leaves the drain's descriptor."""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from pyngora.server import accepting
from pyngora.server.accepting import FIXED_HANDLES, MAX_HANDLES, SHRINK_AFTER, AcceptHandles

from tests.protocol.test_http_app_helpers import run


class _Count(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: Any) -> None:
        _Count.made += 1
        transport.close()


def _listener(family: int = socket.AF_INET, path: str = "") -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(path or ("127.0.0.1", 0))
    s.listen(1024)
    s.setblocking(False)
    return s


def _fds_of(sock: socket.socket) -> int:
    """How many of this process's descriptors point at ``sock``'s socket."""
    target = os.readlink(f"/proc/self/fd/{sock.fileno()}")
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return n


async def _until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_handles_follow_the_accept_queue() -> None:
    async def main() -> None:
        _Count.made = 0
        loop = asyncio.get_running_loop()
        sock = _listener()
        keep = sock.dup()  # to count the socket's descriptors after handles take theirs
        handles = AcceptHandles(loop, sock, _Count, 1024)
        assert handles.adaptive
        await handles.open(sock)
        assert len(handles.handles) == 1 and handles.queued() == 0
        # Connections queued by the kernel faster than one handle takes them: the count
        # doubles per sample up to MAX_HANDLES (the loop may accept some between samples).
        clients = [socket.create_connection(keep.getsockname()) for _ in range(120)]
        assert (handles.queued() or 0) > 100
        seen = []
        for _ in range(5):
            await handles.adjust()
            seen.append(len(handles.handles))
        assert seen == [2, 4, 8, 16, 16][:len(seen)] and MAX_HANDLES == 16, seen
        assert _fds_of(keep) == 1 + 1 + MAX_HANDLES  # keep, own, one per handle
        await _until(lambda: _Count.made == 120)  # none lost
        assert handles.queued() == 0
        # Empty samples halve it, SHRINK_AFTER in a row each time, down to one.
        counts = []
        for _ in range(SHRINK_AFTER * 5):
            await handles.adjust()
            counts.append(len(handles.handles))
        assert counts[SHRINK_AFTER - 2] == 16 and counts[SHRINK_AFTER - 1] == 8, counts
        assert counts[-1] == 1, counts
        await _until(lambda: _fds_of(keep) == 1 + 1 + 1)  # closed handles gave theirs back
        more = [socket.create_connection(keep.getsockname()) for _ in range(3)]
        await _until(lambda: _Count.made == 123)  # the first handle still accepts
        handles.close()
        assert handles.handles == [] and handles.own.fileno() >= 0
        await _until(lambda: _fds_of(keep) == 2)  # keep and own (the drain's)
        late = socket.create_connection(keep.getsockname())  # queued for the drain
        await handles.adjust()  # a sample after close (the drain began) opens nothing
        assert handles.handles == [] and handles.queued() == 1
        conn, _ = handles.own.accept()
        for s in clients + more + [late, conn, keep, handles.own]:
            s.close()
    run(main())


class _Scripted(AcceptHandles):
    """Reads its queue lengths from a script instead of the kernel."""
    script: Any = iter(())

    def queued(self) -> Any:
        return next(self.script)


def test_a_moderate_queue_holds_the_count() -> None:
    """A queue no longer than the handles neither grows nor shrinks them."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = _listener()
        _Scripted.script = iter([0] + [3, 4, 1, 2, 4, 3, 1, 2, 3, 4])  # 0: the constructor's
        handles = _Scripted(loop, sock, _Count, 1024)
        await handles.open(sock)
        await handles._grow(3)
        for _ in range(10):
            await handles.adjust()
            assert len(handles.handles) == 4
        handles.close()
        handles.own.close()
    run(main())


def test_workers_sharing_a_socket_grow_only_past_all_their_handles() -> None:
    """With work stealing the queue is every worker's: it must hold more than one iteration of
    all of them (sharers x handles) before one grows."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = _listener()
        _Scripted.script = iter([0, 3, 4, 5, 9, 16, 17])
        handles = _Scripted(loop, sock, _Count, 1024, None, sharers=4)
        await handles.open(sock)
        seen = []
        for _ in range(6):
            await handles.adjust()
            seen.append(len(handles.handles))
        assert seen == [1, 1, 2, 4, 4, 8], seen  # 5 > 1 x 4, 9 > 2 x 4, 16 = 4 x 4, 17 > 16
        handles.close()
        handles.own.close()
    run(main())


def test_unix_listeners_keep_a_fixed_count(tmp_path: Any) -> None:
    async def main() -> None:
        _Count.made = 0
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s.sock")
        sock = _listener(socket.AF_UNIX, path)
        handles = AcceptHandles(loop, sock, _Count, 1024)
        assert not handles.adaptive and handles.queued() is None
        await handles.open(sock)
        assert len(handles.handles) == FIXED_HANDLES
        clients = []
        for _ in range(10):
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            clients.append(c)
        for _ in range(SHRINK_AFTER + 1):
            await handles.adjust()
        assert len(handles.handles) == FIXED_HANDLES
        await _until(lambda: _Count.made == 10)
        handles.close()
        handles.own.close()
        for c in clients:
            c.close()
    run(main())


def test_the_sampler_survives_a_failing_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (say) while growing: the sampler keeps running."""
    async def main() -> None:
        calls = []

        class Failing:
            async def adjust(self) -> None:
                calls.append(1)
                raise OSError(24, "Too many open files")

        monkeypatch.setattr(accepting, "SAMPLE_SECONDS", 0.001)
        task = asyncio.ensure_future(accepting.keep_adjusting([Failing()]))  # type: ignore[list-item]
        await _until(lambda: len(calls) >= 3)
        task.cancel()
    run(main())
