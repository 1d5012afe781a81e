"""The BPF program behind policy ``reuseport``'s rotation, built as bytes (pure: no I/O).

A ``BPF_PROG_TYPE_SK_REUSEPORT`` program runs in the kernel for each new connection to a
reuseport group and selects the socket it goes to. This one keeps a counter and an order of
socket indices in one array map (:func:`state_value`) and selects
``sockets[order[counter++ % count]]``; :mod:`aiocluster.primary.steering` loads it and keeps
the maps up to date.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["MAX_SLOTS", "program", "state_value"]

#: Sockets one listen's map holds; slots past it are served by the kernel's hash.
MAX_SLOTS = 1024

# Instruction fields: class | size or operation | source.
_ALU64_MOV_X, _ALU64_MOV_K, _ALU64_ADD_K, _ALU64_ADD_X = 0xBF, 0xB7, 0x07, 0x0F
_ALU64_LSH_K, _ALU32_MOD_X = 0x67, 0x9C
_ST_W, _STX_W, _LDX_W, _ATOMIC_W = 0x62, 0x63, 0x61, 0xC3
_LD_IMM64, _JEQ_K, _JGE_K, _CALL, _EXIT = 0x18, 0x15, 0x35, 0x85, 0x95
_PSEUDO_MAP_FD, _FETCH_ADD = 1, 0x01
_HELPER_MAP_LOOKUP_ELEM, _HELPER_SK_SELECT_REUSEPORT = 1, 82
_SK_PASS = 1
_R0, _R1, _R2, _R3, _R4, _R6, _FP = 0, 1, 2, 3, 4, 6, 10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _load_map(dst: int, map_fd: int) -> bytes:
    return _insn(_LD_IMM64, dst, _PSEUDO_MAP_FD, 0, map_fd) + _insn(0)


def program(state_fd: int, sockets_fd: int) -> bytes:
    """The steering program, for the maps ``state_fd`` and ``sockets_fd``.

    ``state`` is an array of one value: a counter, how many slots serve, then their indices
    in ``sockets`` (:func:`state_value`). Each new connection takes the counter's old value
    (an atomic add) modulo that count, and the socket at that place of the order. With a
    count of 0, or a socket gone from the map, the program selects nothing and the kernel
    falls back to its hash.
    """
    pass_ = [_insn(_ALU64_MOV_K, _R0, imm=_SK_PASS), _insn(_EXIT)]
    select = [
        _insn(_ALU64_LSH_K, _R1, imm=2),
        _insn(_ALU64_ADD_X, _R0, _R1),
        _insn(_LDX_W, _R1, _R0, 8),  # w1 = order[counter % serving]
        _insn(_STX_W, _FP, _R1, -8),  # the key, on the stack
        _load_map(_R2, sockets_fd),
        _insn(_ALU64_MOV_X, _R1, _R6),  # the context
        _insn(_ALU64_MOV_X, _R3, _FP),
        _insn(_ALU64_ADD_K, _R3, imm=-8),
        _insn(_ALU64_MOV_K, _R4, imm=0),
        _insn(_CALL, imm=_HELPER_SK_SELECT_REUSEPORT),  # its error: the hash decides
    ]
    count = [
        _insn(_ALU64_MOV_K, _R1, imm=1),
        _insn(_ATOMIC_W, _R0, _R1, 0, _FETCH_ADD),  # w1 = counter++
        _insn(_LDX_W, _R2, _R0, 4),  # w2 = serving
        _insn(_JEQ_K, _R2, off=_slots(select) + 2, imm=0),
        _insn(_ALU32_MOD_X, _R1, _R2),
        # The verifier's bound for the order's index (count never exceeds it).
        _insn(_JGE_K, _R1, off=_slots(select), imm=MAX_SLOTS),
    ]
    lookup = [
        _insn(_ALU64_MOV_X, _R6, _R1),
        _insn(_ST_W, _FP, off=-4, imm=0),  # key 0, on the stack
        _load_map(_R1, state_fd),
        _insn(_ALU64_MOV_X, _R2, _FP),
        _insn(_ALU64_ADD_K, _R2, imm=-4),
        _insn(_CALL, imm=_HELPER_MAP_LOOKUP_ELEM),
        _insn(_JEQ_K, _R0, off=_slots(count) + _slots(select), imm=0),
    ]
    return b"".join(lookup + count + select + pass_)


def state_value(order: Sequence[int]) -> bytes:
    """The state map's value: the counter (0), the count, then ``order`` padded to size."""
    order = list(order[:MAX_SLOTS])
    return struct.pack(f"<II{MAX_SLOTS}I", 0, len(order), *order, *[0] * (MAX_SLOTS - len(order)))


def _slots(insns: list[bytes]) -> int:
    return sum(len(i) for i in insns) // 8
