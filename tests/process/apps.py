"""Small pyngora programs the process tests run (written into each test's work dir)."""

SERVER_APP = '''
import asyncio, os, sys, time
from pyngora.server.server import Opt, Server
from pyngora.services.base import BackgroundService
from pyngora.services.static import StaticService, StaticApp
from pyngora.headers import Headers


class PidApp(StaticApp):
    """Answers with the worker's pid; /busy blocks the loop 20 ms (a busy worker);
    /slow answers after SLOW seconds, touching a marker file when it starts."""

    def handle(self, exchange):
        target = exchange.head.target
        if target == b"/busy":
            time.sleep(0.02)
        if target.startswith(b"/slow"):
            return self.slow(exchange)
        if target == b"/big":
            return self.big(exchange)
        exchange.respond(200, Headers([(b"X-Pid", str(os.getpid()).encode())]), str(os.getpid()).encode())

    async def slow(self, exchange):
        open(os.environ["SLOW_MARK"], "w").close()
        await asyncio.sleep(float(os.environ.get("SLOW", "2")))
        exchange.respond(200, Headers([(b"X-Pid", str(os.getpid()).encode())]), b"slow done")


    async def big(self, exchange):
        """21 MiB streamed in 64 KiB chunks, waiting on the client (back-pressure)."""
        chunk = b"x" * 65536
        exchange.write_head(200, Headers([(b"Content-Length", str(336 * 65536).encode())]))
        for _ in range(336):
            exchange.write_body(chunk)
            await exchange.drain()
        exchange.write_end()


class PidService(StaticService):
    def new_app(self, ctx):
        return PidApp()


class FailingTask(BackgroundService):
    async def start(self, shutdown):
        raise RuntimeError("this background task cannot boot")


class Sleeper(BackgroundService):
    """Ready after its first cycle; runs until shutdown."""

    async def start_with_ready_notifier(self, shutdown, ready):
        ready.notify_ready()
        await shutdown


class NeverReady(BackgroundService):
    """Never finishes its first cycle (a prober that cannot reach anything, say)."""

    async def start_with_ready_notifier(self, shutdown, ready):
        await shutdown


if __name__ == "__main__":
    server = Server(Opt.parse_args())
    server.bootstrap()
    svc = PidService("web")
    svc.add_tcp("127.0.0.1:" + os.environ["PORT"])
    svc.threads = int(os.environ.get("THREADS", "2"))
    svc.work_stealing = os.environ.get("WORK_STEALING", "1") == "1"
    if os.environ.get("NEVER_READY_DEP"):
        dep = NeverReady("stuck")
        svc.add_dependency(dep)
        server.add_service(dep)
    server.add_service(svc)
    if os.environ.get("BG"):
        server.add_service(Sleeper("sleeper"))
    if os.environ.get("FAIL_BG"):
        server.add_service(FailingTask("doomed"))
    server.run_forever()
'''
