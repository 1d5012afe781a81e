"""The small error hierarchy users of aiocluster see."""

from __future__ import annotations

from dataclasses import dataclass


class AioclusterError(Exception):
    """Base class of every error aiocluster raises itself."""


class ChannelClosed(AioclusterError):
    """The control channel to the peer process is closed (the peer exited or was cut off)."""


class ProtocolError(AioclusterError):
    """The peer sent bytes that are not a valid aiocluster frame.

    ``fds`` lists file descriptors the decoder had received and that now belong
    to nobody: whoever catches the error must close them.
    """

    def __init__(self, message: str, fds: list[int] | None = None) -> None:
        super().__init__(message)
        self.fds: list[int] = fds if fds is not None else []


class ConfigError(AioclusterError, ValueError):
    """An option, argument or application spec is invalid; the message says which and why."""


class AppLoadError(ConfigError):
    """The application cannot be loaded, or is not of the kind asked for.

    Retrying cannot fix it (the module does not import, the attribute is missing, a factory
    returns something else): the process that finds it says so once and exits with
    :data:`APP_ERROR_STATUS`, and the primary stops the cluster instead of restarting it.
    """


@dataclass(frozen=True, slots=True)
class AppErrorReport:
    """What a worker or the zygote found wrong with the application, for the primary to say."""

    #: One line: what is wrong and what to do.
    error: str
    #: The application's own traceback, when it raised (may be empty).
    traceback: str = ""

    def text(self) -> str:
        """The report as the user reads it: the traceback, then ``aiocluster: error: ...``."""
        return f"{self.traceback}aiocluster: error: {self.error}\n"


#: The exit status of a worker or zygote that found an :class:`AppLoadError` (gunicorn's
#: APP_LOAD_ERROR): the primary halts on it rather than retry.
APP_ERROR_STATUS = 4


class ClusterFailed(AioclusterError):
    """The cluster stopped because it could not run: a bind error, a worker that cannot boot.

    ``status`` is the exit status ``aiocluster.run()`` ends with: 2 when the application cannot
    be loaded (nothing a restart could fix), else 1.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class NotInCluster(AioclusterError):
    """A worker-only function was called in a process that is not a cluster worker."""


class ListenRefused(OSError):
    """A listen the primary refused, raised in the worker that asked (the primary logs why).

    What is raised is also the ``OSError`` subclass its errno maps to, as a failed ``bind``
    raises (a ``PermissionError`` for EACCES, say): see :func:`listen_refused`.
    """


# One class per OSError subclass, made once: ListenRefused and, say, PermissionError.
_REFUSED: dict[type[OSError], type[ListenRefused]] = {}


def listen_refused(code: int, text: str) -> ListenRefused:
    """The error for a listen the primary refused with ``code`` (an errno) and ``text``."""
    base = type(OSError(code, text))  # the subclass that OSError() maps the errno to
    if base is OSError:
        return ListenRefused(code, text)
    kind = _REFUSED.get(base)
    if kind is None:
        kind = _REFUSED[base] = type("ListenRefused", (ListenRefused, base), {})
    return kind(code, text)
