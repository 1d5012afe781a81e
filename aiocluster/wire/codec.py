"""Framing of the control channel between the primary and its workers.

A frame is a 5-byte header ``!IB`` (payload length, number of file descriptors
sent with the frame) followed by a UTF-8 JSON object. This module is pure: it
never closes, opens or inspects descriptors, it only keeps track of which frame
each one belongs to so that the caller can always close every one of them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from aiocluster._errors import ProtocolError

__all__ = [
    "HEADER",
    "MAX_FDS",
    "MAX_FRAME",
    "Decoder",
    "Frame",
    "Message",
    "Prepared",
    "encode",
]

HEADER = struct.Struct("!IB")
"""Frame header: payload length in bytes, number of descriptors sent with the frame."""

MAX_FRAME = 1 << 20
"""Default maximum payload size of one frame, in bytes."""

MAX_FDS = 16
"""Maximum number of descriptors one frame may carry."""

Message: TypeAlias = dict[str, Any]
"""A decoded control message: a JSON object with at least a string ``act``."""

_HEADER_SIZE = HEADER.size
# The length field is 32 bits wide, whatever limit the caller asks for.
_LENGTH_LIMIT = (1 << 32) - 1
_NFDS_LIMIT = (1 << 8) - 1


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded message and the descriptors that travelled with it.

    The receiver owns ``fds`` and must close each one it does not keep. ``truncated``: the
    frame announced descriptors, but the kernel could not pass them (``MSG_CTRUNC``: the
    receiver is out of descriptors); ``fds`` is then empty.
    """

    msg: Message
    fds: tuple[int, ...] = ()
    truncated: bool = False


class _Violation(Exception):
    """Internal: a protocol violation, turned into ProtocolError with every fd at the boundary."""


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True is not a sequence number.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(msg: Mapping[str, Any]) -> str | None:
    """Return why ``msg`` is not a valid message, or None if it is."""
    if not isinstance(msg.get("act"), str):
        return "message has no string 'act'"
    for key in ("seq", "ack"):
        if key in msg and not _is_int(msg[key]):
            return f"message field {key!r} is not an integer"
    return None


def encode(msg: Mapping[str, Any], nfds: int = 0, *, max_frame: int = MAX_FRAME) -> bytes:
    """Serialise ``msg`` into one frame announcing ``nfds`` descriptors.

    The caller sends the descriptors themselves (SCM_RIGHTS) with the first
    bytes of the returned frame, and with no other frame in the same sendmsg.

    Raises ValueError if ``msg`` is not a JSON-serialisable mapping with a
    string ``act`` (and integer ``seq``/``ack`` when present), if the payload
    exceeds ``max_frame`` bytes, or if ``nfds`` is not in ``0..MAX_FDS``.
    """
    if not _is_int(nfds) or not 0 <= nfds <= MAX_FDS:
        raise ValueError(f"nfds must be an integer in 0..{MAX_FDS}, got {nfds!r}")
    problem = _check_fields(msg)
    if problem is not None:
        raise ValueError(problem)
    try:
        text = json.dumps(dict(msg), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        # Lone surrogates survive json.dumps but cannot be encoded as UTF-8.
        payload = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"message is not JSON-serialisable: {exc}") from exc
    limit = min(max_frame, _LENGTH_LIMIT)
    if len(payload) > limit:
        raise ValueError(f"message payload is {len(payload)} bytes, more than the {limit} allowed")
    return HEADER.pack(len(payload), nfds) + payload


class Prepared:
    """A message encoded once, for frames sent many times that differ only by ``seq``/``ack``.

    The hot path of policy rr sends one ``newconn`` per batch of connections and gets one
    answer back: JSON-encoding the same few fields for each of them is most of what a frame
    costs to build. The message is checked and encoded here, once; :meth:`frame` then appends
    the numbers, byte-for-byte what :func:`encode` makes of the message with them.
    """

    __slots__ = ("_head", "msg")

    def __init__(self, msg: Mapping[str, Any]) -> None:
        """Raises ValueError as :func:`encode` does, and if ``msg`` has its own seq or ack."""
        if "seq" in msg or "ack" in msg:
            raise ValueError("a prepared message gets its seq and ack when it is sent")
        #: The message, as the receiver will decode it (less seq and ack).
        self.msg: Message = dict(msg)
        encoded = encode(self.msg)
        # Without the closing brace; it always has "act", so the next field follows a comma.
        self._head = encoded[_HEADER_SIZE:-1]

    def plus(self, name: str, value: float) -> Prepared:
        """This message with one more number field (a per-frame deadline), encoded on top.

        Raises ValueError for a field the message has, ``seq``/``ack``, or a value JSON has
        no number for.
        """
        if name in self.msg or name in ("seq", "ack"):
            raise ValueError(f"field {name!r} is taken")
        if not (isinstance(value, int | float) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        more = Prepared.__new__(Prepared)
        more.msg = {**self.msg, name: value}
        more._head = self._head + b",%s:%s" % (
            json.dumps(name).encode(),
            json.dumps(value).encode(),
        )
        return more

    def frame(self, seq: int, nfds: int = 0, ack: int | None = None) -> bytes:
        """The frame of this message with ``seq`` (and ``ack``), announcing ``nfds`` descriptors."""
        if not 0 <= nfds <= MAX_FDS:
            raise ValueError(f"nfds must be an integer in 0..{MAX_FDS}, got {nfds!r}")
        tail = b',"seq":%d}' % seq if ack is None else b',"ack":%d,"seq":%d}' % (ack, seq)
        payload = self._head + tail
        return HEADER.pack(len(payload), nfds) + payload


def _reject_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON, and encode() never produces them.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # A literal like 1e999 is valid JSON but parses as infinity, which encode() never sends
    # and which breaks whoever converts it (int(inf) raises): refuse it like NaN.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]!r} is out of range")
    return value


# One decoder for every frame: json.loads() with hooks builds a new one (and its scanner) per
# call, which was a visible part of decoding the primary's many small frames.
_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _parse(payload: bytes) -> Message:
    try:
        value = _JSON.decode(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert.
        raise _Violation(f"frame payload is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _Violation(f"frame payload is a JSON {type(value).__name__}, not an object")
    problem = _check_fields(value)
    if problem is not None:
        raise _Violation(problem)
    return value


class Decoder:
    """Incremental decoder of a byte stream with descriptors attached to chunks.

    Feed it each ``recvmsg()`` result as it arrives: the bytes and the
    descriptors received with them. Descriptors are attributed to the last
    frame that starts inside the chunk they came with. After a ProtocolError
    the decoder is broken and every later ``feed`` raises ProtocolError too.
    """

    __slots__ = ("_broken", "_buf", "_cut", "_fds", "_header", "_max_fds", "_max_frame")

    def __init__(self, *, max_frame: int = MAX_FRAME, max_fds: int = MAX_FDS) -> None:
        """Accept payloads up to ``max_frame`` bytes and up to ``max_fds`` descriptors a frame.

        ``max_fds=0`` means the peer may never send descriptors.
        """
        if not 0 <= max_frame <= _LENGTH_LIMIT:
            raise ValueError(f"max_frame must be in 0..{_LENGTH_LIMIT}, got {max_frame}")
        if not 0 <= max_fds <= _NFDS_LIMIT:
            raise ValueError(f"max_fds must be in 0..{_NFDS_LIMIT}, got {max_fds}")
        self._max_frame = max_frame
        self._max_fds = max_fds
        # Header bytes until the header is complete, then payload bytes.
        self._buf = bytearray()
        self._header: tuple[int, int] | None = None
        # Descriptors attributed to the incomplete frame in _buf.
        self._fds: list[int] = []
        # The incomplete frame's descriptors were truncated.
        self._cut = False
        self._broken = False

    @property
    def buffered(self) -> int:
        """Number of bytes held for the incomplete frame (header included)."""
        return len(self._buf) + (_HEADER_SIZE if self._header is not None else 0)

    def close(self) -> list[int]:
        """Stop decoding and hand back every descriptor still held; the caller closes them.

        Idempotent: a second call returns an empty list. Feeding afterwards
        raises ProtocolError (carrying the descriptors fed).
        """
        fds = self._fds
        self._reset()
        return fds

    def feed(self, data: bytes, fds: Sequence[int] = (), *, truncated: bool = False) -> list[Frame]:
        """Consume one received chunk and return the frames it completes.

        ``fds`` are the descriptors that arrived with ``data`` (in order). ``truncated``: the
        chunk came with ``MSG_CTRUNC`` and the caller closed what did arrive (pass no
        ``fds``); the frame they belonged to comes out with ``truncated`` set. On
        ProtocolError, ``err.fds`` holds every descriptor this decoder held or
        was given in this call, including those of frames completed earlier in
        the call, which are then not returned.
        """
        received = list(fds)
        if self._broken:
            raise ProtocolError("decoder is unusable after an earlier error or close()", received)
        held = self._fds
        try:
            return self._feed(data, received, truncated)
        except _Violation as exc:
            self._reset()
            raise ProtocolError(str(exc), held + received) from None

    def _reset(self) -> None:
        self._buf = bytearray()
        self._header = None
        self._fds = []
        self._cut = False
        self._broken = True

    def _feed(self, data: bytes, received: list[int], truncated: bool) -> list[Frame]:
        if truncated and received:
            raise _Violation("descriptors passed with a truncated chunk")
        if not data:
            if truncated:
                raise _Violation("descriptors truncated (MSG_CTRUNC) with no data")
            if received:
                raise _Violation("descriptors arrived with no data")
            return []
        view = memoryview(data)
        end = len(view)
        pos = 0
        # A frame already partly buffered started in an earlier chunk.
        starts_here = self._header is None and not self._buf
        # (announced nfds, payload, whether the frame started in this chunk)
        completed: list[tuple[int, bytes, bool]] = []
        while pos < end:
            if self._header is None:
                take = min(_HEADER_SIZE - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) < _HEADER_SIZE:
                    break
                length, nfds = HEADER.unpack(self._buf)
                # Checked before any payload byte is buffered, so a hostile
                # length can never make us hold more than max_frame bytes.
                if length > self._max_frame:
                    raise _Violation(
                        f"frame announces {length} bytes, more than the {self._max_frame} allowed"
                    )
                if nfds > self._max_fds:
                    raise _Violation(
                        f"frame announces {nfds} descriptors, more than the {self._max_fds} allowed"
                    )
                self._header = (length, nfds)
                self._buf = bytearray()
            length, nfds = self._header
            take = min(length - len(self._buf), end - pos)
            if not self._buf and take == length:
                payload = bytes(view[pos : pos + take])
                pos += take
            else:
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) < length:
                    break
                payload = bytes(self._buf)
            completed.append((nfds, payload, starts_here))
            self._header = None
            self._buf = bytearray()
            starts_here = True

        partial_starts_here = starts_here and (self._header is not None or bool(self._buf))
        attributed: list[list[int]] = [[] for _ in completed]
        cut = [False] * len(completed)
        if completed and not completed[0][2]:
            # The first completed frame is the one that was partly buffered.
            attributed[0] = self._fds
            cut[0] = self._cut
            self._fds = []
            self._cut = False
        if received or truncated:
            if partial_starts_here:
                self._fds = received
                self._cut = truncated
            else:
                last = max((i for i, c in enumerate(completed) if c[2]), default=None)
                if last is None:
                    raise _Violation("descriptors arrived in the middle of a frame")
                attributed[last] = received
                cut[last] = truncated

        frames: list[Frame] = []
        for (nfds, payload, _), frame_fds, lost in zip(completed, attributed, cut, strict=True):
            if lost:
                if not nfds:
                    raise _Violation(
                        "descriptors truncated (MSG_CTRUNC) with a frame that announces none"
                    )
                frames.append(Frame(_parse(payload), (), truncated=True))
                continue
            if len(frame_fds) != nfds:
                raise _Violation(
                    f"frame announces {nfds} descriptors but {len(frame_fds)} arrived with it"
                )
            frames.append(Frame(_parse(payload), tuple(frame_fds)))
        return frames
