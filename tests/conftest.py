import pytest

from tests.support import Pyngora


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
