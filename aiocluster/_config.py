"""The one configuration object, validated once, shared by the API and the CLI."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from aiocluster._errors import ConfigError
from aiocluster.wire.address import DEFAULT_HOST, DEFAULT_PORT, Address, parse_bind

__all__ = [
    "BALANCES",
    "DEFAULT_POLICY",
    "ENV_POLICY",
    "ENV_START",
    "NAME_CHARS",
    "POLICIES",
    "START_METHODS",
    "Balance",
    "ClusterConfig",
    "Policy",
    "StartMethod",
    "default_start",
    "default_workers",
    "parse_size",
    "reuseport_problem",
]

Policy = Literal["shared", "rr", "reuseport"]
#: ``shared``: one listening socket, every worker accepts on it (Node's SCHED_NONE).
#: ``rr``: only the primary accepts, and hands each connection to one worker (SCHED_RR).
#: ``reuseport``: one SO_REUSEPORT socket per worker slot, kept by the primary (Linux).
POLICIES: tuple[Policy, ...] = ("shared", "rr", "reuseport")

Balance = Literal["round-robin", "least-conn"]
#: How the primary chooses a worker under ``rr`` (unless ``sticky`` chooses by client).
BALANCES: tuple[Balance, ...] = ("round-robin", "least-conn")

StartMethod = Literal["fork", "spawn"]
START_METHODS: tuple[StartMethod, ...] = ("fork", "spawn")

#: The scheduling policy when neither the call, the command line nor the environment names one.
#: ``shared`` costs nothing in the primary and is what the kernel does well for short requests;
#: see docs/policies.md for the trade-offs and measurements.
DEFAULT_POLICY: Policy = "shared"
#: Environment variable naming the policy when the API or CLI leaves it unset.
ENV_POLICY = "AIOCLUSTER_POLICY"
#: Environment variable naming the start method when the API or CLI leaves it unset.
ENV_START = "AIOCLUSTER_START"


def default_start() -> StartMethod:
    """``fork`` on Linux, ``spawn`` elsewhere (for programs entering through ``run()``)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def default_workers() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything the primary needs to run a cluster.

    Build it with :meth:`build`, which validates every value and says what is wrong.
    """

    workers: int
    binds: tuple[Address, ...]
    graceful_timeout: float = 30.0
    backlog: int = 2048
    use_uvloop: bool = True
    argv: tuple[str, ...] | None = field(default=None)
    #: Seconds without a heartbeat from a worker's event loop before it is killed (0: never).
    timeout: float = 30.0
    #: Requests after which a worker is recycled (0: never), plus up to ``max_requests_jitter``.
    max_requests: int = 0
    max_requests_jitter: int = 0
    #: Resident memory in bytes past which a worker is recycled (0: never; needs /proc).
    max_memory: int = 0
    #: Workers replaced at a time by a rolling reload.
    reload_batch: int = 1
    #: The cluster's name: it picks the default control socket (``aiocluster status --name``).
    name: str = "default"
    #: The control socket's path (None: the default for ``name``; ``"off"``: no control socket).
    control: str | None = None
    #: Where the primary serves /healthz, /readyz and /metrics (None: nowhere).
    admin: Address | None = None
    #: Who accepts connections: every worker on one socket (``shared``), the primary
    #: (``rr``), or each worker on its slot's SO_REUSEPORT socket (``reuseport``).
    policy: Policy = DEFAULT_POLICY
    #: Under ``rr``: ``round-robin`` or ``least-conn`` (fewest open connections).
    balance: Balance = "round-robin"
    #: Under ``rr``: the same client address always reaches the same live worker.
    sticky: bool = False
    #: How workers start: forked from a zygote that loaded the program once (``fork``, Linux),
    #: or as fresh interpreters (``spawn``). None: ``fork`` for programs that enter through
    #: ``aiocluster.run()`` or the CLI, on Linux; ``spawn`` otherwise.
    start: StartMethod | None = None

    @classmethod
    def build(
        cls,
        *,
        workers: int | None = None,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        bind: Sequence[str] | None = None,
        graceful_timeout: float = 30.0,
        backlog: int = 2048,
        use_uvloop: bool = True,
        argv: Sequence[str] | None = None,
        timeout: float = 30.0,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        max_memory: int | str = 0,
        reload_batch: int = 1,
        name: str = "default",
        control: str | None = None,
        admin: str | None = None,
        policy: str | None = None,
        balance: str | None = None,
        sticky: bool = False,
        start: str | None = None,
    ) -> ClusterConfig:
        """Validate the options users pass to ``serve``/``run``/the CLI.

        ``bind`` specs (``HOST:PORT`` or ``unix:PATH``) add to ``host``/``port`` and ``path``;
        with none of them the cluster listens on 127.0.0.1:8000. ``policy`` None means
        ``$AIOCLUSTER_POLICY``, else ``shared``; ``start`` None means ``$AIOCLUSTER_START``,
        else the default described at :attr:`start`.
        """
        if workers is None:
            workers = default_workers()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, not {workers!r}")
        if not isinstance(graceful_timeout, int | float) or graceful_timeout < 0:
            raise ConfigError(f"graceful_timeout must be >= 0 seconds, not {graceful_timeout!r}")
        _check_int("backlog", backlog, 1)
        _check_int("max_requests", max_requests, 0)
        _check_int("max_requests_jitter", max_requests_jitter, 0)
        _check_int("reload_batch", reload_batch, 1)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout >= 0:
            raise ConfigError(f"timeout must be >= 0 seconds (0 disables it), not {timeout!r}")
        memory = parse_size(max_memory)
        if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS:
            raise ConfigError(
                f"cluster name {name!r} may use only letters, digits, '.', '_' and '-'"
            )
        if control is not None and (not isinstance(control, str) or not control):
            raise ConfigError(f"control must be a socket path or 'off', not {control!r}")
        admin_address = parse_bind(admin) if admin else None
        if memory and not os.path.exists("/proc/self/statm"):
            raise ConfigError("max_memory needs /proc to read workers' memory (Linux only)")
        if isinstance(bind, str):
            bind = [bind]
        binds: list[Address] = [parse_bind(spec) for spec in bind or ()]
        if host is not None or port is not None:
            binds.insert(
                0, Address.tcp(host or DEFAULT_HOST, DEFAULT_PORT if port is None else port)
            )
        if path is not None:
            binds.append(Address.unix(path))
        if not binds:
            binds.append(Address.tcp(DEFAULT_HOST, DEFAULT_PORT))
        checked_policy, checked_balance = _check_policy(policy, balance, sticky)
        checked_start = _check_start(start)
        return cls(
            workers=workers,
            binds=tuple(binds),
            graceful_timeout=float(graceful_timeout),
            backlog=backlog,
            use_uvloop=use_uvloop,
            argv=tuple(argv) if argv is not None else None,
            timeout=float(timeout),
            max_requests=max_requests,
            max_requests_jitter=max_requests_jitter,
            max_memory=memory,
            reload_batch=reload_batch,
            name=name,
            control=control,
            admin=admin_address,
            policy=checked_policy,
            balance=checked_balance,
            sticky=bool(sticky),
            start=checked_start,
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, not {value!r}")


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``512M``, ``2G``, ``300000K`` (0 means no limit)."""
    if isinstance(value, bool):
        raise ConfigError(f"a memory size must be bytes or like 512M, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a memory size cannot be negative: {value}")
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in ("K", "M", "G") else ""
    number = text[: len(text) - len(unit)]
    try:
        amount = float(number)
    except ValueError:
        raise ConfigError(
            f"a memory size must be bytes or like 512M or 2G, not {value!r}"
        ) from None
    if not amount >= 0 or amount == float("inf"):
        raise ConfigError(f"a memory size must be a finite number >= 0, not {value!r}")
    return int(amount * _SIZE_UNITS[unit])


_Choice = TypeVar("_Choice", bound=str)


def _one_of(value: str, choices: tuple[_Choice, ...], source: str) -> _Choice:
    """``value`` as the choice it equals (typed as such), or a ConfigError naming ``source``."""
    for choice in choices:
        if value == choice:
            return choice
    raise ConfigError(f"{source} must be one of {', '.join(choices)}, not {value!r}")


def _check_start(start: str | None) -> StartMethod | None:
    source = "start"
    if start is None:
        start = os.environ.get(ENV_START) or None
        if start is None:
            return None
        source = f"{ENV_START} (from the environment)"
    method = _one_of(start, START_METHODS, source)
    if method == "fork" and not sys.platform.startswith("linux"):
        raise ConfigError(
            f"{source} 'fork' needs Linux (forking without exec is unsafe on {sys.platform}); "
            "use 'spawn'"
        )
    return method


def _check_policy(policy: str | None, balance: str | None, sticky: bool) -> tuple[Policy, Balance]:
    source = "policy"
    if policy is None:
        policy = os.environ.get(ENV_POLICY) or DEFAULT_POLICY
        source = f"{ENV_POLICY} (from the environment)"
    choice = _one_of(policy, POLICIES, source)
    checked_balance: Balance = "round-robin"
    if balance is not None:
        checked_balance = _one_of(balance, BALANCES, "balance")
    if choice != "rr" and (checked_balance != "round-robin" or sticky):
        what = "sticky" if sticky else f"balance {checked_balance!r}"
        raise ConfigError(
            f"{what} needs policy 'rr' (it is {choice!r}): only a primary that accepts the "
            "connections can choose the worker for each one"
        )
    if sticky and checked_balance != "round-robin":
        raise ConfigError(
            "sticky chooses the worker from the client address; it cannot be combined with "
            f"balance {checked_balance!r}"
        )
    if choice == "reuseport":
        problem = reuseport_problem(has_option=hasattr(socket, "SO_REUSEPORT"))
        if problem is not None:
            raise ConfigError(
                f"policy 'reuseport' is not available: {problem}; use 'shared' or 'rr'"
            )
    return choice, checked_balance


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
