"""The state an upgrading primary hands to its own new image: a versioned JSON document (pure).

``aiocluster upgrade`` (and SIGUSR2) re-executes the primary in place: same pid, same workers,
same sockets (see :mod:`aiocluster.primary.upgrade` for the I/O). Everything the new image needs
to carry on travels in one :class:`UpgradeState`: the configuration as the option table renders
it, the handle table with descriptor numbers, each worker's id, slot, pid, channel descriptor
and counters, the supervisor's history, the zygote, the control and admin sockets, the systemd
notify socket, and the primary's original start time. This module only turns it into bytes and
back, and refuses anything it cannot trust: another format, a future version, a field of the
wrong type. No I/O, so it is tested alone (tests/test_upgrade_state.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiocluster._config import ClusterConfig
from aiocluster._errors import AioclusterError, ConfigError
from aiocluster._options import option
from aiocluster.wire.address import Address, parse_bind

__all__ = [
    "FORMAT",
    "VERSION",
    "BadState",
    "ChannelRecord",
    "HandleRecord",
    "UpgradeState",
    "WorkerRecord",
    "dump",
    "load",
    "load_config",
    "render_config",
]

#: What the document says it is.
FORMAT = "aiocluster-upgrade-state"
#: The version this code writes and reads; a document of another version is refused.
VERSION = 1

#: The largest document read (a cluster at its limits: 256 handles, a few hundred workers).
MAX_SIZE = 16 * 1024 * 1024

T = TypeVar("T")


class BadState(AioclusterError):
    """The upgrade state cannot be read: not ours, a version this code does not know, or
    malformed. The upgrade is refused (pre-flight) or the new image stops (after the exec)."""


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """A channel socket handed over: its descriptor and the last seq this end used."""

    fd: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class HandleRecord:
    """One listening socket of the handle table."""

    address: Address
    index: int
    slot: int
    fd: int
    id: int
    #: The Unix socket file the primary created, and its inode (None: not ours to remove).
    unix_inode: tuple[str, int] | None = None
    #: Worker ids holding it.
    holders: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One live worker, as the primary sees it."""

    id: int
    slot: int
    pid: int
    channel: ChannelRecord
    #: Seconds it had been running when the state was written.
    age: float
    listening: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)
    accepted: int = 0
    request_limit: int = 0
    #: Policy rr: the listens (handle ids) it was serving, so the balancer hands it connections.
    groups: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class UpgradeState:
    """Everything the new image of the primary rebuilds itself from."""

    #: The aiocluster version that wrote it (the old code), and the upgrade's number (1, 2, …).
    written_by: str
    upgrades: int
    #: The primary's arguments (``sys.orig_argv``-like) and its configuration, rendered.
    argv: tuple[str, ...]
    config: dict[str, Any]
    #: Wall-clock seconds (epoch) when the primary first started, before any upgrade.
    started: float
    size: int
    next_worker_id: int
    reloads: int
    binds: tuple[Address, ...]
    handles: tuple[HandleRecord, ...]
    #: (address, index) -> listen id, for every listen ever made (ids are never reused).
    listen_ids: tuple[tuple[Address, int, int], ...]
    #: (address, index) kept open for the cluster's life.
    pinned: tuple[tuple[Address, int], ...]
    workers: tuple[WorkerRecord, ...]
    start_method: str
    #: The zygote (start method fork): its pid and channel; None: none running.
    zygote_pid: int | None = None
    zygote_channel: ChannelRecord | None = None
    #: Supervision: boot failures in a row, crash streaks and restarts per slot.
    boot_failures: int = 0
    streaks: dict[int, int] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    #: Counts of exited workers per slot (the monotonic totals), and rr's accepted per worker.
    retired: dict[int, dict[str, int]] = field(default_factory=dict)
    accepted: dict[int, int] = field(default_factory=dict)
    served: bool = True
    #: The control socket (listening descriptor, path, inode); None: ``--control off``.
    control_fd: int | None = None
    control_path: str | None = None
    control_inode: int | None = None
    #: The admin endpoint's listening descriptor; None: no ``--admin``.
    admin_fd: int | None = None
    #: ``$NOTIFY_SOCKET`` (removed from the environment at start): where READY=1 goes.
    notify_socket: str | None = None
    pidfile_written: bool = False
    #: The control connection that asked for the upgrade: the new image answers it.
    reply_fd: int | None = None
    #: Then run the rolling reload (``aiocluster upgrade --workers``).
    then_reload: bool = False

    def fds(self) -> list[int]:
        """Every descriptor the document names: exactly those the exec must keep open."""
        found = [h.fd for h in self.handles] + [w.channel.fd for w in self.workers]
        extra = [
            self.zygote_channel.fd if self.zygote_channel else None,
            self.control_fd,
            self.admin_fd,
            self.reply_fd,
        ]
        return found + [fd for fd in extra if fd is not None]


# -- the configuration ---------------------------------------------------------------------


def render_config(config: ClusterConfig) -> dict[str, Any]:
    """``config`` as JSON values: addresses as their bind specs, tuples as lists."""
    rendered: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        rendered[f.name] = _plain(getattr(config, f.name))
    return rendered


def load_config(rendered: dict[str, Any]) -> tuple[ClusterConfig, list[str]]:
    """The config a rendered one describes, every value checked by this code's option table.

    Returns it and the names this code does not know (an option the new code dropped: not
    fatal, listed so that it can be logged). An option the document lacks (one the new code
    added) takes its default. Raises :class:`BadState` for a value the table refuses.
    """
    fields = {f.name for f in dataclasses.fields(ClusterConfig)}
    values: dict[str, Any] = {}
    unknown = sorted(set(rendered) - fields)
    try:
        for name in fields:
            if name == "binds":
                values[name] = tuple(parse_bind(_str(spec)) for spec in rendered.get(name, []))
                continue
            opt = option(name)
            if name not in rendered:
                values[name] = opt.default_value()
            elif rendered[name] is None:
                values[name] = None
            else:
                values[name] = opt.parse(rendered[name])
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise BadState(f"the configuration in the upgrade state is not valid here: {err}") from None
    return ClusterConfig(**values), unknown


def _plain(value: Any) -> Any:
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# -- dump / load ---------------------------------------------------------------------------


def dump(state: UpgradeState) -> bytes:
    """The document, as UTF-8 JSON bytes."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    for f in dataclasses.fields(state):
        doc[f.name] = _to_json(getattr(state, f.name))
    doc["listen_ids"] = [
        {"address": a.to_wire(), "index": i, "id": n} for a, i, n in state.listen_ids
    ]
    doc["pinned"] = [{"address": a.to_wire(), "index": i} for a, i in state.pinned]
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _to_json(value: Any) -> Any:
    if isinstance(value, Address):
        return value.to_wire()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def load(data: bytes) -> UpgradeState:
    """Parse and check a document; :class:`BadState` with one line saying what is wrong."""
    if len(data) > MAX_SIZE:
        raise BadState(f"the upgrade state is {len(data)} bytes, more than {MAX_SIZE}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise BadState(f"the upgrade state is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadState("this is not an aiocluster upgrade state")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadState(f"the upgrade state has no valid version: {version!r:.40}")
    if version != VERSION:
        newer = "newer" if version > VERSION else "older"
        raise BadState(
            f"the upgrade state is version {version}, {newer} than this code's {VERSION}: "
            "this aiocluster cannot take over from that one (upgrade by a restart instead)"
        )
    try:
        return _state(doc)
    except (BadState, ConfigError) as err:
        raise BadState(f"bad upgrade state: {err}") from None


def _state(doc: dict[str, Any]) -> UpgradeState:
    zygote = doc.get("zygote_channel")
    return UpgradeState(
        written_by=_get(doc, "written_by", str),
        upgrades=_count(_get(doc, "upgrades", int)),
        argv=tuple(_str(a) for a in _get(doc, "argv", list)),
        config=_get(doc, "config", dict),
        started=float(_number(_get(doc, "started", (int, float)))),
        size=_count(_get(doc, "size", int), minimum=1),
        next_worker_id=_count(_get(doc, "next_worker_id", int), minimum=1),
        reloads=_count(_get(doc, "reloads", int)),
        binds=tuple(Address.from_wire(a) for a in _get(doc, "binds", list)),
        handles=tuple(_handle(_dict(h)) for h in _get(doc, "handles", list)),
        listen_ids=tuple(_listen_id(_dict(x)) for x in _get(doc, "listen_ids", list)),
        pinned=tuple(_pinned(_dict(x)) for x in _get(doc, "pinned", list)),
        workers=tuple(_worker(_dict(w)) for w in _get(doc, "workers", list)),
        start_method=_choice(_get(doc, "start_method", str), ("fork", "spawn")),
        zygote_pid=_optional_int(doc, "zygote_pid"),
        zygote_channel=None if zygote is None else _channel(_dict(zygote)),
        boot_failures=_count(_get(doc, "boot_failures", int)),
        streaks=_int_map(_get(doc, "streaks", dict)),
        restarts=_int_map(_get(doc, "restarts", dict)),
        retired={
            _key(k): {str(n): _count(_int(v)) for n, v in _dict(counts).items()}
            for k, counts in _get(doc, "retired", dict).items()
        },
        accepted=_int_map(_get(doc, "accepted", dict)),
        served=_get(doc, "served", bool),
        control_fd=_optional_fd(doc, "control_fd"),
        control_path=_optional_str(doc, "control_path"),
        control_inode=_optional_int(doc, "control_inode"),
        admin_fd=_optional_fd(doc, "admin_fd"),
        notify_socket=_optional_str(doc, "notify_socket"),
        pidfile_written=_get(doc, "pidfile_written", bool),
        reply_fd=_optional_fd(doc, "reply_fd"),
        then_reload=_get(doc, "then_reload", bool),
    )


def _handle(doc: dict[str, Any]) -> HandleRecord:
    unix = doc.get("unix_inode")
    unix_inode = None
    if unix is not None:
        if not isinstance(unix, list) or len(unix) != 2:
            raise BadState(f"handle unix_inode must be [path, inode], not {unix!r:.60}")
        unix_inode = (_str(unix[0]), _count(_int(unix[1])))
    return HandleRecord(
        address=Address.from_wire(doc.get("address")),
        index=_count(_get(doc, "index", int)),
        slot=_count(_get(doc, "slot", int)),
        fd=_fd(_get(doc, "fd", int)),
        id=_count(_get(doc, "id", int), minimum=1),
        unix_inode=unix_inode,
        holders=tuple(_count(_int(h)) for h in _get(doc, "holders", list)),
    )


def _listen_id(doc: dict[str, Any]) -> tuple[Address, int, int]:
    return (
        Address.from_wire(doc.get("address")),
        _count(_get(doc, "index", int)),
        _count(_get(doc, "id", int), minimum=1),
    )


def _pinned(doc: dict[str, Any]) -> tuple[Address, int]:
    return Address.from_wire(doc.get("address")), _count(_get(doc, "index", int))


def _worker(doc: dict[str, Any]) -> WorkerRecord:
    stats = _get(doc, "stats", dict)
    return WorkerRecord(
        id=_count(_get(doc, "id", int), minimum=1),
        slot=_count(_get(doc, "slot", int), minimum=1),
        pid=_count(_get(doc, "pid", int), minimum=1),
        channel=_channel(_dict(doc.get("channel"))),
        age=float(_number(_get(doc, "age", (int, float)))),
        listening=tuple(_str(a) for a in _get(doc, "listening", list)),
        stats={str(k): float(_number(v)) for k, v in stats.items()},
        accepted=_count(_get(doc, "accepted", int)),
        request_limit=_count(_get(doc, "request_limit", int)),
        groups=tuple(_count(_int(g), minimum=1) for g in _get(doc, "groups", list)),
    )


def _channel(doc: dict[str, Any]) -> ChannelRecord:
    return ChannelRecord(fd=_fd(_get(doc, "fd", int)), last_seq=_count(_get(doc, "last_seq", int)))


# -- field checks ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(doc: dict[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    if key not in doc:
        raise BadState(f"field {key!r} is missing")
    value = doc[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadState(f"field {key!r} must be {kinds[0].__name__}, not bool")
    if not isinstance(value, kinds):
        raise BadState(f"field {key!r} must be {kinds[0].__name__}, not {type(value).__name__}")
    return value  # type: ignore[return-value]


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadState(f"expected an object, not {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise BadState(f"expected a string, not {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not _is_int(value):
        raise BadState(f"expected an integer, not {value!r:.40}")
    return value  # type: ignore[return-value]


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadState(f"expected a number >= 0, not {value!r:.40}")
    return value


def _count(value: int, *, minimum: int = 0) -> int:
    if value < minimum:
        raise BadState(f"expected an integer >= {minimum}, not {value}")
    return value


def _fd(value: int) -> int:
    # 0-2 are stdio: never one of ours to hand over.
    if value < 3:
        raise BadState(f"descriptor {value} cannot be handed over")
    return value


def _key(text: str) -> int:
    try:
        return _count(int(text))
    except ValueError:
        raise BadState(f"expected a number as key, not {text!r:.40}") from None


def _int_map(doc: dict[str, Any]) -> dict[int, int]:
    return {_key(k): _count(_int(v)) for k, v in doc.items()}


def _choice(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise BadState(f"expected one of {', '.join(choices)}, not {value!r:.40}")
    return value


def _optional_int(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return None if value is None else _count(_int(value), minimum=1)


def _optional_fd(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return None if value is None else _fd(_int(value))


def _optional_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return None if value is None else _str(value)
