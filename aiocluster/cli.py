"""The ``aiocluster`` command line: ``aiocluster run APP [options]``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from . import __version__
from ._config import DEFAULT_POLICY, ENV_POLICY, ClusterConfig, default_workers
from ._errors import ConfigError
from ._policy import BALANCES, POLICIES
from ._serve import run
from ._worker import is_worker

__all__ = ["load_app", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiocluster",
        description="Run an asyncio server on a cluster of worker processes "
        "(Node's cluster model: one primary owns the sockets, N workers serve).",
    )
    parser.add_argument("--version", action="version", version=f"aiocluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cmd = commands.add_parser(
        "run",
        help="serve an application on a cluster of workers",
        description="Serve APP on N worker processes sharing the listening sockets.",
        epilog="examples:\n"
        "  aiocluster run myapp:app -w 4 -b 127.0.0.1:8080\n"
        "  aiocluster run myapp:make_app --factory -b unix:/run/myapp.sock\n"
        "  aiocluster run echo:EchoProtocol --protocol -b 127.0.0.1:9000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_cmd.add_argument(
        "app",
        metavar="APP",
        help="module:attribute — an aiohttp Application (or, with --factory, a callable "
        "returning one; with --protocol, an asyncio protocol factory)",
    )
    run_cmd.add_argument(
        "-w",
        "--workers",
        type=_positive_int,
        default=None,
        help=f"number of worker processes (default: CPUs usable here, {default_workers()})",
    )
    run_cmd.add_argument(
        "-b",
        "--bind",
        action="append",
        default=None,
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT or unix:PATH to listen on; repeat for several "
        "(default: 127.0.0.1:8000)",
    )
    kind = run_cmd.add_mutually_exclusive_group()
    kind.add_argument(
        "--factory",
        action="store_true",
        help="APP is a callable (sync or async) returning the Application",
    )
    kind.add_argument(
        "--protocol",
        action="store_true",
        help="APP is an asyncio protocol factory served with loop.create_server",
    )
    run_cmd.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="on stop, how long in-flight requests may take before workers are killed "
        "(default: 30)",
    )
    run_cmd.add_argument(
        "--backlog",
        type=_positive_int,
        default=2048,
        help="listen backlog of each socket (default: 2048)",
    )
    run_cmd.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="who accepts connections: 'shared' (every worker, on one socket), 'rr' (the "
        "primary, handing each to a worker), 'reuseport' (Linux: one SO_REUSEPORT socket per "
        f"worker slot, kept by the primary) (default: ${ENV_POLICY}, else {DEFAULT_POLICY})",
    )
    run_cmd.add_argument(
        "--balance",
        choices=BALANCES,
        default=None,
        help="with --policy rr: rotate over the workers in order, or choose the one with the "
        "fewest open connections (default: round-robin)",
    )
    run_cmd.add_argument(
        "--sticky",
        action="store_true",
        help="with --policy rr: the same client address always reaches the same live worker "
        "(websockets, session-bound apps)",
    )
    run_cmd.add_argument(
        "--access-log", action="store_true", help="log every request (aiohttp apps)"
    )
    run_cmd.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use asyncio's own event loop even when uvloop is installed",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def split_spec(spec: str) -> tuple[str, str]:
    """Split ``module:attribute`` and check both halves, without importing anything."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"APP must look like module:attribute (e.g. myapp:app), not {spec!r}")
    names = [*module.split("."), *attr.split(".")]
    if not all(name.isidentifier() for name in names):
        raise ConfigError(f"APP {spec!r} is not a valid module:attribute path")
    return module, attr


def check_module(module: str) -> None:
    """Raise :class:`ConfigError` if ``module`` cannot be found (it is not imported here)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"cannot find module {module!r}: {err}") from None
    if found is None:
        raise ConfigError(
            f"cannot find module {module!r} (looked in {os.getcwd()} and sys.path); "
            "run aiocluster from the directory that holds it"
        )


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` and return the attribute."""
    module_name, attr = split_spec(spec)
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def check_kind(target: Any, spec: str, *, factory: bool, protocol: bool) -> Any:
    """Check that what ``spec`` names is what ``--factory``/``--protocol`` said it is."""
    if factory or protocol:
        if not callable(target):
            what = "protocol factory" if protocol else "factory"
            raise ConfigError(f"{spec} is a {type(target).__name__}, not a callable {what}")
    elif not isinstance(target, web.Application):
        raise ConfigError(
            f"{spec} is a {type(target).__name__}, not an aiohttp Application; pass --factory "
            "if it builds one, or --protocol if it is an asyncio protocol factory"
        )
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``aiocluster`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Like uvicorn and gunicorn: the application module is looked up from where we run.
    sys.path.insert(0, os.getcwd())
    try:
        module, _ = split_spec(args.app)
        if is_worker():
            target = check_kind(
                load_app(args.app), args.app, factory=args.factory, protocol=args.protocol
            )
        else:
            # The primary never imports the application: workers do, each afresh.
            check_module(module)
            target = _NotImported(args.app)
        config = ClusterConfig.build(
            workers=args.workers,
            bind=args.bind,
            graceful_timeout=args.graceful_timeout,
            backlog=args.backlog,
            policy=args.policy,
            balance=args.balance,
            sticky=args.sticky,
        )
    except ConfigError as err:
        parser.exit(2, f"aiocluster: error: {err}\n")
    run(
        target,
        use_uvloop=not args.no_uvloop,
        config=config,
        protocol=args.protocol,
        access_log=args.access_log,
    )


class _NotImported:
    """Stands for the application in the primary, which never imports it."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self) -> None:  # pragma: no cover - never called in the primary
        raise AssertionError("the primary does not build the application")
