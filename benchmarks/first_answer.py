"""Time from exec to the first HTTP 200: aiocluster against gunicorn's aiohttp worker.

    python benchmarks/first_answer.py [--workers 2 8] [--rounds 5]

Each round starts aiocluster and gunicorn once each (the order alternating), with N workers,
and polls ``GET /`` on a new connection every 2 ms (each attempt bounded to 1 s, the whole
wait to 30 s) until one answers 200; the server is stopped once its N workers exist. Prints
every start, the medians and spread, and the ratio per round (aiocluster over gunicorn).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from pathlib import Path

from side_by_side import Server


def first_200(port: int, began: float, deadline: float) -> float:
    """Seconds from ``began`` to the first 200 answer on ``port``."""
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return time.monotonic() - began
        except OSError:
            pass  # not listening yet
        finally:
            conn.close()
        time.sleep(0.002)
    raise RuntimeError(f"no answer on port {port} in time")


def one(kind: str, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix=f"first-{kind}-") as tmp:
        began = time.monotonic()
        server = Server(kind, workers, "shared", "", Path(tmp))
        try:
            seconds = first_200(server.port, began, began + 30)
            server.wait_ready(time.monotonic() + 30)
        finally:
            server.stop()
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ["aiocluster", "gunicorn"]
    for workers in args.workers:
        one("aiocluster", workers)  # warm-up (page cache), not counted
        one("gunicorn", workers)
        found: dict[str, list[float]] = {k: [] for k in kinds}
        for number in range(args.rounds):
            for kind in kinds if number % 2 == 0 else kinds[::-1]:
                found[kind].append(one(kind, workers))
            print(
                f"-w {workers} round {number + 1}: "
                + ", ".join(f"{k} {found[k][-1] * 1000:.0f} ms" for k in kinds),
                flush=True,
            )
        ratios = [a / g for a, g in zip(found["aiocluster"], found["gunicorn"], strict=True)]
        for kind in kinds:
            ms = [s * 1000 for s in found[kind]]
            spread = f"{min(ms):.0f}-{max(ms):.0f}"
            print(f"-w {workers} {kind}: median {statistics.median(ms):.0f} ms ({spread})")
        print(
            f"-w {workers} ratio: median {statistics.median(ratios):.2f} "
            f"({', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
