"""Every option of aiocluster, declared once, in :data:`OPTIONS`.

An :class:`Option` holds what each place that takes the option needs: its name (the Python
keyword; with dashes, the ``--flag``; upper-cased, the ``AIOCLUSTER_<NAME>`` variable), the one
check that turns command-line text, environment text and Python values alike into the value
used, the default, the help, its ``--help`` group, and its scope: a field of
:class:`~aiocluster.ClusterConfig`, a run-level setting, or a command-line-only one.
:class:`ClusterConfig.build() <aiocluster.ClusterConfig>`, ``aiocluster.run()``, the ``run``
command's flags and its ``--help`` are all made from this table, and :func:`environment` is the
one place that reads ``AIOCLUSTER_*`` option variables.

:func:`resolve` merges :class:`Layer` values, first layer first (an explicit argument or the
command line, then the environment, then a config file: see :mod:`aiocluster._configfile`),
over the defaults, and records where each value came from.

Workers and the zygote load this module and the command line loads it before forking its
zygote, so it imports only the standard library and aiocluster's pure modules.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiocluster._configfile import read_table
from aiocluster._errors import ConfigError
from aiocluster._kinds import INTERFACES
from aiocluster.wire.address import Address, parse_bind

__all__ = [
    "APP",
    "BALANCES",
    "CERT_REQS",
    "DEFAULT_POLICY",
    "DEVELOPMENT",
    "ENV_PREFIX",
    "LOG_LEVELS",
    "NAME_CHARS",
    "OPERATIONS",
    "OPTIONS",
    "POLICIES",
    "PROCESS",
    "PROXY",
    "SERVING",
    "START_METHODS",
    "SUPERVISION",
    "TLS",
    "Balance",
    "CertReqs",
    "Group",
    "Layer",
    "Option",
    "Policy",
    "Scope",
    "Settings",
    "StartMethod",
    "arguments",
    "boolean",
    "config_file",
    "default_name",
    "default_start",
    "default_workers",
    "environment",
    "name_from",
    "one_of",
    "option",
    "parse_size",
    "parse_umask",
    "resolve",
    "reuseport_problem",
    "run_settings",
    "seconds",
    "whole",
]

ENV_PREFIX = "AIOCLUSTER_"

Policy = Literal["shared", "rr", "reuseport"]
#: ``shared``: one listening socket, every worker accepts on it (Node's SCHED_NONE).
#: ``rr``: only the primary accepts, and hands each connection to one worker (SCHED_RR).
#: ``reuseport``: one SO_REUSEPORT socket per worker slot, kept by the primary (Linux).
POLICIES: tuple[Policy, ...] = ("shared", "rr", "reuseport")
#: ``shared`` costs nothing in the primary and is what the kernel does well for short requests;
#: see docs/policies.md for the trade-offs and measurements.
DEFAULT_POLICY: Policy = "shared"

Balance = Literal["round-robin", "least-conn"]
#: How the primary chooses a worker under ``rr`` (unless ``sticky`` chooses by client).
BALANCES: tuple[Balance, ...] = ("round-robin", "least-conn")

StartMethod = Literal["fork", "spawn"]
START_METHODS: tuple[StartMethod, ...] = ("fork", "spawn")

CertReqs = Literal["none", "optional", "required"]
#: Whether a TLS server asks clients for a certificate (checked against ``ca_certs``).
CERT_REQS: tuple[CertReqs, ...] = ("none", "optional", "required")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

Scope = Literal["config", "address", "run", "command"]
#: ``value``: one value; ``flag``: a boolean (a bare ``--flag``), off by default; ``switch``:
#: a boolean with ``--flag`` and ``--no-flag``; ``list``: repeatable, each item checked (the
#: environment gives several separated by spaces or commas).
Kind = Literal["value", "flag", "switch", "list"]


def default_start() -> StartMethod:
    """``fork`` on Linux, ``spawn`` elsewhere (for programs entering through ``run()``)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def default_workers() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def name_from(program: str) -> str:
    """A cluster name made from a program's name: ``myapp.web:app`` or ``/srv/hello.py``.

    The APP module (``myapp.web``), or the script's file name without ``.py`` (``hello``; the
    package's name for a ``__main__.py``), with any character a name may not use made ``-``.
    ``default`` when nothing is left.
    """
    if program.startswith("-"):  # python -c, -m without a file: no name to take
        return "default"
    module, sep, _ = program.partition(":")
    if sep:
        stem = module
    else:
        path = os.path.abspath(program) if program else ""
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem == "__main__":
            stem = os.path.basename(os.path.dirname(path))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    return name or "default"


def default_name() -> str:
    """The default cluster name of this program: its script's name (see :func:`name_from`).

    The command line names its clusters after the APP module instead.
    """
    return name_from(sys.argv[0] if sys.argv else "")


def reuseport_problem(platform: str = sys.platform, *, has_option: bool = True) -> str | None:
    """Why policy ``reuseport`` cannot work on ``platform``, or None if it can.

    Only Linux spreads the connections of one port over every SO_REUSEPORT socket bound to
    it. macOS and the BSDs accept the option, but there the last socket bound takes every
    connection, so one worker would serve them all.
    """
    if not has_option:
        return "this system has no SO_REUSEPORT socket option"
    if not platform.startswith("linux"):
        return (
            f"on {platform}, SO_REUSEPORT does not spread connections over the sockets that "
            "share a port (only Linux does): one worker would get them all"
        )
    return None


# -- checks: each takes text (command line, environment) or a Python value, and returns the
# -- value used or raises ConfigError saying what is wrong (the caller says where it came from).

Check = Callable[[object], Any]
_Choice = TypeVar("_Choice", bound=str)


def whole(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    """A check for an integer from ``minimum`` (to ``maximum``); text must be digits."""

    def check(value: object) -> int:
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                raise ConfigError(f"{value!r} is not a whole number") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise ConfigError(f"must be a whole number, not {value!r}")
        if number < minimum:
            raise ConfigError(f"must be at least {minimum}, not {number}")
        if maximum is not None and number > maximum:
            raise ConfigError(f"must be at most {maximum}, not {number}")
        return number

    return check


def seconds(value: object) -> float:
    """A finite number of seconds >= 0."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{value!r} is not a number of seconds") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ConfigError(f"must be a number of seconds, not {value!r}")
    if not number >= 0 or math.isinf(number):
        raise ConfigError(f"must be a finite number >= 0, not {value}")
    return number


def _positive_seconds(value: object) -> float:
    """A finite number of seconds > 0."""
    number = seconds(value)
    if number <= 0:
        raise ConfigError(f"must be more than 0 seconds, not {value}")
    return number


def boolean(value: object) -> bool:
    """True or False; text may say 1/0, true/false, yes/no or on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("", "0", "false", "no", "off"):
            return False
    raise ConfigError("expected 1/0, true/false, yes/no or on/off")


def one_of(choices: tuple[_Choice, ...]) -> Callable[[object], _Choice]:
    """A check for one of ``choices``, typed as the choice it equals."""

    def check(value: object) -> _Choice:
        for choice in choices:
            if value == choice:
                return choice
        raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}")

    return check


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``512M``, ``2G``, ``300000K`` (0 means no limit)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"a memory size must be bytes or like 512M, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a memory size cannot be negative: {value}")
        return value
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    try:
        amount = float(text[: len(text) - len(unit)])
    except ValueError:
        raise ConfigError(
            f"a memory size must be bytes or like 512M or 2G, not {value!r}"
        ) from None
    if not amount >= 0 or math.isinf(amount):
        raise ConfigError(f"a memory size must be a finite number >= 0, not {value!r}")
    return int(amount * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def _memory(value: object) -> int:
    size = parse_size(value)
    if size and not os.path.exists("/proc/self/statm"):
        raise ConfigError("max_memory needs /proc to read workers' memory (Linux only)")
    return size


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, not {value!r}")
    return value


def _cluster_name(value: object) -> str:
    if not isinstance(value, str) or not value or not set(value) <= NAME_CHARS:
        raise ConfigError(f"cluster name {value!r} may use only letters, digits, '.', '_' and '-'")
    return value


def _address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"must be HOST:PORT or unix:PATH, not {value!r}")
    return parse_bind(value)


def _argv(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"must be a list of strings, not {value!r}")
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"must be a list of strings, not {value!r}")
    return items


def _path(value: object) -> str:
    # Checked when used (the primary reads TLS files at start): a path only has to be a path.
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _text(value)


def _ssl_context(value: object) -> ssl.SSLContext:
    if not isinstance(value, ssl.SSLContext):
        raise ConfigError(f"must be an ssl.SSLContext, not {type(value).__name__}")
    return value


def _peers(value: object) -> tuple[str, ...]:
    """Trusted proxies: ``*``, or IP addresses and networks, separated by commas or spaces."""
    if isinstance(value, str):
        items: list[object] = list(value.replace(",", " ").split())
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise ConfigError(
            f"must be addresses or networks (e.g. 127.0.0.1,10.0.0.0/8), not {value!r}"
        )
    peers = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"must be addresses or networks as text, not {item!r}")
        if item == "*":
            peers.append(item)
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
            # One address stays as written: ``--print-config`` shows 127.0.0.1, not /32.
            peers.append(str(network.network_address if "/" not in item else network))
        except ValueError:
            raise ConfigError(
                f"{item!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1, *)"
            ) from None
    if not peers:
        raise ConfigError("name at least one address or network, or '*' for any")
    return tuple(peers)


def _policy(value: object) -> Policy:
    policy = one_of(POLICIES)(value)
    if policy == "reuseport":
        problem = reuseport_problem(has_option=hasattr(socket, "SO_REUSEPORT"))
        if problem is not None:
            raise ConfigError(f"'reuseport' is not available: {problem}; use 'shared' or 'rr'")
    return policy


def _start(value: object) -> StartMethod:
    method = one_of(START_METHODS)(value)
    if method == "fork" and not sys.platform.startswith("linux"):
        raise ConfigError(
            f"'fork' needs Linux (forking without exec is unsafe on {sys.platform}); use 'spawn'"
        )
    return method


def _log_level(value: object) -> str:
    return one_of(LOG_LEVELS)(value.lower() if isinstance(value, str) else value)


# -- checks of the process options (--user ... --reload-exclude) ------------------------------
# Paths are only checked for form here: workers check their options again, from a directory
# --chdir may have changed, so whether a path exists is for the primary to say when it uses it.


def _account(kind: Literal["user", "group"]) -> Callable[[object], str]:
    """A check for a user (or group) name this system knows, or a numeric id (which needs no
    passwd or group entry)."""
    ids = "uid" if kind == "user" else "gid"

    def check(value: object) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"must be a {kind} name or {ids}, not {value!r}")
        if not value.isdigit():
            # Imported here: the table loads on every platform, and these are POSIX-only.
            import grp
            import pwd

            try:
                (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
            except KeyError:
                raise ConfigError(f"no {kind} {value!r} on this system") from None
        return value

    return check


def parse_umask(value: object) -> int:
    """A umask: octal text (``027``, ``0o027``) or an int from 0 to 0o777."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            number = int(text, 8)
        except ValueError:
            raise ConfigError(f"{value!r} is not an octal umask like 027") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ConfigError(f"must be an octal umask like 027, not {value!r}")
    if not 0 <= number <= 0o777:
        raise ConfigError(f"a umask is from 000 to 777 (octal), not {number:o}")
    return number


def _reload(value: object) -> bool:
    on = boolean(value)
    if on and importlib.util.find_spec("watchfiles") is None:
        raise ConfigError("--reload needs the watchfiles package: pip install 'aiocluster[reload]'")
    return on


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    """A heading of ``aiocluster run --help``; ``exclusive``: at most one of its flags is on
    (its options that take a value are not part of that)."""

    title: str
    exclusive: bool = False


APP = Group("what APP is", exclusive=True)
SERVING = Group("serving")
TLS = Group("TLS (HTTPS)")
PROXY = Group("behind a proxy")
SUPERVISION = Group("supervision")
OPERATIONS = Group("operations")
PROCESS = Group("privileges and the process")
DEVELOPMENT = Group("development")


@dataclass(frozen=True, slots=True)
class Option:
    """One option: everything the keyword, the flag, the variable and ``--help`` need.

    ``scope`` says who takes it: ``config``, a :class:`~aiocluster.ClusterConfig` field of this
    name; ``address``, a ``ClusterConfig.build()`` keyword that adds to its ``binds``; ``run``,
    a setting of ``aiocluster.run()`` and the command line not kept in the config; ``command``,
    the command line's only (it says what the APP text names; a program passes the object).
    """

    name: str
    check: Check
    help: str
    group: Group
    scope: Scope = "config"
    kind: Kind = "value"
    #: The value when no layer gives one; ``default_factory`` instead computes it when needed.
    default: Any = None
    default_factory: Callable[[], Any] | None = None
    #: A short flag besides the long one, e.g. ``-w``.
    short: str | None = None
    metavar: str | None = None
    #: The choices, for ``--help`` and for the command line's "invalid choice" error.
    choices: tuple[str, ...] | None = None
    #: How ``--help`` states the default ("{}": the computed default); None: the default itself.
    shown: str | None = None
    #: False for a Python-only keyword (an address part, ``argv``): no flag and no variable.
    cli: bool = True

    @property
    def flag(self) -> str:
        """The long command-line flag: the name with dashes."""
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """Every command-line flag, short one first (empty for a Python-only keyword)."""
        if not self.cli:
            return ()
        return (self.short, self.flag) if self.short else (self.flag,)

    @property
    def env(self) -> str | None:
        """The environment variable, ``AIOCLUSTER_<NAME>`` (None for a Python-only keyword)."""
        return ENV_PREFIX + self.name.upper() if self.cli else None

    def parse(self, raw: object) -> Any:
        """The checked value of ``raw`` (text or a Python value); ConfigError if it is bad."""
        if self.kind != "list":
            return self.check(raw)
        if isinstance(raw, str):
            raw = raw.replace(",", " ").split()
        if not isinstance(raw, Iterable):
            raw = [raw]  # one item: its check says what an item may be
        return tuple(self.check(item) for item in raw)

    def default_value(self) -> Any:
        """The default, computed now if it has a factory."""
        return self.default_factory() if self.default_factory is not None else self.default

    def default_text(self) -> str | None:
        """The default as ``--help`` states it, or None to state none (flags are off)."""
        if self.kind == "flag":
            return None
        if self.kind == "switch":
            return "on" if self.default_value() else "off"
        value = self.default_value()
        if self.shown is not None:
            return self.shown.format(value)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


OPTIONS: tuple[Option, ...] = (
    Option(
        "interface",
        one_of(INTERFACES),
        "what APP is: an aiohttp Application, an ASGI 3 application (Starlette, FastAPI...; "
        "needs pip install 'aiocluster[asgi]'), or an asyncio protocol factory; 'auto' tells "
        "by looking at it",
        APP,
        scope="command",
        default="auto",
        choices=INTERFACES,
    ),
    Option(
        "factory",
        boolean,
        "APP is a callable (sync or async) returning the application",
        APP,
        scope="command",
        kind="flag",
        default=False,
    ),
    Option(
        "protocol",
        boolean,
        "APP is an asyncio protocol factory served with loop.create_server (the same as "
        "--interface protocol)",
        APP,
        scope="command",
        kind="flag",
        default=False,
    ),
    Option(
        "workers",
        whole(1),
        "number of worker processes",
        SERVING,
        default_factory=default_workers,
        short="-w",
        shown="the CPUs usable here, {}",
    ),
    Option(
        "bind",
        _address,
        "HOST:PORT, [IPV6]:PORT or unix:PATH to listen on; repeat for several "
        "(ignored when systemd passes sockets)",
        SERVING,
        scope="address",
        kind="list",
        default=(),
        short="-b",
        metavar="ADDRESS",
        shown="127.0.0.1:8000",
    ),
    Option(
        "host",
        _text,
        "a TCP host to listen on (with port; default 127.0.0.1)",
        SERVING,
        scope="address",
        cli=False,
    ),
    Option(
        "port",
        whole(0, 65535),
        "a TCP port to listen on (with host; 0: the OS chooses one for all workers)",
        SERVING,
        scope="address",
        cli=False,
    ),
    Option("path", _text, "a Unix socket path to listen on", SERVING, scope="address", cli=False),
    Option("backlog", whole(1), "listen backlog of each socket", SERVING, default=2048),
    Option(
        "policy",
        _policy,
        "who accepts connections: 'shared' (every worker, on one socket), 'rr' (the "
        "primary, handing each to a worker), 'reuseport' (Linux: one SO_REUSEPORT socket per "
        "worker slot, kept by the primary)",
        SERVING,
        default=DEFAULT_POLICY,
        choices=POLICIES,
    ),
    Option(
        "balance",
        one_of(BALANCES),
        "with --policy rr: rotate over the workers in order, or choose the one with the "
        "fewest open connections",
        SERVING,
        default="round-robin",
        choices=BALANCES,
    ),
    Option(
        "sticky",
        boolean,
        "with --policy rr: the same client address always reaches the same live worker "
        "(websockets, session-bound apps)",
        SERVING,
        kind="flag",
        default=False,
    ),
    # HTTP limits, named as gunicorn names them; aiohttp's RequestHandler enforces each.
    Option(
        "keep_alive",
        _positive_seconds,
        "close a connection that has no complete request for this long: idle between "
        "keep-alive requests, or a client still sending its request head (a slow client)",
        SERVING,
        default=5.0,
        metavar="SECONDS",
    ),
    Option(
        "limit_request_line",
        whole(1),
        "longest request line, in bytes (longer: answered 400)",
        SERVING,
        default=8190,
        metavar="BYTES",
    ),
    Option(
        "limit_request_fields",
        whole(1),
        "most header fields a request may have (more: answered 400)",
        SERVING,
        default=128,
        metavar="N",
    ),
    Option(
        "limit_request_field_size",
        whole(1),
        "longest header field, in bytes (longer: answered 400)",
        SERVING,
        default=8190,
        metavar="BYTES",
    ),
    Option(
        "no_uvloop",
        boolean,
        "use asyncio's own event loop even when uvloop is installed (run(use_uvloop=False))",
        SERVING,
        scope="run",
        kind="flag",
        default=False,
    ),
    Option(
        "certfile",
        _path,
        "serve HTTPS (TLS) with this PEM certificate chain; every new worker reads it afresh, "
        "so 'aiocluster reload' rotates certificates",
        TLS,
        metavar="FILE",
    ),
    Option(
        "keyfile",
        _path,
        "the private key of --certfile (default: in the certfile)",
        TLS,
        metavar="FILE",
    ),
    Option(
        "ca_certs",
        _path,
        "PEM file of the certificate authorities that client certificates must come from",
        TLS,
        metavar="FILE",
    ),
    Option(
        "cert_reqs",
        one_of(CERT_REQS),
        "ask clients for a certificate: 'none', 'optional' (checked if sent) or 'required' "
        "(needs --ca-certs)",
        TLS,
        default="none",
        choices=CERT_REQS,
    ),
    Option(
        "ssl_context",
        _ssl_context,
        "a ready ssl.SSLContext for every listen, instead of certfile and keyfile",
        TLS,
        scope="run",
        cli=False,
    ),
    Option(
        "proxy_headers",
        boolean,
        "for connections from --forwarded-allow-ips, take the client's address, scheme and "
        "host from X-Forwarded-For/-Proto/-Host or Forwarded (RFC 7239); from any other peer "
        "those headers are ignored",
        PROXY,
        kind="switch",
        default=True,
    ),
    Option(
        "forwarded_allow_ips",
        _peers,
        "the proxies whose forwarding headers are trusted: addresses or networks (CIDR), "
        "separated by commas, or '*' for any (Unix socket peers are always trusted)",
        PROXY,
        default=("127.0.0.1",),
        metavar="IPS",
        shown="127.0.0.1",
    ),
    Option(
        "graceful_timeout",
        seconds,
        "how long a stopping or reloaded worker may finish in-flight requests (streams "
        "included) before their handlers are cancelled; one deadline for the whole drain",
        SUPERVISION,
        default=30.0,
        metavar="SECONDS",
    ),
    Option(
        "cleanup_timeout",
        seconds,
        "how long on_cleanup/cleanup_ctx teardown may take after the graceful deadline; the "
        "primary kills a draining worker only after both",
        SUPERVISION,
        default=5.0,
        metavar="SECONDS",
    ),
    Option(
        "ws_grace",
        seconds,
        "how long a draining worker lets open websockets finish a message before it closes "
        "them with 1001 (going away)",
        SUPERVISION,
        default=1.0,
        metavar="SECONDS",
    ),
    Option(
        "timeout",
        seconds,
        "kill and replace a worker whose event loop is blocked this long; its stack is "
        "dumped to the log first (0 disables)",
        SUPERVISION,
        default=30.0,
        short="-t",
        metavar="SECONDS",
    ),
    Option(
        "max_requests",
        whole(0),
        "recycle a worker after about N requests (0 disables)",
        SUPERVISION,
        default=0,
        metavar="N",
    ),
    Option(
        "max_requests_jitter",
        whole(0),
        "add 0..J to each worker's --max-requests so they do not recycle together",
        SUPERVISION,
        default=0,
        metavar="J",
    ),
    Option(
        "max_memory",
        _memory,
        "recycle a worker whose resident memory exceeds SIZE, e.g. 512M or 2G (Linux; 0 disables)",
        SUPERVISION,
        default=0,
        metavar="SIZE",
    ),
    Option(
        "start",
        _start,
        "how workers start: 'fork' them from a zygote process that loaded APP once (fast, "
        "shares memory; Linux), or 'spawn' a fresh interpreter for each",
        SUPERVISION,
        choices=START_METHODS,
        shown="fork on Linux, spawn elsewhere; fork falls back to spawn, with a warning, where "
        "APP started threads at import",
    ),
    Option(
        "reload_batch",
        whole(1),
        "successors a rolling reload starts at once: as each one listens, its old worker "
        "drains and the next starts (never fewer than N workers serve)",
        SUPERVISION,
        default_factory=default_workers,
        shown="the CPUs usable here, {}",
        metavar="N",
    ),
    Option(
        "argv",
        _argv,
        "the command that starts a spawned worker (default: this program's own)",
        SUPERVISION,
        cli=False,
    ),
    Option(
        "config",
        _path,
        "read options from this TOML file (keys named as the options, e.g. workers = 4); "
        "without it, from [tool.aiocluster] in ./pyproject.toml if there is one. The command "
        "line and the environment win over the file",
        OPERATIONS,
        scope="command",
        short="-c",
        metavar="FILE",
    ),
    Option(
        "name",
        _cluster_name,
        "the cluster's name; picks the control socket that 'aiocluster status' and the "
        "other commands use",
        OPERATIONS,
        default_factory=default_name,
        short="-n",
        shown="the APP module, or the script's name",
    ),
    Option(
        "control",
        _text,
        "control socket path instead of the per-user one for --name; 'off' for none",
        OPERATIONS,
        metavar="PATH",
    ),
    Option(
        "admin",
        _address,
        "serve /healthz, /readyz and Prometheus /metrics here",
        OPERATIONS,
        metavar="HOST:PORT",
        shown="nowhere",
    ),
    Option(
        "log_level",
        _log_level,
        f"one of {', '.join(LOG_LEVELS)}",
        OPERATIONS,
        scope="run",
        default="info",
        metavar="LEVEL",
    ),
    Option(
        "access_log",
        boolean,
        "log every request (aiohttp apps)",
        OPERATIONS,
        scope="run",
        kind="flag",
        default=False,
    ),
    # -- privileges and the process, development (issue 18: items 4, 6, 7) --
    Option(
        "user",
        _account("user"),
        "run the zygote and the workers as this user (name or uid); the primary, started as "
        "root, binds the configured addresses and never runs the application",
        PROCESS,
        shown="the primary's",
    ),
    Option(
        "group",
        _account("group"),
        "run the zygote and the workers with this group (name or gid)",
        PROCESS,
        shown="--user's own group",
    ),
    Option(
        "umask",
        parse_umask,
        "the file mode creation mask of every process, in octal (e.g. 027)",
        PROCESS,
        metavar="MASK",
        shown="inherited",
    ),
    Option(
        "chdir",
        _text,
        "change to DIR before loading APP (the primary first; every process starts there)",
        PROCESS,
        metavar="DIR",
    ),
    Option(
        "pid",
        _text,
        "write the primary's pid to FILE once every worker listens; removed on exit; a "
        "FILE naming a live process refuses the start",
        PROCESS,
        metavar="FILE",
    ),
    Option(
        "reload",
        _reload,
        "development: a rolling reload whenever a watched source file changes "
        "(needs aiocluster[reload])",
        DEVELOPMENT,
        kind="flag",
        default=False,
    ),
    Option(
        "reload_dir",
        _text,
        "with --reload: watch DIR; repeat for several",
        DEVELOPMENT,
        kind="list",
        default=(),
        metavar="DIR",
        shown="the current directory",
    ),
    Option(
        "reload_include",
        _text,
        "with --reload: also watch files matching this glob pattern; repeat for several",
        DEVELOPMENT,
        kind="list",
        default=(),
        metavar="PATTERN",
        shown="*.py",
    ),
    Option(
        "reload_exclude",
        _text,
        "with --reload: ignore files and directories matching this glob pattern; repeat for "
        "several",
        DEVELOPMENT,
        kind="list",
        default=(),
        metavar="PATTERN",
        shown="hidden files, __pycache__, .git, .venv, editor backups",
    ),
)

_BY_NAME = {opt.name: opt for opt in OPTIONS}


def option(name: str) -> Option:
    """The option called ``name``."""
    return _BY_NAME[name]


# -- resolving: layers of values over the defaults ---------------------------------------------

Origin = Literal["argument", "command line", "environment", "config file", "default"]


@dataclass(frozen=True, slots=True)
class Layer:
    """Raw option values from one place, by option name (None: not given there).

    ``source`` names the place more closely where there are several: a config file's path.
    """

    origin: Origin
    values: Mapping[str, object]
    source: str | None = None

    def where(self, opt: Option, raw: object) -> str:
        """How an error names the value: ``AIOCLUSTER_X='v'``, ``--x v``, ``x='v'``, or
        ``FILE: x = 'v'``."""
        if self.origin == "environment":
            return f"{opt.env}={raw!r}"
        if self.origin == "command line":
            return f"{opt.flag} {raw}"
        if self.origin == "config file":
            return f"{self.source}: {opt.name} = {raw!r}"
        return f"{opt.name}={raw!r}"

    def described(self) -> str:
        """Where the layer's values come from, for ``--print-config``."""
        return f"{self.origin} {self.source}" if self.source else self.origin


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option's checked value, and the origin of each (``argument``, ``default``...)."""

    values: Mapping[str, Any]
    origins: Mapping[str, Origin]
    #: Where each value came from, in words (``config file ./aiocluster.toml``).
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def of(self, *scopes: Scope) -> dict[str, Any]:
        """The values of the options in ``scopes``, by name."""
        return {
            name: value for name, value in self.values.items() if _BY_NAME[name].scope in scopes
        }

    def replace(self, name: str, value: Any, origin: Origin, source: str) -> Settings:
        """These settings with ``name`` set to ``value`` (already checked), from ``source``."""
        return Settings(
            {**self.values, name: value},
            {**self.origins, name: origin},
            {**self.sources, name: source},
        )


def environment(environ: Mapping[str, str] | None = None) -> Layer:
    """The ``AIOCLUSTER_<NAME>`` variables set in ``environ`` (default: ``os.environ``).

    The one place option variables are read. An empty variable counts as unset.
    """
    env = os.environ if environ is None else environ
    return Layer(
        "environment",
        {opt.name: env[opt.env] for opt in OPTIONS if opt.env is not None and env.get(opt.env)},
    )


def config_file(path: str | None = None, environ: Mapping[str, str] | None = None) -> Layer:
    """The options of a config file: ``path``, else ``$AIOCLUSTER_CONFIG``, else
    ``[tool.aiocluster]`` in ``./pyproject.toml`` (none of them: an empty layer).

    Keys are option names (``graceful_timeout`` or ``graceful-timeout``), for every option of
    the command line. A key that is no option is a ConfigError naming the file and the key;
    a bad value is one when :func:`resolve` checks it.
    """
    env = os.environ if environ is None else environ
    table = read_table(path or env.get(option("config").env or "") or None)
    if table is None:
        return Layer("config file", {})
    accepted = [opt.name for opt in OPTIONS if opt.cli and opt.name != "config"]
    values: dict[str, object] = {}
    for key, value in table.values.items():
        name = key.replace("-", "_")
        if name in accepted:
            values[name] = value
            continue
        if name == "config":
            why = "a config file cannot name another one"
        elif name in _BY_NAME:
            why = f"{name!r} is a keyword of the Python API only (use bind)"
        else:
            near = _close_matches(name, accepted)
            hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
            why = f"unknown key {key!r}{hint} (the keys are the options of 'aiocluster run')"
        raise ConfigError(f"{table.path}: {why}")
    return Layer("config file", values, table.path)


def arguments(
    values: Mapping[str, object], scopes: Collection[Scope], origin: Origin = "argument"
) -> Layer:
    """``values`` as a layer; ConfigError naming any that is no option of ``scopes``."""
    accepted = [opt.name for opt in OPTIONS if opt.scope in scopes]
    problems = []
    for name in values:
        if name in accepted:
            continue
        known = _BY_NAME.get(name)
        if known is not None:
            problems.append(f"{name!r} is not accepted here: it is {_SCOPE_TEXT[known.scope]}")
            continue
        near = _close_matches(name, accepted)
        hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
        problems.append(f"unknown option {name!r}{hint}")
    if problems:
        raise ConfigError("; ".join(problems))
    return Layer(origin, values)


_SCOPE_TEXT: dict[Scope, str] = {
    "config": "a ClusterConfig option",
    "address": "a ClusterConfig option",
    "run": "an option of aiocluster.run() and the command line, not of ClusterConfig",
    "command": "a command-line option only",
}


def resolve(*layers: Layer, scopes: Collection[Scope] | None = None) -> Settings:
    """Each option's value from the first layer that gives it, else its default.

    Only options in ``scopes`` (default: all) are resolved. A bad value is a ConfigError
    that names where it came from, e.g. ``AIOCLUSTER_WORKERS='many': 'many' is not a whole
    number``.
    """
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        if scopes is not None and opt.scope not in scopes:
            continue
        for layer in layers:
            raw = layer.values.get(opt.name)
            if raw is None:
                continue
            try:
                values[opt.name] = opt.parse(raw)
            except ConfigError as err:
                raise ConfigError(f"{layer.where(opt, raw)}: {err}") from None
            origins[opt.name] = layer.origin
            sources[opt.name] = layer.described()
            break
        else:
            values[opt.name] = opt.default_value()
            origins[opt.name] = sources[opt.name] = "default"
    _check_exclusive(values, origins)
    return Settings(values, origins, sources)


def _check_exclusive(values: Mapping[str, Any], origins: Mapping[str, Origin]) -> None:
    on = [
        opt
        for opt in OPTIONS
        if opt.group.exclusive and opt.kind == "flag" and values.get(opt.name)
    ]
    for group in {opt.group for opt in on}:
        both = [opt for opt in on if opt.group == group]
        if len(both) > 1:
            where = ", ".join(_source(opt, origins[opt.name]) for opt in both)
            raise ConfigError(
                f"{' and '.join(opt.flag for opt in both)} exclude each other ({where})"
            )


def _source(opt: Option, origin: Origin) -> str:
    if origin == "environment":
        return f"{opt.env} is set"
    if origin == "config file":
        return f"{opt.name} = true in the config file"
    return f"{opt.flag} is given" if origin == "command line" else f"{opt.name}=True"


def run_settings(**given: object) -> Settings:
    """The run-level options (``no_uvloop``, ``access_log``, ``log_level``) for ``run()``.

    ``given`` (None: not given) wins over ``AIOCLUSTER_<NAME>``, which wins over the config
    file, which wins over the default.
    """
    scopes: tuple[Scope, ...] = ("run",)
    return resolve(arguments(given, scopes), environment(), config_file(), scopes=scopes)


def _close_matches(name: str, accepted: Iterable[str]) -> list[str]:
    # Imported here: difflib is needed only for a mistake, and costs every start ~3 ms.
    import difflib

    return difflib.get_close_matches(name, list(accepted), n=3)
