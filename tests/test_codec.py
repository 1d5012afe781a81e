"""Tests of the control-channel framing (aiocluster.wire.codec)."""

from __future__ import annotations

import itertools
import json
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiocluster._errors import ProtocolError
from aiocluster.wire.codec import (
    HEADER,
    MAX_FDS,
    MAX_FRAME,
    Decoder,
    Frame,
    Message,
    Prepared,
    encode,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw(payload: bytes, nfds: int = 0, length: int | None = None) -> bytes:
    """A frame with an arbitrary payload, bypassing encode()'s checks."""
    return HEADER.pack(len(payload) if length is None else length, nfds) + payload


def raw_json(value: Any, nfds: int = 0) -> bytes:
    return raw(json.dumps(value).encode(), nfds)


def msgs(frames: Iterable[Frame]) -> list[Message]:
    return [f.msg for f in frames]


def feed_bytewise(dec: Decoder, data: bytes) -> list[Frame]:
    out: list[Frame] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    return out


def expect_error(dec: Decoder, data: bytes, fds: Sequence[int] = ()) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        dec.feed(data, fds)
    return info.value


# --- encode -------------------------------------------------------------------------------------


def test_encode_layout() -> None:
    frame = encode({"act": "hi", "x": "é", "seq": 3}, 2)
    payload = '{"act":"hi","x":"é","seq":3}'.encode()
    assert frame == struct.pack("!IB", len(payload), 2) + payload


def test_encode_accepts_any_mapping() -> None:
    frame = encode(MappingProxyType({"act": "a"}))
    assert Decoder().feed(frame) == [Frame({"act": "a"})]


def test_encode_at_exact_max_frame() -> None:
    msg = {"act": "x" * 10}
    size = len(json.dumps(msg, separators=(",", ":")))
    assert len(encode(msg, max_frame=size)) == size + HEADER.size
    with pytest.raises(ValueError, match="more than"):
        encode(msg, max_frame=size - 1)


@pytest.mark.parametrize(
    ("msg", "nfds", "why"),
    [
        ({"act": "a", "x": {1, 2}}, 0, "not JSON-serialisable"),
        ({"act": "a", "x": object()}, 0, "not JSON-serialisable"),
        ({"act": "a", "x": float("nan")}, 0, "not JSON-serialisable"),
        ({"act": "a", "x": float("inf")}, 0, "not JSON-serialisable"),
        ({"act": "a", "x": "\ud800"}, 0, "not JSON-serialisable"),
        ({"act": "a", "x": "y" * MAX_FRAME}, 0, "more than"),
        ({"x": 1}, 0, "no string 'act'"),
        ({"act": 1}, 0, "no string 'act'"),
        ({"act": None}, 0, "no string 'act'"),
        ({"act": "a", "seq": True}, 0, "'seq' is not an integer"),
        ({"act": "a", "seq": "1"}, 0, "'seq' is not an integer"),
        ({"act": "a", "ack": 1.0}, 0, "'ack' is not an integer"),
        ({"act": "a"}, -1, "nfds"),
        ({"act": "a"}, MAX_FDS + 1, "nfds"),
        ({"act": "a"}, True, "nfds"),
    ],
)
def test_encode_rejects(msg: dict[str, Any], nfds: int, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        encode(msg, nfds)
    assert not isinstance(info.value, ProtocolError)


def test_encode_rejects_deep_nesting() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode({"act": "a", "x": deep})


def test_decoder_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Decoder(max_frame=-1)
    with pytest.raises(ValueError, match="max_fds"):
        Decoder(max_fds=-1)
    with pytest.raises(ValueError, match="max_fds"):
        Decoder(max_fds=256)


# --- prepared messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "nfds", "ack"), [(1, 0, None), (7, 3, None), (2**40, MAX_FDS, 5), (9, 0, 0)]
)
def test_prepared_frame_is_what_encode_makes(seq: int, nfds: int, ack: int | None) -> None:
    msg = {"act": "newconn", "handle": 3, "accepted": True, "x": "é"}
    full = {**msg, **({} if ack is None else {"ack": ack}), "seq": seq}
    assert Prepared(msg).frame(seq, nfds, ack) == encode(full, nfds)
    assert Decoder().feed(Prepared(msg).frame(seq, 0, ack)) == [Frame(full)]


def test_prepared_plus_a_number_is_what_encode_makes() -> None:
    base = Prepared({"act": "newconn", "handle": 3})
    stamped = base.plus("until", 12345.678)
    full = {"act": "newconn", "handle": 3, "until": 12345.678, "seq": 4}
    assert stamped.frame(4, 2) == encode(full, 2)
    assert stamped.msg == {"act": "newconn", "handle": 3, "until": 12345.678}
    assert base.msg == {"act": "newconn", "handle": 3}  # the original is unchanged
    for name, value in [("handle", 1.0), ("seq", 1.0), ("x", float("nan")), ("x", "1")]:
        with pytest.raises(ValueError, match=r"is taken|finite number"):
            base.plus(name, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        ({"act": "a", "seq": 1}, "gets its seq"),
        ({"act": "a", "ack": 1}, "gets its seq"),
        ({"x": 1}, "no string 'act'"),
        ({"act": "a", "x": object()}, "not JSON-serialisable"),
    ],
)
def test_prepared_rejects(msg: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Prepared(msg)


def test_prepared_frame_checks_nfds() -> None:
    with pytest.raises(ValueError, match="nfds"):
        Prepared({"act": "a"}).frame(1, MAX_FDS + 1)


# --- decoding without descriptors ---------------------------------------------------------------


def test_round_trip() -> None:
    msg = {"act": "listen", "seq": 1, "ack": -5, "addr": ["::1", 8080], "x": None, "é": 1.5}
    assert Decoder().feed(encode(msg)) == [Frame(msg)]


def test_empty_feed() -> None:
    dec = Decoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_bytewise_delivery() -> None:
    sent = [{"act": "a", "seq": i, "pad": "z" * i} for i in range(5)]
    data = b"".join(encode(m) for m in sent)
    dec = Decoder()
    assert msgs(feed_bytewise(dec, data)) == sent
    assert dec.buffered == 0
    assert dec.close() == []


def test_many_frames_in_one_chunk() -> None:
    sent = [{"act": str(i)} for i in range(100)]
    dec = Decoder()
    frames = dec.feed(b"".join(encode(m) for m in sent))
    assert msgs(frames) == sent
    assert all(f.fds == () for f in frames)


def test_partial_frame_is_buffered() -> None:
    frame = encode({"act": "a"})
    dec = Decoder()
    assert dec.feed(frame + frame[:3]) == [Frame({"act": "a"})]
    assert dec.buffered == 3
    assert dec.feed(frame[3:7]) == []
    assert dec.buffered == 7
    assert dec.feed(frame[7:]) == [Frame({"act": "a"})]
    assert dec.buffered == 0


def test_buffered_never_exceeds_max_frame_plus_header() -> None:
    limit = 300
    msg = {"act": "x" * (limit - len('{"act":""}'))}
    frame = encode(msg, max_frame=limit)
    assert len(frame) == limit + HEADER.size
    dec = Decoder(max_frame=limit)
    peak = 0
    out: list[Frame] = []
    for i in range(len(frame)):
        out += dec.feed(frame[i : i + 1])
        peak = max(peak, dec.buffered)
    assert out == [Frame(msg)]
    assert peak == limit + HEADER.size - 1
    assert dec.buffered == 0


# --- descriptor attribution ---------------------------------------------------------------------


def test_fds_with_their_frame() -> None:
    dec = Decoder()
    assert dec.feed(encode({"act": "a"}, 2), [100, 101]) == [Frame({"act": "a"}, (100, 101))]


def test_fds_after_glued_tail_of_previous_frame() -> None:
    first, second = encode({"act": "first"}), encode({"act": "second"}, 1)
    dec = Decoder()
    assert dec.feed(first[:6]) == []
    frames = dec.feed(first[6:] + second, [100])
    assert frames == [Frame({"act": "first"}), Frame({"act": "second"}, (100,))]


def test_fds_go_to_last_frame_starting_in_chunk() -> None:
    plain = encode({"act": "plain"})
    carrier = encode({"act": "carrier"}, 2)
    dec = Decoder()
    frames = dec.feed(plain + plain + carrier, [100, 101])
    assert [f.fds for f in frames] == [(), (), (100, 101)]


def test_fds_held_until_frame_completes_in_later_feed() -> None:
    frame = encode({"act": "later", "pad": "p" * 50}, 2)
    dec = Decoder()
    assert dec.feed(frame[:20], [100, 101]) == []
    assert dec.buffered == 20
    assert dec.feed(frame[20:40]) == []
    assert dec.feed(frame[40:]) == [Frame({"act": "later", "pad": "p" * 50}, (100, 101))]
    assert dec.close() == []


def test_fds_for_frame_whose_header_is_split() -> None:
    plain = encode({"act": "plain"})
    carrier = encode({"act": "carrier"}, 1)
    dec = Decoder()
    # The carrier's first two header bytes come glued after a whole frame.
    assert dec.feed(plain + carrier[:2], [100]) == [Frame({"act": "plain"})]
    assert dec.feed(carrier[2:]) == [Frame({"act": "carrier"}, (100,))]


def test_consecutive_fd_frames() -> None:
    a, b = encode({"act": "a"}, 1), encode({"act": "b"}, 2)
    dec = Decoder()
    assert dec.feed(a[:3], [100]) == []
    # Linux may return the tail of ``a`` with the start of ``b`` and b's descriptors.
    assert dec.feed(a[3:] + b[:1], [101, 102]) == [Frame({"act": "a"}, (100,))]
    assert dec.feed(b[1:]) == [Frame({"act": "b"}, (101, 102))]


def test_zero_length_payload_frame_is_a_frame() -> None:
    # An empty payload is invalid JSON, but the frame boundary is still counted.
    dec = Decoder()
    err = expect_error(dec, raw(b""), [100])
    assert err.fds == [100]


# --- protocol errors ----------------------------------------------------------------------------


def test_huge_length_rejected_after_header_only() -> None:
    dec = Decoder()
    header = struct.pack("!IB", 0xFFFFFFFF, 0)
    for i in range(4):
        assert dec.feed(header[i : i + 1]) == []
    err = expect_error(dec, header[4:], [100])
    assert err.fds == [100]
    assert dec.buffered == 0


def test_oversize_frame_just_above_limit() -> None:
    dec = Decoder(max_frame=12)
    assert dec.feed(raw(b'{"act":"ok"}')) == [Frame({"act": "ok"})]
    err = expect_error(dec, raw(b"", length=13))
    assert err.fds == []


def test_oversize_after_completed_fd_frame_loses_nothing() -> None:
    dec = Decoder(max_frame=100)
    good = encode({"act": "good"}, 1)
    dec.feed(good[:4], [100])
    err = expect_error(dec, good[4:] + raw(b"", length=101), [])
    assert err.fds == [100]


def test_too_many_fds_announced() -> None:
    dec = Decoder(max_fds=2)
    err = expect_error(dec, raw_json({"act": "a"}, nfds=3), [100, 101, 102])
    assert err.fds == [100, 101, 102]


def test_max_fds_zero_refuses_any_descriptor() -> None:
    dec = Decoder(max_fds=0)
    assert dec.feed(encode({"act": "a"})) == [Frame({"act": "a"})]
    err = expect_error(dec, encode({"act": "a"}, 1)[:5])
    assert err.fds == []


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe{}",
        b'{"act":"\xc3"}',
        b"",
        b"{",
        b'{"act":"a"} x',
        b"[1, 2]",
        b'"act"',
        b"null",
        b"{}",
        b'{"act": 1}',
        b'{"act": null}',
        b'{"act": "a", "seq": "1"}',
        b'{"act": "a", "seq": true}',
        b'{"act": "a", "ack": 1.5}',
        b'{"act": "a", "ack": false}',
        b'{"act": "a", "x": NaN}',
        b'{"act": "a", "x": -Infinity}',
        b'{"act": "a", "x": ' + b"9" * 5000 + b"}",
        b'{"act": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"\xef\xbb\xbf" + b'{"act": "a"}',
    ],
)
def test_bad_payload(payload: bytes) -> None:
    dec = Decoder(max_frame=len(payload) + 10)
    dec.feed(encode({"act": "before"}, 1)[:3], [100])
    err = expect_error(dec, encode({"act": "before"}, 1)[3:] + raw(payload, 2), [101, 102])
    assert err.fds == [100, 101, 102]


def test_fds_in_the_middle_of_a_frame() -> None:
    frame = encode({"act": "a", "pad": "x" * 20})
    dec = Decoder()
    dec.feed(frame[:10])
    err = expect_error(dec, frame[10:20], [100])
    assert err.fds == [100]


def test_fds_with_tail_only_of_fd_frame() -> None:
    frame = encode({"act": "a", "pad": "x" * 20}, 1)
    dec = Decoder()
    dec.feed(frame[:10], [100])
    # The chunk ends exactly at a frame boundary: no frame starts inside it.
    err = expect_error(dec, frame[10:], [101])
    assert err.fds == [100, 101]


def test_announced_fds_missing() -> None:
    dec = Decoder()
    err = expect_error(dec, encode({"act": "a"}, 2))
    assert err.fds == []


def test_announced_fds_missing_detected_on_completion() -> None:
    frame = encode({"act": "a"}, 2)
    dec = Decoder()
    assert dec.feed(frame[:8]) == []
    err = expect_error(dec, frame[8:])
    assert err.fds == []


def test_fewer_fds_than_announced() -> None:
    dec = Decoder()
    err = expect_error(dec, encode({"act": "a"}, 2), [100])
    assert err.fds == [100]


def test_more_fds_than_announced() -> None:
    frame = encode({"act": "a"}, 1)
    dec = Decoder()
    dec.feed(frame[:2], [100, 101])
    err = expect_error(dec, frame[2:])
    assert err.fds == [100, 101]


def test_fds_on_frame_announcing_none() -> None:
    dec = Decoder()
    err = expect_error(dec, encode({"act": "a"}), [100])
    assert err.fds == [100]


def test_fds_on_wrong_frame_of_the_chunk() -> None:
    # The descriptors belong to the LAST frame starting in the chunk, so the
    # first frame (announcing them) lacks them and the second has extras.
    dec = Decoder()
    err = expect_error(dec, encode({"act": "a"}, 1) + encode({"act": "b"}), [100])
    assert err.fds == [100]


def test_fds_with_empty_data() -> None:
    dec = Decoder()
    frame = encode({"act": "a"}, 1)
    dec.feed(frame[:4], [100])
    err = expect_error(dec, b"", [101])
    assert err.fds == [100, 101]


def test_error_returns_fds_of_frames_completed_earlier_in_call() -> None:
    dec = Decoder()
    a, b = encode({"act": "a"}, 1), encode({"act": "b"}, 1)
    dec.feed(a[:1], [100])
    # ``a`` completes fine, ``b`` gets its fd, then garbage follows.
    err = expect_error(dec, a[1:] + b + raw(b"[]"), [101])
    assert sorted(err.fds) == [100, 101]


# --- broken decoder and close() -----------------------------------------------------------------


def test_decoder_broken_after_error() -> None:
    dec = Decoder()
    expect_error(dec, raw(b"{}"))
    err = expect_error(dec, encode({"act": "a"}, 1), [100])
    assert err.fds == [100]
    err = expect_error(dec, b"")
    assert err.fds == []
    assert dec.buffered == 0
    assert dec.close() == []


def test_close_returns_held_fds_and_is_idempotent() -> None:
    frame = encode({"act": "a"}, 3)
    dec = Decoder()
    dec.feed(frame[:7], [100, 101, 102])
    assert dec.close() == [100, 101, 102]
    assert dec.close() == []
    assert dec.buffered == 0


def test_feed_after_close_raises_with_its_fds() -> None:
    dec = Decoder()
    assert dec.close() == []
    err = expect_error(dec, encode({"act": "a"}, 1), [100])
    assert err.fds == [100]


# --- properties ---------------------------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=6,
)
message = st.fixed_dictionaries(
    {"act": st.text(max_size=12)},
    optional={
        "seq": st.integers(-(2**40), 2**40),
        "ack": st.integers(0, 2**63),
        "data": json_value,
    },
)


def split(data: bytes, cuts: Iterable[int]) -> list[tuple[int, int]]:
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return list(itertools.pairwise(points))


@SETTINGS
@given(sent=st.lists(message, max_size=6), data=st.data())
def test_property_round_trip_any_split(sent: list[dict[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in sent)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    dec = Decoder()
    out: list[Frame] = []
    for start, stop in split(stream, cuts):
        out += dec.feed(stream[start:stop])
        assert dec.buffered <= MAX_FRAME + HEADER.size
    assert out == [Frame(m) for m in sent]
    assert dec.buffered == 0
    assert dec.close() == []


@SETTINGS
@given(
    sent=st.lists(st.tuples(message, st.integers(0, 3), st.booleans()), max_size=6),
    data=st.data(),
)
def test_property_sender_discipline_with_fds(
    sent: list[tuple[dict[str, Any], int, bool]], data: st.DataObject
) -> None:
    """Simulate Linux: fds come with the read holding the frame's first byte, possibly glued
    after tails of earlier frames, and that read stops at the end of the sendmsg carrying
    them (which holds only that frame); reads may split anywhere else."""
    stream = b""
    cuts = data.draw(st.lists(st.integers(0, 2000), max_size=12))
    fd_frames: list[tuple[int, tuple[int, ...]]] = []  # (start offset, fds)
    expected: list[Frame] = []
    next_fd = itertools.count(100)
    for msg, nfds, glued in sent:
        frame = encode(msg, nfds)
        start = len(stream)
        stream += frame
        fds = tuple(itertools.islice(next_fd, nfds))
        expected.append(Frame(msg, fds))
        if nfds:
            first_send = data.draw(st.integers(1, len(frame)))
            cuts.append(start + first_send)
            if not glued:
                cuts.append(start)
            fd_frames.append((start, fds))
    dec = Decoder()
    out: list[Frame] = []
    for start, stop in split(stream, cuts):
        chunk_fds = [fd for s, group in fd_frames if start <= s < stop for fd in group]
        out += dec.feed(stream[start:stop], chunk_fds)
    assert out == expected
    assert dec.close() == []


segment = st.one_of(
    st.binary(max_size=24),
    st.builds(encode, st.fixed_dictionaries({"act": st.text(max_size=4)}), st.integers(0, 3)),
    st.builds(raw, st.binary(max_size=24), st.integers(0, 20)),
    st.builds(raw_json, json_leaf | st.lists(json_leaf, max_size=3), st.integers(0, 2)),
    st.builds(lambda n, k: HEADER.pack(n, k), st.integers(0, 2**32 - 1), st.integers(0, 255)),
)


@SETTINGS
@given(
    segments=st.lists(segment, max_size=8),
    max_frame=st.sampled_from([0, 8, 64, MAX_FRAME]),
    max_fds=st.sampled_from([0, 1, 3, MAX_FDS]),
    data=st.data(),
)
def test_property_garbage_never_loses_an_fd(
    segments: list[bytes], max_frame: int, max_fds: int, data: st.DataObject
) -> None:
    stream = b"".join(segments)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = [stream[a:b] for a, b in split(stream, cuts)]
    # Occasionally an empty read, which must not carry fds.
    chunks += data.draw(st.lists(st.just(b""), max_size=1))
    next_fd = itertools.count(100)
    given_fds: list[int] = []
    seen: list[int] = []
    dec = Decoder(max_frame=max_frame, max_fds=max_fds)
    for chunk in chunks:
        fds = list(itertools.islice(next_fd, data.draw(st.sampled_from([0, 0, 0, 1, 2]))))
        given_fds += fds
        try:
            frames = dec.feed(chunk, fds)
        except ProtocolError as err:
            seen += err.fds
        else:
            for frame in frames:
                assert isinstance(frame.msg, dict)
                assert isinstance(frame.msg["act"], str)
                seen += frame.fds
        assert dec.buffered <= max_frame + HEADER.size
    seen += dec.close()
    seen += dec.close()
    assert Counter(seen) == Counter(given_fds)


# --- truncated descriptors (MSG_CTRUNC: the receiver is out of descriptors) -----------------------


def test_truncated_chunk_marks_the_frame_its_descriptors_belonged_to() -> None:
    plain, carrier = encode({"act": "plain"}), encode({"act": "newconn"}, 3)
    dec = Decoder()
    # A read ends with the frame that carried descriptors (the kernel stops there).
    frames = dec.feed(plain + carrier, truncated=True)
    assert frames == [Frame({"act": "plain"}), Frame({"act": "newconn"}, (), truncated=True)]
    # The decoder goes on: the next frame's descriptors arrive whole.
    assert dec.feed(carrier, [100, 101, 102]) == [Frame({"act": "newconn"}, (100, 101, 102))]


def test_truncated_frame_completed_in_a_later_chunk() -> None:
    carrier = encode({"act": "newconn", "pad": "p" * 40}, 2)
    dec = Decoder()
    assert dec.feed(carrier[:10], truncated=True) == []
    assert dec.feed(carrier[10:]) == [
        Frame({"act": "newconn", "pad": "p" * 40}, (), truncated=True)
    ]


@pytest.mark.parametrize(
    ("chunk", "why"),
    [
        (encode({"act": "a"}), "with a frame that announces none"),
        (b"", "with no data"),
    ],
)
def test_truncation_where_no_descriptor_was_due(chunk: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        Decoder().feed(chunk, truncated=True)
