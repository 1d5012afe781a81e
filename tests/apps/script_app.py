"""A program that calls aiocluster.run(app): it is primary and worker both, by environment."""

from __future__ import annotations

import sys

from webapp import make_app

import aiocluster


def main() -> None:
    port = int(sys.argv[1])

    def on_primary(cluster: aiocluster.Cluster) -> None:
        # Echo every worker message back to the worker that sent it.
        def on_message(worker: aiocluster.Worker, data: object) -> None:
            worker.send({"echo": data, "to": worker.id})

        cluster.on("message", on_message)

    aiocluster.run(
        make_app, host="127.0.0.1", port=port, workers=2, graceful_timeout=5, on_primary=on_primary
    )


if __name__ == "__main__":
    main()
