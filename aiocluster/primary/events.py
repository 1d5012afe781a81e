"""The cluster's events (Node's names) and the callbacks users register for them."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from aiocluster._errors import ConfigError

__all__ = ["EVENTS", "Callback", "Event", "Events"]

log = logging.getLogger("aiocluster.primary")

Event = Literal["fork", "online", "listening", "disconnect", "exit", "message"]
EVENTS: tuple[Event, ...] = ("fork", "online", "listening", "disconnect", "exit", "message")

Callback = Callable[..., Any]


class Events:
    """Callbacks by event; a failing callback is logged and never stops the cluster.

    ``background(coro)`` runs what a coroutine callback returns, or returns False when
    nothing can run it any more (the cluster has stopped): the coroutine is then closed.
    """

    def __init__(self, background: Callable[[Coroutine[Any, Any, None]], bool]) -> None:
        self._background = background
        self._callbacks: dict[Event, list[Callback]] = {e: [] for e in EVENTS}

    def on(self, event: Event, callback: Callback) -> None:
        """Call ``callback`` on every ``event``."""
        if event not in self._callbacks:
            raise ConfigError(f"unknown cluster event {event!r}; expected one of {EVENTS}")
        self._callbacks[event].append(callback)

    def emit(self, event: Event, *args: Any) -> None:
        """Call every callback of ``event`` with ``args``."""
        for callback in self._callbacks[event]:
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    guarded = _guard(event, result)
                    if not self._background(guarded):
                        guarded.close()
                        close = getattr(result, "close", None)
                        if close is not None:
                            close()
            except Exception:
                log.exception("%r callback %r failed", event, callback)


async def _guard(event: str, awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("%r callback failed", event)
