"""The one configuration object, validated once, shared by the API and the CLI."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._address import DEFAULT_HOST, DEFAULT_PORT, Address, parse_bind
from ._errors import ConfigError
from ._policy import BALANCES, POLICIES, Balance, Policy, reuseport_problem

__all__ = ["DEFAULT_POLICY", "ENV_POLICY", "ClusterConfig", "default_workers"]

#: The scheduling policy when neither the call, the command line nor the environment names one.
#: ``shared`` costs nothing in the primary and is what the kernel does well for short requests;
#: see docs/policies.md for the trade-offs and measurements.
DEFAULT_POLICY: Policy = "shared"
#: Environment variable naming the policy when the API or CLI leaves it unset.
ENV_POLICY = "AIOCLUSTER_POLICY"


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
    #: Who accepts connections: every worker on one socket (``shared``), the primary
    #: (``rr``), or each worker on its slot's SO_REUSEPORT socket (``reuseport``).
    policy: Policy = DEFAULT_POLICY
    #: Under ``rr``: ``round-robin`` or ``least-conn`` (fewest open connections).
    balance: Balance = "round-robin"
    #: Under ``rr``: the same client address always reaches the same live worker.
    sticky: bool = False

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
        policy: str | None = None,
        balance: str | None = None,
        sticky: bool = False,
    ) -> ClusterConfig:
        """Validate the options users pass to ``serve``/``run``/the CLI.

        ``bind`` specs (``HOST:PORT`` or ``unix:PATH``) add to ``host``/``port`` and ``path``;
        with none of them the cluster listens on 127.0.0.1:8000. ``policy`` None means
        ``$AIOCLUSTER_POLICY``, else ``shared``.
        """
        if workers is None:
            workers = default_workers()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"workers must be a positive integer, not {workers!r}")
        if not isinstance(graceful_timeout, int | float) or graceful_timeout < 0:
            raise ConfigError(f"graceful_timeout must be >= 0 seconds, not {graceful_timeout!r}")
        if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 1:
            raise ConfigError(f"backlog must be a positive integer, not {backlog!r}")
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
        return cls(
            workers=workers,
            binds=tuple(binds),
            graceful_timeout=float(graceful_timeout),
            backlog=backlog,
            use_uvloop=use_uvloop,
            argv=tuple(argv) if argv is not None else None,
            policy=checked_policy,
            balance=checked_balance,
            sticky=bool(sticky),
        )


def _check_policy(policy: str | None, balance: str | None, sticky: bool) -> tuple[Policy, Balance]:
    source = "policy"
    if policy is None:
        policy = os.environ.get(ENV_POLICY) or DEFAULT_POLICY
        source = f"{ENV_POLICY} (from the environment)"
    for choice in POLICIES:
        if policy == choice:
            break
    else:
        raise ConfigError(f"{source} must be one of {', '.join(POLICIES)}, not {policy!r}")
    checked_balance: Balance = "round-robin"
    if balance is not None:
        for option in BALANCES:
            if balance == option:
                checked_balance = option
                break
        else:
            raise ConfigError(f"balance must be one of {', '.join(BALANCES)}, not {balance!r}")
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
