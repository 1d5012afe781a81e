"""The ``aiocluster`` command line: ``run`` a cluster, and ``status|reload|scale|stop`` it.

Every option of ``run`` can also come from the environment as ``AIOCLUSTER_<OPTION>`` (dashes
as underscores: ``AIOCLUSTER_WORKERS=4``, ``AIOCLUSTER_BIND="127.0.0.1:8000 unix:/run/a.sock"``);
an option on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from aiocluster import __version__
from aiocluster._appspec import NotImported, check_module, split_spec
from aiocluster._config import (
    BALANCES,
    DEFAULT_POLICY,
    POLICIES,
    START_METHODS,
    ClusterConfig,
    default_start,
    default_workers,
)
from aiocluster._errors import AppLoadError, ConfigError
from aiocluster._logging import set_level
from aiocluster._role import Role, role
from aiocluster._zygote import prefork_zygote

# Only what parsing the command line needs is imported up here: ``run`` forks its zygote as
# soon as the arguments are checked, and loads the rest of aiocluster while the zygote loads
# the application.

__all__ = ["main"]

ENV_PREFIX = "AIOCLUSTER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.lower()


def _add_target_options(cmd: argparse.ArgumentParser) -> None:
    where = cmd.add_argument_group("which cluster")
    where.add_argument(
        "-n",
        "--name",
        default="default",
        help="the cluster's name, which picks its control socket (default: default)",
    )
    where.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help="the control socket's path, instead of the one --name picks",
    )


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
        description="Serve APP on N worker processes sharing the listening sockets. Every "
        "option can also be set in the environment, as shown in [env: ...].",
        epilog="examples:\n"
        "  aiocluster run myapp:app -w 4 -b 127.0.0.1:8080\n"
        "  aiocluster run myapp:make_app --factory -b unix:/run/myapp.sock\n"
        "  aiocluster run echo:EchoProtocol --protocol -b 127.0.0.1:9000\n"
        "  AIOCLUSTER_WORKERS=8 aiocluster run myapp:app --admin 127.0.0.1:9100\n"
        "\n"
        "signals to the primary: TERM/INT drain and stop (twice: at once), HUP reloads every\n"
        "worker, TTIN adds a worker, TTOU removes one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_cmd.add_argument(
        "app",
        metavar="APP",
        help="module:attribute — an aiohttp Application (or, with --factory, a callable "
        "returning one; with --protocol, an asyncio protocol factory)",
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

    serving = run_cmd.add_argument_group("serving")
    serving.add_argument(
        "-w",
        "--workers",
        type=_positive_int,
        default=None,
        help=f"number of worker processes (default: the CPUs usable here, {default_workers()})",
    )
    serving.add_argument(
        "-b",
        "--bind",
        action="append",
        default=None,
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT or unix:PATH to listen on; repeat for several "
        "(default: 127.0.0.1:8000; ignored when systemd passes sockets)",
    )
    serving.add_argument(
        "--backlog",
        type=_positive_int,
        default=2048,
        help="listen backlog of each socket (default: 2048)",
    )
    serving.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="who accepts connections: 'shared' (every worker, on one socket), 'rr' (the "
        "primary, handing each to a worker), 'reuseport' (Linux: one SO_REUSEPORT socket per "
        f"worker slot, kept by the primary) (default: {DEFAULT_POLICY})",
    )
    serving.add_argument(
        "--balance",
        choices=BALANCES,
        default=None,
        help="with --policy rr: rotate over the workers in order, or choose the one with the "
        "fewest open connections (default: round-robin)",
    )
    serving.add_argument(
        "--sticky",
        action="store_true",
        help="with --policy rr: the same client address always reaches the same live worker "
        "(websockets, session-bound apps)",
    )
    serving.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use asyncio's own event loop even when uvloop is installed",
    )

    supervision = run_cmd.add_argument_group("supervision")
    supervision.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="how long a stopping or reloaded worker may finish in-flight requests before it "
        "is killed (default: 30)",
    )
    supervision.add_argument(
        "-t",
        "--timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="kill and replace a worker whose event loop is blocked this long; its stack is "
        "dumped to the log first (0 disables; default: 30)",
    )
    supervision.add_argument(
        "--max-requests",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="recycle a worker after about N requests (0 disables; default: 0)",
    )
    supervision.add_argument(
        "--max-requests-jitter",
        type=_non_negative_int,
        default=0,
        metavar="J",
        help="add 0..J to each worker's --max-requests so they do not recycle together",
    )
    supervision.add_argument(
        "--max-memory",
        default="0",
        metavar="SIZE",
        help="recycle a worker whose resident memory exceeds SIZE, e.g. 512M or 2G "
        "(Linux; 0 disables; default: 0)",
    )
    supervision.add_argument(
        "--start",
        choices=START_METHODS,
        default=None,
        help="how workers start: 'fork' them from a zygote process that loaded APP once (fast, "
        "shares memory; Linux), or 'spawn' a fresh interpreter for each (default: fork on "
        "Linux, spawn elsewhere; fork falls back to spawn, with a warning, where APP started "
        "threads at import)",
    )
    supervision.add_argument(
        "--reload-batch",
        type=_positive_int,
        default=1,
        metavar="N",
        help="workers replaced at a time by a reload (default: 1)",
    )

    operations = run_cmd.add_argument_group("operations")
    operations.add_argument(
        "-n",
        "--name",
        default="default",
        help="the cluster's name; picks the control socket that 'aiocluster status' and the "
        "other commands use (default: default)",
    )
    operations.add_argument(
        "--control",
        default=None,
        metavar="PATH",
        help="control socket path instead of the per-user one for --name; 'off' for none",
    )
    operations.add_argument(
        "--admin",
        default=None,
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and Prometheus /metrics here (default: nowhere)",
    )
    operations.add_argument(
        "--log-level",
        type=_log_level,
        default="info",
        help=f"one of {', '.join(LOG_LEVELS)} (default: info)",
    )
    operations.add_argument(
        "--access-log", action="store_true", help="log every request (aiohttp apps)"
    )
    _env_defaults(run_cmd)

    status = commands.add_parser(
        "status",
        help="show the workers of a running cluster",
        description="Show the workers of a running cluster.",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    _add_target_options(status)
    reload = commands.add_parser(
        "reload",
        help="replace every worker, one by one, without dropping a request",
        description="Rolling reload: start each new worker, wait until it listens, then drain "
        "the old one. Waits until the reload is done.",
    )
    _add_target_options(reload)
    scale = commands.add_parser(
        "scale", help="set the number of workers", description="Set the number of workers."
    )
    scale.add_argument("workers", type=_positive_int, metavar="N")
    _add_target_options(scale)
    stop = commands.add_parser(
        "stop",
        help="drain and stop a running cluster",
        description="Drain and stop a running cluster; waits for it.",
    )
    _add_target_options(stop)
    return parser


def _env_defaults(cmd: argparse.ArgumentParser) -> None:
    """Let ``AIOCLUSTER_<OPTION>`` set each option's default, and say so in ``--help``."""
    for action in cmd._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        var = ENV_PREFIX + action.dest.upper()
        action.help = f"{action.help} [env: {var}]"
        text = os.environ.get(var)
        if text is None:
            continue
        try:
            value: Any
            if isinstance(action, argparse._StoreTrueAction):
                value = _env_bool(text)
            elif isinstance(action, argparse._AppendAction):
                value = text.replace(",", " ").split()
            elif action.type is not None and callable(action.type):
                value = action.type(text)
            else:
                value = text
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
        except (argparse.ArgumentTypeError, ValueError) as err:
            cmd.error(f"{var}={text!r}: {err}")
        action.default = value


def _env_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``aiocluster`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        _run(parser, args)
    else:
        _control_command(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Like uvicorn and gunicorn: the application module is looked up from where we run.
    sys.path.insert(0, os.getcwd())
    try:
        if args.factory and args.protocol:  # possible through the environment only
            raise ConfigError("--factory and --protocol exclude each other (check AIOCLUSTER_*)")
        module, _ = split_spec(args.app)
        target: Any = NotImported(args.app, factory=args.factory, protocol=args.protocol)
        primary = role() is Role.PRIMARY
        if not primary:
            try:
                target = target.load()
            except AppLoadError as err:
                from aiocluster._entry import exit_for_app_error

                exit_for_app_error(err)
        else:
            # The primary never imports the application: the zygote or the workers do.
            check_module(module)
        config = ClusterConfig.build(
            workers=args.workers,
            bind=args.bind,
            graceful_timeout=args.graceful_timeout,
            backlog=args.backlog,
            timeout=args.timeout,
            max_requests=args.max_requests,
            max_requests_jitter=args.max_requests_jitter,
            max_memory=args.max_memory,
            reload_batch=args.reload_batch,
            name=args.name,
            control=args.control,
            admin=args.admin,
            policy=args.policy,
            balance=args.balance,
            sticky=args.sticky,
            start=args.start,
        )
    except ConfigError as err:
        parser.exit(2, f"aiocluster: error: {err}\n")
    # Installed by run() once the application is imported (in the zygote, after the fork).
    set_level(getattr(logging, args.log_level.upper()))
    if primary:
        config = dataclasses.replace(config, start=config.start or default_start())
        if config.start == "fork":
            prefork_zygote()  # in the zygote, run() below loads the application and forks
    from aiocluster._entry import run

    run(
        target,
        use_uvloop=not args.no_uvloop,
        config=config,
        protocol=args.protocol,
        access_log=args.access_log,
    )


def _control_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from aiocluster.ops.control import ControlError, call, control_path
    from aiocluster.ops.status import format_status, wait_for_exit

    try:
        path = control_path(args.name, args.control)
        if args.command == "status":
            reply = call(path, {"act": "status"})
            if args.json:
                print(json.dumps(reply["status"], indent=2))
            else:
                print(format_status(reply["name"], reply["pid"], reply["status"]))
        elif args.command == "reload":
            reply = call(path, {"act": "reload"})
            print(f"reloaded: {reply['workers']} workers replaced")
        elif args.command == "scale":
            reply = call(path, {"act": "scale", "workers": args.workers})
            print(f"scaling to {reply['workers']} workers")
        elif args.command == "stop":
            reply = call(path, {"act": "stop"})
            print(f"stopping the cluster (primary pid {reply['pid']})")
            wait_for_exit(int(reply["pid"]))
            print("stopped")
    except (ControlError, ConfigError) as err:
        parser.exit(1, f"aiocluster: error: {err}\n")
