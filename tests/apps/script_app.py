"""A program that calls aiocluster.run(app): it is primary and worker both, by environment."""

from __future__ import annotations

import sys

from webapp import make_app

import aiocluster


def main() -> None:
    port = int(sys.argv[1])

    def on_primary(cluster: aiocluster.Cluster) -> None:
        def on_message(worker: aiocluster.Worker, data: object) -> None:
            if isinstance(data, dict) and data.get("text") == "disconnect-me":
                worker.disconnect()
                return
            # Echo every other worker message back to the worker that sent it.
            worker.send({"echo": data, "to": worker.id})

        def show(event: str) -> None:
            async def report(worker: aiocluster.Worker, *args: object) -> None:
                # An async callback: the cluster runs it as a task it owns.
                extra = " ".join(map(str, args))
                line = f"EVENT {event} worker={worker.id} pid={worker.pid} {extra}".rstrip()
                sys.stderr.write(line + "\n")  # one write: lines of other processes never split it

            cluster.on(event, report)  # type: ignore[arg-type]

        def in_order(event: str) -> None:
            def report(worker: aiocluster.Worker, *args: object) -> None:
                # A plain callback runs at once, in the order the cluster emits.
                line = f"SYNC {event} worker={worker.id} connected={worker.is_connected()}"
                sys.stderr.write(line + "\n")

            cluster.on(event, report)  # type: ignore[arg-type]

        cluster.on("message", on_message)
        for event in ("fork", "online", "listening", "disconnect", "exit"):
            show(event)
        for event in ("disconnect", "exit"):
            in_order(event)

    aiocluster.run(
        make_app, host="127.0.0.1", port=port, workers=2, graceful_timeout=5, on_primary=on_primary
    )


if __name__ == "__main__":
    main()
