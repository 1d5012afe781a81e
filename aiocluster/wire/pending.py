"""A channel's requests awaiting the peer's reply, by seq: futures and reply callbacks.

:meth:`Channel.call`/:meth:`~Channel.request` wait on a future; :meth:`Channel.ask` passes
the reply to a callback as it is read. Either way a closing channel owes every request still
here its answer: the futures fail, the callbacks get None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiocluster._errors import ChannelClosed
from aiocluster.wire.codec import Frame
from aiocluster.wire.fds import close_fds

__all__ = ["OnReply", "Pending"]

log = logging.getLogger("aiocluster.channel")

#: Gets the reply to a request sent with :meth:`Channel.ask`, or None: the channel closed first.
OnReply = Callable[[Frame | None], None]


class Pending:
    """The requests of the channel ``name`` that have no reply yet."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._futures: dict[int, asyncio.Future[Frame]] = {}
        self._callbacks: dict[int, OnReply] = {}

    def __len__(self) -> int:
        return len(self._futures) + len(self._callbacks)

    def wait(self, seq: int, fut: asyncio.Future[Frame]) -> None:
        """The reply to ``seq`` resolves ``fut``."""
        self._futures[seq] = fut

    def call_back(self, seq: int, on_reply: OnReply) -> None:
        """The reply to ``seq`` goes to ``on_reply``."""
        self._callbacks[seq] = on_reply

    def forget(self, seq: int) -> None:
        """Nobody waits for the reply to ``seq`` any more (it was not sent, or timed out)."""
        self._futures.pop(seq, None)
        self._callbacks.pop(seq, None)

    def route(self, ack: int, frame: Frame) -> OnReply | None:
        """Settle request ``ack`` with ``frame``: its callback to call, or None if done here.

        A future gets the frame now; a reply nobody waits for (the request timed out) is
        dropped, its descriptors closed.
        """
        on_reply = self._callbacks.pop(ack, None)
        if on_reply is not None:
            return on_reply
        fut = self._futures.pop(ack, None)
        if fut is None or fut.done():
            close_fds(frame.fds)
            log.debug("%s: reply to unknown request %s dropped", self._name, ack)
        else:
            fut.set_result(frame)
        return None

    def fail_all(self, err: ChannelClosed, loop: asyncio.AbstractEventLoop | None) -> None:
        """The channel closed: every future fails with ``err``, every callback gets None."""
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(err)
                # Nobody may be awaiting this request any more; don't warn about it.
                fut.exception()
        self._futures.clear()
        callbacks, self._callbacks = self._callbacks, {}
        for on_reply in callbacks.values():
            # From the loop, not from here: close() may run inside the sender's own call.
            if loop is not None and not loop.is_closed():
                loop.call_soon(on_reply, None)
            else:
                on_reply(None)
