"""The one way tests wait: for a condition, bounded, failing with what was awaited.

``until`` for async tests (the condition may be a coroutine function), ``until_sync`` for
tests that drive lovd from outside (a ``lovd serve`` process, Podman, PostgreSQL). Both
return the seconds it took, so a test can report or bound how soon something happened.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

STEP = 0.02


def _failure(what: str, timeout: float) -> AssertionError:
    return AssertionError(f"{what}: not within {timeout:g} s")


async def until(
    cond: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "the condition",
    step: float = STEP,
) -> float:
    """Seconds until ``cond()`` held (awaited if it returns an awaitable)."""
    t0 = time.monotonic()
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            raise _failure(what, timeout)
        await asyncio.sleep(step)


def until_sync(
    cond: Callable[[], object],
    timeout: float = 10.0,
    what: str = "the condition",
    step: float = STEP,
) -> float:
    """Seconds until ``cond()`` held, sleeping ``step`` between looks."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            raise _failure(what, timeout)
        time.sleep(step)
