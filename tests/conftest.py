from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from .harness import APPS, ClusterProcess, become_subreaper, restore_sigint

become_subreaper()
restore_sigint()

StartCluster = Callable[..., Awaitable[ClusterProcess]]


@pytest.fixture
async def start_cluster() -> AsyncIterator[StartCluster]:
    """Start primaries (``argv``, run in tests/apps); every one is killed and reaped at the end."""
    started: list[ClusterProcess] = []

    async def start(
        *argv: str,
        cwd: Path = APPS,
        env: dict[str, str] | None = None,
        ready: bool = True,
        pass_fds: Sequence[int] = (),
    ) -> ClusterProcess:
        proc = ClusterProcess(argv, cwd, env, pass_fds)
        started.append(proc)
        await proc.start()
        if ready:
            await proc.ready()
        return proc

    yield start
    for proc in started:
        await proc.close()
