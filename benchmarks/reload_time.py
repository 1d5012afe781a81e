"""Rolling reload time of 8 workers under keep-alive load: aiocluster against gunicorn's HUP.

    python benchmarks/reload_time.py [--workers 8] [--rounds 3] [--policy shared]

Each round starts both servers (alternating which goes first), waits until N workers answer,
starts ``wrk -t1 -c64`` keep-alive load, sends SIGHUP one second later (aiocluster's SIGHUP is
the same ``Operations.reload()`` as ``aiocluster reload``) and measures the time until every
worker pid is new and the old ones are gone. wrk's socket errors plus non-2xx answers are the
failed requests. aiocluster runs from this checkout's venv, gunicorn from ``BENCH_VENV``
(``/work/venv-bench``). Stdlib only; Linux (/proc).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from side_by_side import Server, failed_requests


def one(kind: str, args: argparse.Namespace) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix=f"reload-{kind}-") as tmp:
        server = Server(kind, args.workers, args.policy, args.extra, Path(tmp))
        try:
            server.wait_ready(time.monotonic() + 60)
            before = server.worker_pids()
            wrk = subprocess.Popen(
                ["wrk", "-t1", "-c64", f"-d{args.duration}s", f"http://127.0.0.1:{server.port}/"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(1.0)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            took = float("nan")
            while time.monotonic() < signalled + args.duration:
                now = server.worker_pids()
                if not (now & before) and len(now) >= args.workers:
                    took = time.monotonic() - signalled
                    break
                time.sleep(0.01)
            out, _ = wrk.communicate(timeout=args.duration + 30)
            failed = failed_requests(out)
            if failed:
                print(out, flush=True)
            return took, failed
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=12, help="seconds of wrk load")
    parser.add_argument("--policy", default="shared")
    parser.add_argument("--only", choices=["aiocluster", "gunicorn"])
    parser.add_argument("--extra", default="", help="more aiocluster run arguments")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["aiocluster", "gunicorn"]
    found: dict[str, list[tuple[float, int]]] = {k: [] for k in kinds}
    for number in range(args.rounds):
        for kind in kinds if number % 2 == 0 else kinds[::-1]:
            took, failed = one(kind, args)
            found[kind].append((took, failed))
            print(f"round {number + 1} {kind}: reload {took:.2f} s, {failed} failed", flush=True)
    for kind, rows in found.items():
        times = [t for t, _ in rows]
        print(
            f"{kind}: median {statistics.median(times):.2f} s "
            f"(spread {min(times):.2f}-{max(times):.2f}), failed {[f for _, f in rows]}"
        )
    if len(kinds) == 2:
        ratios = [a[0] / g[0] for a, g in zip(found["aiocluster"], found["gunicorn"], strict=True)]
        print(f"ratio aiocluster/gunicorn per round: {[round(r, 2) for r in ratios]}")


if __name__ == "__main__":
    main()
