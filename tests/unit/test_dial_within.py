"""``upstreams.dial._within``: asyncio.timeout's semantics for one await, with one timer."""
from __future__ import annotations

import asyncio

import pytest

from pyngora.upstreams.dial import _within

from tests.protocol.test_http_app_helpers import run


def test_past_the_delay_it_is_a_timeout_and_the_task_is_not_left_cancelled() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await _within(loop, 0.01, asyncio.sleep(10))
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0.02)  # the task goes on, uncancelled
    run(main())


def test_in_time_the_value_comes_back_and_the_timer_is_gone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def answer() -> int:
            await asyncio.sleep(0)
            return 7
        assert await _within(loop, 0.05, answer()) == 7
        assert await _within(loop, None, answer()) == 7
        await asyncio.sleep(0.1)  # past the delay: no cancel arrives later
    run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        inner = asyncio.ensure_future(_within(loop, 10, asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner
        # and when the timer fired too, the outer cancel still wins
        both = asyncio.ensure_future(_within(loop, 0.01, asyncio.sleep(10)))
        await asyncio.sleep(0)
        both.cancel()
        await asyncio.sleep(0.03)
        with pytest.raises(asyncio.CancelledError):
            await both
    run(main())


def test_an_awaitable_that_finishes_despite_the_timer_leaves_no_cancel_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def stubborn() -> int:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return 5  # swallows the timer's cancel
            return 0
        assert await _within(loop, 0.01, stubborn()) == 5
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
    run(main())
