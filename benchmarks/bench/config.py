"""Where things are, and what a run was asked to do."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
REPO = HERE.parent
APPS = HERE / "apps"
VENV = Path(os.environ.get("BENCH_VENV", "/work/venv-bench"))
HOST = "127.0.0.1"  # never anything else
NODE = shutil.which("node") or "/usr/bin/node"

MODES = ("keepalive", "close")
LUA = {"keepalive": HERE / "keepalive.lua", "close": HERE / "close.lua"}
#: --quick's measured seconds per mode and round: 3 rounds of (1 s warmup + this) per mode.
QUICK_DURATION = 2.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every figure a run is asked for (the results JSON keeps them as ``settings``)."""

    workers: int
    duration: float
    warmup: float
    connections: int
    wrk_threads: int
    starts: int
    reload_duration: float
    reloads: bool
    rounds: int
    quiet_cores: float
    quiet_wait: float
    quick: bool
    out: Path
    #: The measures to run (``--measure``), in the order they run.
    measures: tuple[str, ...] = ("starts", "rounds")
    burst_connections: tuple[int, ...] = (5000, 10000)
    burst_duration: float = 10.0
    burst_threads: int = 2
    #: keepalive (requests on the burst's connections) or close (a connection per request).
    burst_mode: str = "keepalive"
    burst_rounds: int = 1
    replace_kills: int = 5
    reload_time_workers: int = 8
    reload_time_rounds: int = 3
    #: reload-time: besides each aiocluster row, one row per ``--reload-batch`` value here.
    reload_batches: tuple[int, ...] = ()
    #: More ``aiocluster run`` options for every aiocluster row (``--aiocluster-args``).
    aiocluster_args: str = ""
    #: Another checkout whose aiocluster the ``baseline-*`` rows run (``--baseline``), or "".
    baseline: str = ""
    growth_workers: tuple[int, ...] = (1, 2, 8, 32)
    growth_passes: int = 3


@dataclasses.dataclass(frozen=True)
class Context:
    """What a server's command line may depend on."""

    port: int
    workers: int
    tmp: Path

    def bin(self, name: str) -> str:
        """The path of program ``name`` in the benchmark venv."""
        return str(VENV / "bin" / name)


def say(text: str) -> None:
    """Progress on stdout, at once (a run takes minutes)."""
    print(text, flush=True)
