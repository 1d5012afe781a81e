"""The control channel: framed JSON messages and SCM_RIGHTS descriptors over an AF_UNIX socket.

Asyncio transports cannot carry ancillary data, so the channel drives a non-blocking socket
itself with ``loop.add_reader``/``add_writer`` and ``sendmsg``/``recvmsg``. Framing and
descriptor attribution live in the pure :mod:`aiocluster.wire.codec`; this module only moves bytes.
What waits to be sent is :mod:`aiocluster.wire.outbox`'s; requests awaiting their reply are
:mod:`aiocluster.wire.pending`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from aiocluster._errors import ChannelClosed, ProtocolError
from aiocluster.wire.codec import MAX_FDS, Decoder, Frame, Prepared, encode
from aiocluster.wire.fds import ancillary_space, close_fds, received_fds
from aiocluster.wire.outbox import Outbox, PeerNotReading
from aiocluster.wire.pending import OnReply, Pending

__all__ = ["Channel", "OnReply", "PeerNotReading", "channel_pair"]

log = logging.getLogger("aiocluster.channel")

# Under glibc's mmap threshold (128 KiB): recvmsg allocates its buffer at this size before it
# shrinks it to what came, and a 256 KiB one cost an mmap, an mremap and a munmap per read
# (strace of the rr primary: three of its nine system calls per handed connection).
_READ_SIZE = 64 * 1024
# Reads per readiness callback: enough to drain a burst, bounded so one chatty peer cannot
# starve the rest of the primary's loop.
_READS_PER_WAKEUP = 16
# A plain int: socket.MSG_CTRUNC is an IntFlag, whose & runs in Python on every read.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# recvmsg flag that makes received descriptors close-on-exec atomically (Linux, BSDs).
_CLOEXEC_FLAG: int = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

Handler = Callable[[Frame], None]


class Channel:
    """One end of a private control channel.

    ``handler`` receives every frame that is not a reply to one of our requests, and owns the
    descriptors in ``frame.fds``. A handler that raises :class:`ProtocolError` (or anything
    else) closes the channel: a peer that breaks the protocol is cut off, never trusted again.

    ``on_close`` is called once, with :attr:`close_reason`, when the channel closes.

    ``max_fds`` is how many descriptors one frame from the peer may carry; 0 means the peer may
    never send any (the primary's view of a worker). ``max_buffer`` bounds the bytes, and
    ``max_queued_fds`` the descriptors (our duplicates), queued for a peer that stops reading;
    past either the channel closes (:class:`PeerNotReading`) rather than grow without limit.

    ``truncatable``: the acts of requests whose descriptors may come truncated (we are out of
    descriptors) and still reach ``handler``, with ``frame.truncated`` set; any other truncated
    frame is a protocol error.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        name: str,
        max_fds: int = MAX_FDS,
        max_buffer: int = 8 * 1024 * 1024,
        max_queued_fds: int = 256,
        on_close: Callable[[BaseException | None], None] | None = None,
        truncatable: Collection[str] = (),
        last_seq: int = 0,
    ) -> None:
        """``last_seq``: the last seq this end used before (a channel re-attached after the
        primary's in-place upgrade continues the numbering, so the peer's late replies to
        requests of the old image are never mistaken for answers to new ones)."""
        sock.setblocking(False)
        self._truncatable = frozenset(truncatable)
        self._sock = sock
        self._fd = sock.fileno()
        self._handler = handler
        self._on_close = on_close
        self.name = name
        self._max_fds = max_fds
        self._decoder = Decoder(max_fds=max_fds)
        self._ancbuf = ancillary_space(max_fds)
        self._outbox = Outbox(
            sock,
            name=name,
            max_buffer=max_buffer,
            max_queued_fds=max_queued_fds,
            fail=self.close,
        )
        self._seq = itertools.count(last_seq + 1)
        self._last_seq = last_seq
        self._pending = Pending(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._close_reason: BaseException | None = None
        self._closed_event = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin reading; must be called from the loop that will own the channel."""
        self._loop = asyncio.get_running_loop()
        self._outbox.start(self._loop)
        self._loop.add_reader(self._fd, self._on_readable)

    def pause(self) -> None:
        """Stop reading: what the peer sends waits in the kernel's socket buffer."""
        if self._loop is not None and not self._closed:
            self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        """Read again after :meth:`pause`."""
        if self._loop is not None and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)

    def idle(self) -> bool:
        """True when nothing of this channel lives only in this process: no partial frame
        read, nothing waiting to be sent, no request awaiting its reply."""
        return (
            not self._closed
            and self._decoder.buffered == 0
            and self._outbox.empty()
            and not self._pending
        )

    @property
    def last_seq(self) -> int:
        """The last seq this end used (for a re-attached channel's ``last_seq``)."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        """True once the channel is closed, for whatever reason."""
        return self._closed

    def fileno(self) -> int:
        """The channel socket's descriptor (-1 once closed); the channel keeps owning it."""
        return self._sock.fileno()

    @property
    def close_reason(self) -> BaseException | None:
        """Why the channel closed: None for a local close, else the error or EOF that did it."""
        return self._close_reason

    async def wait_closed(self) -> None:
        """Wait until the channel is closed."""
        await self._closed_event.wait()

    def close(self, reason: BaseException | None = None) -> None:
        """Close the channel, release every descriptor it holds, and fail pending requests.

        Idempotent: only the first call's ``reason`` is kept.
        """
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._outbox.close()
        close_fds(self._decoder.close())
        self._sock.close()
        err = (
            reason
            if isinstance(reason, ChannelClosed)
            else ChannelClosed(f"channel {self.name} closed" + (f": {reason}" if reason else ""))
        )
        self._pending.fail_all(err, self._loop)
        self._closed_event.set()
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:
                log.exception("%s: close callback failed", self.name)

    # -- sending -----------------------------------------------------------------------------

    def send(self, msg: Mapping[str, Any] | Prepared, fds: Sequence[int] = ()) -> int:
        """Send ``msg`` (and ``fds``) to the peer without blocking; return its seq.

        The caller keeps ownership of ``fds``: what cannot go out at once is queued with
        duplicates, which the channel closes once sent. Raises :class:`ChannelClosed` if the
        channel is closed, or closes because the peer stopped reading.
        """
        seq = self._next_seq()
        self._outbox.put(_encode(msg, seq, len(fds)), fds)
        return seq

    def reply(
        self, request: Frame, msg: Mapping[str, Any] | Prepared, fds: Sequence[int] = ()
    ) -> None:
        """Send ``msg`` as the answer to ``request``; a closed channel drops it silently.

        A :class:`Prepared` answer carries its own ``act`` (the request's, by convention).
        """
        if self._closed:
            return
        ack = request.msg.get("seq", 0)
        seq = self._next_seq()
        if isinstance(msg, Prepared):
            data = msg.frame(seq, len(fds), ack)
        else:
            out = {**msg, "act": request.msg["act"], "ack": ack, "seq": seq}
            data = encode(out, len(fds))
        with contextlib.suppress(ChannelClosed):
            self._outbox.put(data, fds)

    def call(self, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> asyncio.Future[Frame]:
        """Send ``msg`` and return the future of the peer's reply, without waiting for it.

        The future fails with :class:`ChannelClosed` if the channel closes before the reply
        arrives; the caller must not cancel it (a reply then arriving is dropped, its
        descriptors closed).
        """
        return self._call(msg, fds)[1]

    def ask(self, msg: Mapping[str, Any] | Prepared, fds: Sequence[int], on_reply: OnReply) -> int:
        """Send ``msg``; ``on_reply`` gets the peer's reply, or None if the channel closes first.

        For many requests in flight at once, each without a future or a task: the reply is
        passed on as it is read, with no extra turn of the loop. ``on_reply`` owns the reply's
        descriptors. It is called exactly once, and never from within this call: a channel
        that closes (even while sending this) calls it soon after, from the loop. Returns the
        request's seq. Raises :class:`ChannelClosed` if the channel was closed already, and
        ``OSError`` if ``fds`` holds a bad descriptor or could not be duplicated to queue it
        (nothing was sent); then ``on_reply`` is never called.
        """
        seq = self._next_seq()
        data = _encode(msg, seq, len(fds))
        # Registered before the send: a send that fails closes the channel, which then owes
        # this request its answer like any other in flight.
        self._pending.call_back(seq, on_reply)
        try:
            self._outbox.put(data, fds)
        except ChannelClosed:
            pass  # this very frame overflowed a peer that stopped reading: on_reply gets None
        except BaseException:
            self._pending.forget(seq)
            raise
        return seq

    def _call(
        self, msg: Mapping[str, Any], fds: Sequence[int]
    ) -> tuple[int, asyncio.Future[Frame]]:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Frame] = loop.create_future()
        seq = self._next_seq()
        data = _encode(msg, seq, len(fds))
        # Registered before the send, for the same reason as in ask().
        self._pending.wait(seq, fut)
        try:
            self._outbox.put(data, fds)
        except BaseException:
            self._pending.forget(seq)
            raise
        return seq, fut

    async def request(
        self, msg: Mapping[str, Any], fds: Sequence[int] = (), timeout: float | None = None
    ) -> Frame:
        """Send ``msg`` and wait for the peer's reply (the frame whose ``ack`` is our seq)."""
        seq, fut = self._call(msg, fds)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pending.forget(seq)

    def _next_seq(self) -> int:
        if self._closed:
            raise ChannelClosed(f"channel {self.name} is closed")
        seq = next(self._seq)
        self._last_seq = seq
        return seq

    # -- receiving ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            if self._closed:
                return
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    _READ_SIZE, self._ancbuf, _CLOEXEC_FLAG
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.close(ChannelClosed(f"channel {self.name}: receive failed: {err}"))
                return
            fds = received_fds(ancdata)
            truncated = bool(flags & _MSG_CTRUNC)
            if truncated:
                # Out of descriptors here: what did arrive is no use without the rest.
                close_fds(fds)
                fds = []
            if not data and not fds and not truncated:
                self.close(ChannelClosed(f"channel {self.name}: peer closed the channel"))
                return
            if not _CLOEXEC_FLAG:
                for fd in fds:
                    os.set_inheritable(fd, False)
            try:
                frames = self._decoder.feed(data, fds, truncated=truncated)
            except ProtocolError as err:
                close_fds(err.fds)
                self._protocol_error(err)
                return
            for i, frame in enumerate(frames):
                if self._closed:
                    for rest in frames[i:]:
                        close_fds(rest.fds)
                    return
                self._dispatch(frame)
            if len(data) < _READ_SIZE and not fds:
                # Drained (a read stops short only at the end of what is there, or at a frame
                # with descriptors): don't pay a recvmsg and an exception to hear EAGAIN. More
                # bytes wake us again.
                return

    def _dispatch(self, frame: Frame) -> None:
        if frame.truncated and (
            frame.msg.get("ack") is not None or frame.msg["act"] not in self._truncatable
        ):
            self._protocol_error(ProtocolError("descriptors truncated (MSG_CTRUNC)"))
            return
        ack = frame.msg.get("ack")
        if ack is not None:
            if not 0 < ack <= self._last_seq:
                close_fds(frame.fds)
                self._protocol_error(ProtocolError(f"reply to {ack}, a request never sent"))
                return
            on_reply = self._pending.route(ack, frame)
            if on_reply is not None:
                self._answer(on_reply, frame)
            return
        try:
            self._handler(frame)
        except ProtocolError as err:
            self._protocol_error(err)
        except Exception as err:
            log.exception("%s: handler failed on %r", self.name, frame.msg.get("act"))
            self.close(err)

    def _answer(self, on_reply: OnReply, frame: Frame) -> None:
        try:
            on_reply(frame)
        except ProtocolError as err:  # the reply itself was malformed
            self._protocol_error(err)
        except Exception as err:
            log.exception("%s: reply callback failed on %r", self.name, frame.msg.get("act"))
            self.close(err)

    def _protocol_error(self, err: ProtocolError) -> None:
        log.error("%s: protocol error, closing the channel: %s", self.name, err)
        self.close(err)


def _encode(msg: Mapping[str, Any] | Prepared, seq: int, nfds: int) -> bytes:
    if isinstance(msg, Prepared):
        return msg.frame(seq, nfds)
    return encode({**msg, "seq": seq}, nfds)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A fresh unnamed AF_UNIX stream pair: (parent end, child end), both non-inheritable.

    Pass the child end with ``pass_fds``, which makes it inheritable in that child only: were it
    inheritable here, a worker spawned meanwhile by a loop without ``close_fds`` (uvloop) would
    inherit another worker's channel.
    """
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
