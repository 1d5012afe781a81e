"""The small error hierarchy users of aiocluster see."""

from __future__ import annotations


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


#: The exit status of a worker or zygote that found an :class:`AppLoadError` (gunicorn's
#: APP_LOAD_ERROR): the primary halts on it rather than retry.
APP_ERROR_STATUS = 4


class NotInCluster(AioclusterError):
    """A worker-only function was called in a process that is not a cluster worker."""
