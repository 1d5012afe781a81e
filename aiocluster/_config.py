"""The one configuration object, validated once, shared by the API and the CLI.

Its options are declared in :mod:`aiocluster._options`; this module adds what concerns several
options at once (the listen addresses, the policy's companions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiocluster._errors import ConfigError
from aiocluster._options import (
    BALANCES,
    DEFAULT_POLICY,
    NAME_CHARS,
    POLICIES,
    START_METHODS,
    Balance,
    CertReqs,
    Policy,
    Scope,
    Settings,
    StartMethod,
    arguments,
    config_file,
    default_start,
    default_workers,
    environment,
    parse_size,
    resolve,
    reuseport_problem,
)
from aiocluster.wire.address import DEFAULT_HOST, DEFAULT_PORT, Address

# The vocabulary lives with the option table; it is re-exported here, where the primary's
# modules have always imported it from.
__all__ = [
    "BALANCES",
    "DEFAULT_POLICY",
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

#: The option scopes ``ClusterConfig.build()`` takes as keywords.
BUILD_SCOPES: tuple[Scope, ...] = ("config", "address")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Everything the primary needs to run a cluster.

    Build it with :meth:`build`, which validates every value and says what is wrong. The fields
    are the ``config`` options of :data:`aiocluster._options.OPTIONS` (defaults and help there),
    plus ``binds``; tests/test_options.py checks that the two agree.
    """

    workers: int
    #: Where to listen: ``bind``, ``host``/``port`` and ``path`` together.
    binds: tuple[Address, ...]
    #: Seconds a drain may spend on in-flight work; then cleanup gets ``cleanup_timeout`` more.
    graceful_timeout: float
    cleanup_timeout: float
    #: Seconds open websockets get in a drain before they are closed with 1001.
    ws_grace: float
    backlog: int
    argv: tuple[str, ...] | None
    #: Seconds without a heartbeat from a worker's event loop before it is killed (0: never).
    timeout: float
    #: Requests after which a worker is recycled (0: never), plus up to ``max_requests_jitter``.
    max_requests: int
    max_requests_jitter: int
    #: Resident memory in bytes past which a worker is recycled (0: never; needs /proc).
    max_memory: int
    #: Successors a rolling reload starts at a time (a sliding window; default: the CPUs).
    reload_batch: int
    #: The cluster's name: it picks the default control socket (``aiocluster status --name``).
    name: str
    #: The control socket's path (None: the default for ``name``; ``"off"``: no control socket).
    control: str | None
    #: Where the primary serves /healthz, /readyz and /metrics (None: nowhere).
    admin: Address | None
    #: Who accepts connections: every worker on one socket (``shared``), the primary
    #: (``rr``), or each worker on its slot's SO_REUSEPORT socket (``reuseport``).
    policy: Policy
    #: Under ``rr``: ``round-robin`` or ``least-conn`` (fewest open connections).
    balance: Balance
    #: Under ``rr``: the same client address always reaches the same live worker.
    sticky: bool
    #: How workers start: forked from a zygote that loaded the program once (``fork``, Linux),
    #: or as fresh interpreters (``spawn``). None: ``fork`` for programs that enter through
    #: ``aiocluster.run()`` or the CLI, on Linux; ``spawn`` otherwise.
    start: StartMethod | None
    #: TLS: the certificate chain and its key (None: plain TCP), read by each worker at start.
    certfile: str | None
    keyfile: str | None
    #: TLS: the authorities client certificates must come from, and whether clients need one.
    ca_certs: str | None
    cert_reqs: CertReqs
    #: aiohttp apps: take the client's address, scheme and host from forwarding headers, when
    #: the peer is one of ``forwarded_allow_ips`` (networks, or ``*``).
    proxy_headers: bool
    forwarded_allow_ips: tuple[str, ...]
    #: The user and group the zygote and the workers run as (None: the primary's).
    user: str | None
    group: str | None
    #: The umask of every process (None: inherited); ``chdir``: where every process runs.
    umask: int | None
    chdir: str | None
    #: The primary's pid file, written once every worker listens (None: none).
    pid: str | None
    #: Development: a rolling reload when a watched file changes, and what is watched.
    reload: bool
    reload_dir: tuple[str, ...]
    reload_include: tuple[str, ...]
    reload_exclude: tuple[str, ...]
    #: HTTP (aiohttp apps): seconds a connection may go without a complete request, and the
    #: request line, header count and header field limits.
    keep_alive: float
    limit_request_line: int
    limit_request_fields: int
    limit_request_field_size: int

    @classmethod
    def build(cls, **options: object) -> ClusterConfig:
        """Validate the options users pass to ``serve``/``run``/``supervise``.

        Each keyword is an option of :data:`aiocluster._options.OPTIONS` (README.md lists
        them); one left out or None comes from ``AIOCLUSTER_<NAME>`` if set, else its default.
        An unknown keyword is a :class:`ConfigError` naming it and the options it is close to.

        ``bind`` specs (``HOST:PORT`` or ``unix:PATH``) add to ``host``/``port`` and ``path``;
        with none of them the cluster listens on 127.0.0.1:8000.
        """
        layer = arguments(options, BUILD_SCOPES)
        return cls.from_settings(resolve(layer, environment(), config_file(), scopes=BUILD_SCOPES))

    @classmethod
    def from_settings(cls, settings: Settings) -> ClusterConfig:
        """The config from resolved options (the command line resolves its own first)."""
        policy: Policy = settings["policy"]
        balance: Balance = settings["balance"]
        sticky: bool = settings["sticky"]
        if policy != "rr" and (balance != "round-robin" or sticky):
            what = "sticky" if sticky else f"balance {balance!r}"
            raise ConfigError(
                f"{what} needs policy 'rr' (it is {policy!r}): only a primary that accepts the "
                "connections can choose the worker for each one"
            )
        if sticky and balance != "round-robin":
            raise ConfigError(
                "sticky chooses the worker from the client address; it cannot be combined with "
                f"balance {balance!r}"
            )
        if settings["certfile"] is None:
            needs = [name for name in ("keyfile", "ca_certs") if settings[name] is not None]
            if settings["cert_reqs"] != "none":
                needs.append("cert_reqs")
            if needs:
                raise ConfigError(f"{' and '.join(needs)} need certfile (the server's certificate)")
        if settings["cert_reqs"] != "none" and settings["ca_certs"] is None:
            raise ConfigError(
                f"cert_reqs {settings['cert_reqs']!r} needs ca_certs: the authorities that client "
                "certificates are checked against"
            )
        fields: dict[str, Any] = settings.of("config")
        return cls(binds=_binds(settings), **fields)


def _binds(settings: Settings) -> tuple[Address, ...]:
    binds = list(settings["bind"])
    host, port, path = settings["host"], settings["port"], settings["path"]
    # Addresses given in the call replace $AIOCLUSTER_BIND rather than add to it: an explicit
    # argument wins over the environment, for the set of addresses as for any option.
    if settings.origins["bind"] == "environment" and (host, port, path) != (None, None, None):
        binds = []
    if host is not None or port is not None:
        binds.insert(0, Address.tcp(host or DEFAULT_HOST, DEFAULT_PORT if port is None else port))
    if path is not None:
        binds.append(Address.unix(path))
    return tuple(binds) or (Address.tcp(DEFAULT_HOST, DEFAULT_PORT),)
