"""A reuseport cluster whose primary scales slot 2 down on SIGUSR2 (``drain_slot``), for tests."""

from __future__ import annotations

import asyncio
import signal
import sys

from webapp import make_app

import aiocluster


def main() -> None:
    port = int(sys.argv[1])

    def on_primary(cluster: aiocluster.Cluster) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        async def retire(slot: int) -> None:
            worker = next(w for w in cluster.workers.values() if w.slot == slot)
            worker.kill(signal.SIGKILL)  # whatever it had queued, it never accepts
            await worker.wait()
            handed = cluster.drain_slot(slot)
            sys.stderr.write(f"TEST drained slot {slot}: {handed}" + "\n")

        def on_usr2() -> None:
            task = loop.create_task(retire(2))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGUSR2, on_usr2)

    aiocluster.run(
        make_app,
        host="127.0.0.1",
        port=port,
        workers=2,
        graceful_timeout=5,
        on_primary=on_primary,
        policy="reuseport",
    )


if __name__ == "__main__":
    main()
