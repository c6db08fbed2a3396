"""Shared pytest configuration: the real-daemon test bed fixtures live in tests/testbed/."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator

import pytest

pytest_plugins = [
    "tests.testbed.buildkit_fixtures",
    "tests.testbed.kube_fixtures",
]

# How long a test's tasks may take to finish after it (and its fixtures) ended:
# an owner that cancelled a task has it wake up on the loop's next turns.
LEAKED_TASK_GRACE_S = 2.0


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (kopf's check).

    Only tasks created during the test count: the session-scoped test bed (the
    fake kubelet, daemon clients) keeps tasks of its own across tests. Being
    autouse, this is set up before the test's other function-scoped fixtures
    and torn down after them, so their cleanup has run when it looks.
    """
    before: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet(asyncio.all_tasks())
    yield
    me = asyncio.current_task()
    new = {t for t in asyncio.all_tasks() if t is not me and t not in before}
    if not new:
        return
    _, pending = await asyncio.wait(new, timeout=LEAKED_TASK_GRACE_S)
    if not pending:
        return
    # Cancelled and awaited here, so they do not leak into the next test either.
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    names = sorted(f"{t.get_name()} ({t.get_coro()!r})" for t in pending)
    pytest.fail(f"the test left {len(pending)} asyncio task(s) running: {names}")
