"""The process options: whom the zygote and the workers run as, their umask and directory.

The primary starts as whoever started it — root, to bind port 80 — and stays so: it only binds
and supervises, and never runs the application. Under ``--user``/``--group`` everything that
runs the application does so as that account:

- a zygote forked from the primary (start method ``fork``) drops to it before it loads APP;
- every process the primary spawns (a worker under ``spawn``, a reload's new zygote) switches
  in the child between fork and exec, so the interpreter never runs as root at all;
- a worker forked by the zygote inherits the zygote's identity.

``--chdir`` and ``--umask`` are applied once, in the primary, before anything is started: every
other process inherits them.

Nothing here loads the rest of aiocluster: the zygote uses it before it loads the application.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass

from aiocluster._config import ClusterConfig
from aiocluster._errors import ConfigError

__all__ = [
    "Account",
    "account",
    "apply_process_settings",
    "drop_privileges",
    "own_process_group",
    "prepare_child",
    "switch_in_child",
]


@dataclass(frozen=True, slots=True)
class Account:
    """Who the application runs as: a uid, a gid and the supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    #: How logs and errors name it: ``nobody`` or ``uid 1234``, and the group.
    name: str

    def is_current(self) -> bool:
        """True if this process already runs as this account (nothing to switch)."""
        return (os.geteuid(), os.getegid()) == (self.uid, self.gid) and (
            os.getuid(),
            os.getgid(),
        ) == (self.uid, self.gid)


def account(user: str | None, group: str | None) -> Account | None:
    """The account ``--user``/``--group`` name, or None if neither is given.

    The group defaults to the user's own, and the supplementary groups are the user's (as
    ``initgroups`` sets them); only ``--group`` keeps this process's uid. Raises ConfigError
    for a name this system does not know.
    """
    if user is None and group is None:
        return None
    import grp
    import pwd

    uid, gid, login = os.getuid(), os.getgid(), None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ConfigError(f"--user {user}: no such user on this system") from None
            if group is None:
                raise ConfigError(
                    f"--user {user}: uid without a passwd entry; give --group"
                ) from None
            uid = int(user)
        else:
            uid, gid, login = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--group {group}: no such group on this system") from None
    groups = tuple(os.getgrouplist(login, gid)) if login is not None else (gid,)
    who = login or f"uid {uid}"
    return Account(uid, gid, groups, f"{who} (gid {gid})")


def apply_process_settings(config: ClusterConfig) -> ClusterConfig:
    """In the primary, before it starts anything: check ``--user``, apply ``--umask`` and
    ``--chdir``. Returns the config with ``chdir`` made absolute, so applying it again (the
    command line, then ``run()``, then ``supervise()``) changes nothing.
    """
    who = account(config.user, config.group)
    if who is not None and not who.is_current() and os.geteuid() != 0:
        raise ConfigError(
            f"--user/--group {who.name}: the primary must start as root to switch the workers "
            f"to another user (it runs as uid {os.geteuid()})"
        )
    if who is not None and who.uid != 0:
        problem = _unreachable(who)
        if problem is not None:
            raise ConfigError(f"--user/--group {who.name}: {problem}")
    if config.umask is not None:
        os.umask(config.umask)
    if config.chdir is None:
        return config
    directory = os.path.abspath(config.chdir)
    try:
        os.chdir(directory)
    except OSError as err:
        raise ConfigError(f"--chdir {config.chdir}: {err.strerror or err}") from None
    return dataclasses.replace(config, chdir=directory)


def _unreachable(who: Account) -> str | None:
    """Why ``who`` could not run this Python and aiocluster, or None if it can.

    Checked from the mode bits of every directory on the way (ACLs are not read), so that an
    interpreter under a private home (``/root/.pyenv``) is one clear error at start rather
    than workers that cannot exec or import.
    """
    import aiocluster

    needs = {
        os.path.realpath(sys.executable): "run the interpreter",
        os.path.dirname(os.__file__): "read the standard library",
        os.path.dirname(os.path.dirname(os.path.abspath(aiocluster.__file__))): "import aiocluster",
    }
    for path, what in needs.items():
        parts = path.split(os.sep)
        for depth in range(2, len(parts) + 1):
            step = os.sep.join(parts[:depth]) or os.sep
            try:
                st = os.stat(step)
            except OSError:
                break
            need = 0o1 if stat.S_ISDIR(st.st_mode) or depth == len(parts) else 0
            if need and not _permits(st, who, need):
                return (
                    f"that user cannot {what}: {step} (mode {stat.S_IMODE(st.st_mode):o}, "
                    f"uid {st.st_uid}) is closed to it; install Python where it can be read"
                )
    return None


def _permits(st: os.stat_result, who: Account, bit: int) -> bool:
    if st.st_uid == who.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in who.groups or st.st_gid == who.gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def drop_privileges(who: Account | None) -> None:
    """Become ``who`` for good (groups, then gid, then uid: the order that cannot fail
    half-way once root is given up). Nothing to do if this process already is ``who``."""
    if who is None or who.is_current():
        return
    os.setgroups(list(who.groups))
    os.setgid(who.gid)
    os.setuid(who.uid)
    if os.geteuid() != who.uid or (who.uid != 0 and _can_regain_root()):
        raise OSError(f"could not drop privileges to {who.name}")


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def switch_in_child(who: Account | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a process spawned as ``who`` (None: no switch needed).

    Both asyncio's and uvloop's subprocess support ``preexec_fn`` (uvloop has no ``user=``);
    it runs in the child between fork and exec and makes only the three system calls.
    """
    if who is None or who.is_current():
        return None

    def switch() -> None:
        os.setgroups(list(who.groups))
        os.setgid(who.gid)
        os.setuid(who.uid)

    return switch


def own_process_group() -> None:
    """Put this process (a zygote, a worker) in a process group of its own, in its parent's
    session.

    A terminal's Ctrl-C (SIGINT to its foreground group) then reaches only the primary, which
    drains the workers in order. Not a session of its own (``setsid``): with autogroup
    scheduling every session weighs as much as any other, so N workers in N sessions would
    crowd out a load balancer or proxy on the same machine that has one (measured: a
    co-located ``wrk`` got less CPU, and a connection per request ran at 0.80 of uvicorn instead
    of 0.95). A background group of the terminal's session is stopped by SIGTTOU when it
    writes to the terminal under ``stty tostop`` (SIGTTIN when it reads): both are ignored,
    so a worker's log lines go out and a read fails instead.
    """
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)


def prepare_child(who: Account | None) -> Callable[[], None]:
    """The ``preexec_fn`` of every process the primary spawns: :func:`own_process_group`, then
    the switch to ``who`` (see :func:`switch_in_child`).

    The ignored signals survive the exec, so they hold from the interpreter's first write (a
    reload's zygote importing the application, say); uvloop's subprocess has no
    ``process_group=``, hence ``setpgid`` here.
    """
    switch = switch_in_child(who)

    def prepare() -> None:
        own_process_group()
        if switch is not None:
            switch()

    return prepare
