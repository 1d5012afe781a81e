"""The server table: every row of the benchmark as data, and the order rows run in.

A row says how to start a server (``argv``, ``env``, config files), what it is compared with
(``family``), what it lacks here (``missing``) and how it reloads. ``build_servers()`` is the
one list of rows: a new server or policy is one entry there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from .config import APPS, HOST, NODE, VENV, Context

POLICY_DEFAULTS = ("rr", "reuseport")


@dataclasses.dataclass(frozen=True)
class Server:
    """One row of the benchmark: how to start it and what it is compared with."""

    name: str
    family: str  # "aiocluster", "peer" or "ceiling"
    describe: str
    argv: Callable[[Context], list[str]]
    env: Callable[[Context], dict[str, str]] = lambda ctx: {}
    #: Writes config files into ctx.tmp before the start, if the server needs any.
    prepare: Callable[[Context], None] | None = None
    #: Returns why the row cannot run here (a missing program), or None.
    missing: Callable[[], str | None] = lambda: None
    #: The signal that makes the server reload its workers gracefully, if it has one.
    reload_signal: signal.Signals | None = None
    reload_note: str = ""
    #: Whether the server starts a new worker when one dies (the ``replace`` measure).
    replaces_workers: bool = True
    replace_note: str = ""


def _need(path: str, how: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if shutil.which(path) or Path(path).exists() else f"{path} not found: {how}"

    return check


def _need_venv(name: str) -> Callable[[], str | None]:
    return _need(str(VENV / "bin" / name), "run `python benchmarks/run.py --setup`")


# aiocluster reloads on SIGHUP (rolling: each new worker listens before the old one drains);
# `measure_reload` counts the requests that fail meanwhile, as for the peers.
AIOCLUSTER_RELOAD: signal.Signals | None = signal.SIGHUP
AIOCLUSTER_RELOAD_NOTE = ""


def aiocluster_help() -> tuple[str, str]:
    """What ``aiocluster run --help`` prints, or "" and why it could not be run."""
    exe = VENV / "bin" / "aiocluster"
    try:
        text = subprocess.run(
            [str(exe), "run", "--help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return "", f"cannot run `aiocluster run --help` ({err})"
    return text, ""


def aiocluster_policies(text: str) -> tuple[list[str], str]:
    """The ``--policy`` choices ``aiocluster run --help`` lists (besides the default), or a note."""
    if "--policy" not in text:
        return [], "policy rows skipped: `aiocluster run --help` lists no --policy yet"
    found = re.search(r"--policy\s+\{([^}]*)\}", text)
    choices = [c.strip() for c in found.group(1).split(",")] if found else list(POLICY_DEFAULTS)
    # The default as the option's own help states it: "(default: shared) [env: AIOCLUSTER_POLICY]".
    default = re.search(r"\(default:\s*([\w-]+)\)\s*\[env:\s*AIOCLUSTER_POLICY\]", text)
    if default and default.group(1) in choices:
        choices.remove(default.group(1))  # the rows without --policy already measure it
    return choices, ""


def aiocluster_start_methods(text: str) -> tuple[list[str], str]:
    """The ``--start`` methods ``aiocluster run --help`` lists, or a note on why none."""
    if not re.search(r"--start\b", text):
        return [], "start-method rows skipped: `aiocluster run --help` lists no --start yet"
    found = re.search(r"--start\s+\{([^}]*)\}", text)
    return ([c.strip() for c in found.group(1).split(",")] if found else ["spawn"]), ""


def gunicorn_row(name: str, app: str, how: str, *worker: str) -> Server:
    """A gunicorn row: ``app`` on N workers of the class ``worker`` names (its ``-k`` and
    options), the backlog of the other rows, warnings only in its log."""
    return Server(
        name=name,
        family="peer",
        describe=how,
        argv=lambda ctx: [
            ctx.bin("gunicorn"),
            app,
            *worker,
            "-w",
            str(ctx.workers),
            "-b",
            f"{HOST}:{ctx.port}",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
        ],
        missing=_need_venv("gunicorn"),
        reload_signal=signal.SIGHUP,
    )


def node_row(name: str, sched: str, how: str) -> Server:
    """Node.js's own cluster module on the classic hello world, with scheduling ``sched``."""
    return Server(
        name=name,
        family="peer",
        describe=f"Node.js cluster, classic hello world, {how}",
        argv=lambda ctx: [NODE, str(APPS / "node_cluster.js")],
        env=lambda ctx: {"PORT": str(ctx.port), "WORKERS": str(ctx.workers), "BENCH_SCHED": sched},
        missing=_need(NODE, "install Node.js (Debian: apt-get install -y nodejs)"),
        reload_note="Node's cluster has no built-in reload",
    )


def aiocluster_row(
    name: str, spec: str, *flags: str, policy: str | None = None, start: str | None = None
) -> Server:
    """``aiocluster run SPEC FLAGS`` on the row's port, with ``--policy``/``--start`` if given."""
    extra = [
        *flags,
        *(["--policy", policy] if policy else []),
        *(["--start", start] if start else []),
    ]
    if "--protocol" in flags:
        what = "bare asyncio protocol"
    elif spec.startswith("hello_asgi"):
        what = "ASGI hello app, uvicorn's httptools protocol"
    else:
        what = "aiohttp hello app"
    return Server(
        name=name,
        family="aiocluster",
        describe=f"aiocluster run {spec} {' '.join(extra)} ({what}, uvloop)".replace("  ", " "),
        argv=lambda ctx: [
            ctx.bin("aiocluster"),
            "run",
            spec,
            *extra,
            "-w",
            str(ctx.workers),
            "-b",
            f"{HOST}:{ctx.port}",
            # A control socket of its own (none): the default per-user one is taken while any
            # other cluster of this user runs, and the row would refuse to start.
            "--control",
            "off",
        ],
        missing=_need_venv("aiocluster"),
        reload_signal=AIOCLUSTER_RELOAD,
        reload_note=AIOCLUSTER_RELOAD_NOTE,
    )


def with_flags(server: Server, name: str, flags: list[str]) -> Server:
    """``server`` (an aiocluster row) with more ``aiocluster run`` options, named ``name``."""
    return dataclasses.replace(
        server,
        name=name,
        describe=f"{server.describe} + {' '.join(flags)}",
        argv=lambda ctx: [*server.argv(ctx), *flags],
    )


#: The row of the floor (``apps/import_floor.py``): timed by the ``starts`` measure only.
FLOOR = "import-floor"

BASELINE = "baseline-"  # the name prefix of a row running another checkout's aiocluster


def baseline_row(server: Server, checkout: Path) -> Server:
    """``server`` (an aiocluster row) running the aiocluster package of another checkout:
    ``python -m aiocluster`` of the benchmark venv with ``checkout`` first on PYTHONPATH (it
    comes before the venv's installed copy), for an A/B of two trees within one run."""

    def argv(ctx: Context) -> list[str]:
        own = server.argv(ctx)
        return [ctx.bin("python"), "-m", "aiocluster", *own[1:]]

    return dataclasses.replace(
        server,
        name=BASELINE + server.name,
        describe=f"{server.describe}, aiocluster from {checkout}",
        argv=argv,
        env=lambda ctx: {**server.env(ctx), "PYTHONPATH": str(checkout)},
        missing=lambda: (
            None
            if (checkout / "aiocluster" / "__init__.py").exists()
            else f"{checkout} holds no aiocluster package"
        ),
    )


def write_nginx_conf(ctx: Context) -> None:
    """nginx's config for this start, from ``apps/nginx.conf``, in the row's own folder."""
    template = (APPS / "nginx.conf").read_text()
    (ctx.tmp / "nginx.conf").write_text(
        template.format(workers=ctx.workers, port=ctx.port, tmp=ctx.tmp)
    )


def build_servers() -> tuple[list[Server], list[str]]:
    """The rows to run, and notes on rows left out. One entry per row: add rows here."""
    notes: list[str] = []
    rows = [
        aiocluster_row("aiocluster-aiohttp", "hello_aiohttp:app"),
        aiocluster_row("aiocluster-protocol", "bare_protocol:HelloProtocol", "--protocol"),
        # The same ASGI app as uvicorn-asgi, gunicorn-asgi and granian-asgi (the asgi extra).
        aiocluster_row("aiocluster-asgi", "hello_asgi:app"),
    ]
    help_text, why = aiocluster_help()
    if why:
        notes.append(f"policy and start-method rows skipped: {why}")
    policies, note = aiocluster_policies(help_text) if help_text else ([], "")
    if note:
        notes.append(note)
    # The fork start method (a zygote forks the workers) is to become the default: this row keeps
    # the fresh-interpreter start measured beside it, once `aiocluster run` has --start.
    methods, note = aiocluster_start_methods(help_text) if help_text else ([], "")
    if note:
        notes.append(note)
    if "spawn" in methods:
        rows.append(aiocluster_row("aiocluster-aiohttp-spawn", "hello_aiohttp:app", start="spawn"))
    for policy in policies:
        rows.append(
            aiocluster_row(f"aiocluster-aiohttp-{policy}", "hello_aiohttp:app", policy=policy)
        )
        rows.append(aiocluster_row(f"aiocluster-asgi-{policy}", "hello_asgi:app", policy=policy))
        rows.append(
            aiocluster_row(
                f"aiocluster-protocol-{policy}",
                "bare_protocol:HelloProtocol",
                "--protocol",
                policy=policy,
            )
        )
    rows += [
        gunicorn_row(
            "gunicorn-aiohttp",
            "hello_aiohttp:app",
            "gunicorn -k aiohttp.GunicornUVLoopWebWorker, the same aiohttp app",
            "-k",
            "aiohttp.GunicornUVLoopWebWorker",
        ),
        Server(
            name="uvicorn-asgi",
            family="peer",
            describe="uvicorn --workers N --http httptools --loop uvloop, equivalent ASGI app",
            argv=lambda ctx: [
                ctx.bin("uvicorn"),
                "hello_asgi:app",
                "--workers",
                str(ctx.workers),
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--host",
                HOST,
                "--port",
                str(ctx.port),
                "--backlog",
                "2048",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            missing=_need_venv("uvicorn"),
            reload_signal=signal.SIGHUP,
        ),
        gunicorn_row(
            "gunicorn-asgi",
            "hello_asgi:app",
            "gunicorn -k asgi (gunicorn's own ASGI worker, gunicorn >= 27) --asgi-loop uvloop, "
            "the same ASGI app",
            "-k",
            "asgi",
            "--asgi-loop",
            "uvloop",
        ),
        Server(
            name="granian-asgi",
            family="peer",
            describe="granian --interface asgi --workers N --loop uvloop, equivalent ASGI app",
            argv=lambda ctx: [
                ctx.bin("granian"),
                "--interface",
                "asgi",
                "--workers",
                str(ctx.workers),
                "--loop",
                "uvloop",
                "--http",
                "1",
                "--no-ws",
                "--host",
                HOST,
                "--port",
                str(ctx.port),
                "--backlog",
                "2048",
                "--log-level",
                "warning",
                "hello_asgi:app",
            ],
            missing=_need_venv("granian"),
            reload_signal=signal.SIGHUP,
            # Off by default in granian: --respawn-failed-workers, after --respawn-interval.
            replaces_workers=False,
            replace_note="granian replaces a dead worker only with --respawn-failed-workers",
        ),
        node_row("node-cluster", "none", "SCHED_NONE (workers accept)"),
        node_row("node-cluster-rr", "rr", "SCHED_RR (primary hands out)"),
        # Not a server: the floor of the aiohttp app's first answer (the `starts` measure only).
        Server(
            name=FLOOR,
            family="floor",
            describe="no server: a fresh interpreter imports aiohttp.web, then answers on a "
            "plain socket (apps/import_floor.py; the least any server of the aiohttp app pays)",
            argv=lambda ctx: [
                ctx.bin("python"),
                str(APPS / "import_floor.py"),
                HOST,
                str(ctx.port),
            ],
            missing=_need_venv("python"),
            replaces_workers=False,
        ),
        Server(
            name="nginx",
            family="ceiling",
            describe="nginx `return 200`, worker_processes N (the ceiling)",
            argv=lambda ctx: [
                shutil.which("nginx") or "/usr/sbin/nginx",
                "-p",
                str(ctx.tmp),
                "-c",
                str(ctx.tmp / "nginx.conf"),
                "-e",
                str(ctx.tmp / "error.log"),
            ],
            prepare=write_nginx_conf,
            missing=_need("/usr/sbin/nginx", "apt-get update && apt-get install -y nginx"),
            reload_signal=signal.SIGHUP,
        ),
    ]
    return rows, notes


#: The order servers run in within a round (reversed every other round): each aiocluster row
#: beside the peer its target ratio compares it with, so that the two run close together.
#: Exact names first, then globs; rows matching nothing run last, in table order.
RUN_ORDER = (
    "uvicorn-asgi",
    "aiocluster-asgi",
    "gunicorn-asgi",
    "aiocluster-asgi-rr",
    "aiocluster-asgi-reuseport",
    "aiocluster-aiohttp",
    "aiocluster-aiohttp-spawn",
    FLOOR,
    "gunicorn-aiohttp",
    "aiocluster-aiohttp-reuseport",
    "aiocluster-aiohttp-*",
    "aiocluster-aiohttp-rr",
    "node-cluster-rr",
    "aiocluster-protocol-rr",
    "node-cluster",
    "aiocluster-protocol",
    "nginx",
    "aiocluster-protocol-reuseport",
    "aiocluster-protocol-*",
    "granian-asgi",
)


def run_order(servers: list[Server]) -> list[Server]:
    """``servers`` in RUN_ORDER (see there)."""

    def key(item: tuple[int, Server]) -> tuple[int, int]:
        index, server = item
        # A baseline row runs beside its own row (it comes later in the table).
        name = server.name.removeprefix(BASELINE)
        if name in RUN_ORDER:
            return RUN_ORDER.index(name), index
        for place, pattern in enumerate(RUN_ORDER):
            if fnmatch.fnmatch(name, pattern):
                return place, index
        return len(RUN_ORDER), index

    return [server for _, server in sorted(enumerate(servers), key=key)]
