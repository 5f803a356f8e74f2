import signal

import pytest

from tests.support import Pyngora


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM stops the run as Ctrl-C does, so fixtures still stop the servers they started.
    bin/test stops its background lane (the soak) with SIGTERM: a background job of a script
    ignores SIGINT, and a plain SIGTERM would leave that lane's pyngora daemons running."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture
def pyngora_factory(tmp_path):
    """Start pyngora processes for one test; every one is killed at the end."""
    started: list[Pyngora] = []

    def make(config: str, *args: str, name: str = "pyngora.yaml", env=None) -> Pyngora:
        p = Pyngora(tmp_path, config, args, env=env, name=name)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
