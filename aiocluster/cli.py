"""The ``aiocluster`` command line: ``run`` a cluster, and ``status|reload|scale|stop`` it.

The options of ``run`` are made from the table in :mod:`aiocluster._options`. Each can also
come from the environment as ``AIOCLUSTER_<OPTION>`` (dashes as underscores:
``AIOCLUSTER_WORKERS=4``, ``AIOCLUSTER_BIND="127.0.0.1:8000 unix:/run/a.sock"``) or from a
TOML config file; the command line wins over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from aiocluster import __version__
from aiocluster._appspec import NotImported, check_module, split_spec
from aiocluster._config import ClusterConfig, default_start
from aiocluster._errors import AppLoadError, ConfigError
from aiocluster._kinds import Interface
from aiocluster._logging import set_level
from aiocluster._options import (
    OPTIONS,
    Option,
    Settings,
    arguments,
    config_file,
    environment,
    name_from,
    option,
    resolve,
)
from aiocluster._process import apply_process_settings
from aiocluster._role import Role, role
from aiocluster._tls import check_tls
from aiocluster._zygote import pause_collector, prefork_zygote

# Only what parsing the command line needs is imported up here: ``run`` forks its zygote as
# soon as the arguments are checked, and loads the rest of aiocluster while the zygote loads
# the application.

__all__ = ["Parser", "app_interface", "build_parser", "command_settings", "main"]


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``aiocluster: error: ...``, status 2.

    It takes no abbreviations of long options: ``--reload`` must never be read as
    ``--reload-batch``, nor a future option's prefix as an older one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The subcommands' parsers are of this class too: one place covers them all.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line, with where to find the usage, and exit with 2."""
        self.exit(2, f"aiocluster: error: {message} (see '{self.prog} --help')\n")


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    """A ``type=`` for argparse: the option's own check, its error as argparse's.

    :func:`~aiocluster._options.resolve` checks the value again, as it checks every layer's;
    checks accept the values they return, so that costs nothing but the call.
    """

    def check(text: str) -> Any:
        try:
            return opt.check(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    check.__name__ = opt.name  # argparse names the type in some of its errors
    return check


def _argument(opt: Option) -> dict[str, Any]:
    """``add_argument`` keywords for ``opt`` (its flags are ``opt.flags``)."""
    help_text = opt.help
    default = opt.default_text()
    if default is not None:
        help_text += f" (default: {default})"
    # SUPPRESS: an option not given is absent from the namespace, so that the environment and
    # the defaults are applied in one place, by resolve().
    kwargs: dict[str, Any] = {
        "dest": opt.name,
        "default": argparse.SUPPRESS,
        "help": f"{help_text} [env: {opt.env}]".replace("%", "%%"),
    }
    if opt.kind == "flag":
        return {**kwargs, "action": "store_true"}
    if opt.kind == "switch":
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    return {
        **kwargs,
        "action": "append" if opt.kind == "list" else "store",
        # With choices, argparse's own "invalid choice: ... (choose from ...)" says it best.
        "type": None if opt.choices else _argparse_type(opt),
        "choices": opt.choices,
        "metavar": opt.metavar,
    }


def _add_run_options(cmd: argparse.ArgumentParser) -> None:
    """Every command-line option of the table, under its group's heading."""
    groups = list(dict.fromkeys(opt.group for opt in OPTIONS if opt.cli))
    for group in groups:
        heading = cmd.add_argument_group(group.title)
        flags = heading.add_mutually_exclusive_group() if group.exclusive else heading
        for opt in OPTIONS:
            if opt.cli and opt.group == group:
                target = flags if opt.kind == "flag" else heading
                target.add_argument(*opt.flags, **_argument(opt))


def command_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Every option of ``run``: the command line's, else ``environ``'s, else the config
    file's, else the default (the cluster's name: after the APP module)."""
    given = {opt.name: getattr(args, opt.name) for opt in OPTIONS if hasattr(args, opt.name)}
    command_line = arguments(given, ("config", "address", "run", "command"), "command line")
    env = environment(environ)
    file = config_file(getattr(args, "config", None), environ)
    settings = resolve(command_line, env, file)
    if settings.origins["name"] == "default":
        settings = settings.replace("name", name_from(args.app), "default", "default (APP)")
    return settings


def format_settings(settings: Settings, config: ClusterConfig) -> str:
    """``--print-config``: each option's effective value as TOML, and where it came from.

    The output can be a config file: options not set are comments.
    """
    effective = {
        **settings.values,
        "bind": [str(address) for address in config.binds],
        "start": config.start,
    }
    lines = [
        "# The effective configuration (TOML); after each value, where it came from.",
        "# Precedence: command line > environment (AIOCLUSTER_*) > config file > default.",
    ]
    rows = []
    for opt in OPTIONS:
        if not opt.cli or opt.name == "config":
            continue
        value = effective[opt.name]
        source = settings.sources.get(opt.name, settings.origins[opt.name])
        text = f"# {opt.name} is not set" if value is None else f"{opt.name} = {_toml(value)}"
        rows.append((text, source))
    width = max(len(text) for text, _ in rows)
    lines += [f"{text.ljust(width)}  # {source}" for text, source in rows]
    return "\n".join(lines)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def app_interface(settings: Settings) -> Interface:
    """``--interface``, with ``--protocol`` as the alias of ``--interface protocol`` it is."""
    interface: Interface = settings["interface"]
    if settings["protocol"]:
        if interface not in ("auto", "protocol"):
            raise ConfigError(f"--protocol and --interface {interface} exclude each other")
        return "protocol"
    return interface


def _add_target_options(cmd: argparse.ArgumentParser) -> None:
    where = cmd.add_argument_group("which cluster")
    where.add_argument(
        "-n",
        "--name",
        default=None,
        help="the cluster's name, which picks its control socket (default: the one cluster "
        "of yours that is running)",
    )
    where.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help="the control socket's path, instead of the one --name picks",
    )


def build_parser() -> Parser:
    """The ``aiocluster`` command line: ``run`` from the option table, and the control commands."""
    parser = Parser(
        prog="aiocluster",
        # --reload must never be taken for --reload-batch, nor any flag for a longer one.
        allow_abbrev=False,
        description="Run an asyncio server on a cluster of worker processes "
        "(Node's cluster model: one primary owns the sockets, N workers serve).",
    )
    parser.add_argument("--version", action="version", version=f"aiocluster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cmd = commands.add_parser(
        "run",
        allow_abbrev=False,
        help="serve an application on a cluster of workers",
        description="Serve APP on N worker processes sharing the listening sockets. Every "
        "option can also be set in the environment, as shown in [env: ...], or in a TOML "
        "config file (-c, or [tool.aiocluster] in ./pyproject.toml): the command line wins "
        "over the environment, which wins over the file.",
        epilog="examples:\n"
        "  aiocluster run myapp:app -w 4 -b 127.0.0.1:8080\n"
        "  aiocluster run myapp:make_app --factory -b unix:/run/myapp.sock\n"
        "  aiocluster run main:app -w 4 --policy rr     # a FastAPI/Starlette app (ASGI)\n"
        "  aiocluster run echo:EchoProtocol --protocol -b 127.0.0.1:9000\n"
        "  AIOCLUSTER_WORKERS=8 aiocluster run myapp:app --admin 127.0.0.1:9100\n"
        "  aiocluster run myapp:app -c aiocluster.toml --print-config\n"
        "  aiocluster run myapp:app -b 0.0.0.0:8443 --certfile cert.pem --keyfile key.pem\n"
        "\n"
        "signals to the primary: TERM/INT drain and stop (twice: at once), HUP reloads every\n"
        "worker, TTIN adds a worker, TTOU removes one, USR2 upgrades the primary in place.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_cmd.add_argument(
        "app",
        metavar="APP",
        help="module:attribute — an aiohttp Application or an ASGI 3 application (or, with "
        "--factory, a callable returning one; with --interface protocol, an asyncio protocol "
        'factory); module:create_app("x", debug=True) calls a factory with literal arguments',
    )
    run_cmd.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration, and where each value came from, then exit",
    )
    _add_run_options(run_cmd)

    status = commands.add_parser(
        "status",
        help="show the workers of a running cluster",
        description="Show the workers of a running cluster.",
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=_interval,
        metavar="SECONDS",
        help="redraw the table every SECONDS (default 1), with each worker's requests a "
        "second, until Ctrl-C",
    )
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
    scale.add_argument("workers", type=_argparse_type(option("workers")), metavar="N")
    _add_target_options(scale)
    upgrade = commands.add_parser(
        "upgrade",
        help="re-execute the primary with the code installed now: same pid, workers, sockets",
        description="Upgrade the primary in place: the new code proves in a child that it can "
        "take over, then the primary hands its sockets, workers and state to its own new image "
        "(execve: the pid stays). Workers keep serving; with --workers a rolling reload then "
        "moves them to the new code too. Waits until it is done. Linux only. SIGUSR2 does the "
        "same without --workers.",
    )
    upgrade.add_argument(
        "--workers",
        action="store_true",
        help="then replace every worker too (a rolling reload onto the new code)",
    )
    _add_target_options(upgrade)
    stop = commands.add_parser(
        "stop",
        help="drain and stop a running cluster",
        description="Drain and stop a running cluster; waits for it.",
    )
    _add_target_options(stop)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``aiocluster`` console script."""
    cmd = build_parser()
    args = cmd.parse_args(argv)
    if args.command == "run":
        _run(cmd, args)
    else:
        _control_command(cmd, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        settings = command_settings(args)
        config = ClusterConfig.from_settings(settings)
        primary = role() is Role.PRIMARY
        if primary:
            # --chdir before APP is looked up; every other process starts where this one is.
            config = apply_process_settings(config)
        # Like uvicorn and gunicorn: the application module is looked up from where we run.
        sys.path.insert(0, os.getcwd())
        factory, interface = settings["factory"], app_interface(settings)
        module, _ = split_spec(args.app)
        target: Any = NotImported(args.app, factory=factory, interface=interface)
        if not primary:
            pause_collector()  # a spawned zygote (a reload's): see there
            try:
                target = target.load()
            except AppLoadError as err:
                from aiocluster._entry import exit_for_app_error

                exit_for_app_error(err)
        else:
            # The primary never imports the application: the zygote or the workers do.
            check_module(module)
        if args.print_config:
            config = dataclasses.replace(config, start=config.start or default_start())
            print(format_settings(settings, config))
            return
        if primary:
            check_tls(config)
    except ConfigError as err:
        parser.exit(2, f"aiocluster: error: {err}\n")
    # Installed by run() once the application is imported (in the zygote, after the fork).
    set_level(settings["log_level"])
    if primary:
        config = dataclasses.replace(config, start=config.start or default_start())
        if config.start == "fork":
            prefork_zygote()  # in the zygote, run() below loads the application and forks
    from aiocluster._entry import run

    run(
        target,
        use_uvloop=not settings["no_uvloop"],
        config=config,
        interface=interface,
        access_log=settings["access_log"],
        log_level=settings["log_level"],
    )


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"--watch takes seconds in 0.1..3600, not {text!r}")
    return value


def _control_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from aiocluster.ops.control import ControlError, call, control_path, running_clusters
    from aiocluster.ops.status import format_status, wait_for_exit, watch_status

    try:
        if args.name is None and args.control is None:
            running = running_clusters()
            if len(running) > 1 and args.command == "status" and not args.watch:
                _print_statuses(running, as_json=args.json)
                return
            if len(running) > 1:
                parser.exit(
                    2,
                    f"aiocluster: error: {len(running)} clusters are running "
                    f"({', '.join(running)}): say which with --name\n",
                )
            path = next(iter(running.values()), None) or control_path("default")
        else:
            path = control_path(args.name or "default", args.control)
        if args.command == "status" and args.watch:
            watch_status(lambda: call(path, {"act": "status"}), args.watch)
        elif args.command == "status":
            reply = call(path, {"act": "status"})
            if args.json:
                print(json.dumps(reply["status"], indent=2))
            else:
                print(format_status(reply["name"], reply["pid"], reply["status"]))
        elif args.command == "reload":
            reply = call(path, {"act": "reload"})
            print(f"reloaded: {reply['workers']} workers replaced")
        elif args.command == "upgrade":
            reply = call(path, {"act": "upgrade", "workers": args.workers})
            done = f"upgraded: the primary (pid {reply['pid']}) runs aiocluster {reply['version']}"
            print(done + ("; every worker replaced" if reply.get("reloaded") else ""))
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


def _print_statuses(running: Mapping[str, Any], *, as_json: bool) -> None:
    """``aiocluster status`` with several clusters running and no --name: each of them."""
    from aiocluster.ops.control import ControlError, call
    from aiocluster.ops.status import format_status

    statuses: dict[str, Any] = {}
    for name, path in running.items():
        try:
            statuses[name] = call(path, {"act": "status"}, timeout=10)
        except ControlError as err:  # it stopped meanwhile
            statuses[name] = {"error": str(err)}
    if as_json:
        print(
            json.dumps(
                {name: reply.get("status", reply) for name, reply in statuses.items()}, indent=2
            )
        )
        return
    blocks = [
        format_status(reply["name"], reply["pid"], reply["status"])
        if "status" in reply
        else f"cluster {name}: {reply['error']}"
        for name, reply in statuses.items()
    ]
    print(f"{len(running)} clusters are running (pick one with --name):\n")
    print("\n\n".join(blocks))
