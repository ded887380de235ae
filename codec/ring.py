"""b-bit ring values <-> bytes, packed at exactly b bits a value (secure aggregation's masked uploads).

Masked values are uniform in Z_(2^b), so no entropy coder can shrink them: the payload is a 10-byte header
and then count * b bits, value i in stream bits [i*b, (i+1)*b), least significant bit first (FORMAT.md,
"Ring payloads"). Flower's SecAgg+ ships the same values as int64, 8 bytes each; at b = 12 this is 1.5.

Packing is vectorised over groups of 8 values: 8 values of b bits fill exactly b bytes, so byte k of a group
depends on the same (value, shift) pairs in every group, and one pass per (value slot, byte) pair does every
group at once: at most b + 16 whole-column operations, none per value.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import CodecError

RING_MAGIC = b"ELRG"
RING_VERSION = 1
RING_HEADER = struct.Struct("<4sBBI")  # magic, version, bits, count
RING_HEADER_SIZE = RING_HEADER.size  # 10
MAX_RING_BITS = 64
MAX_RING_COUNT = (1 << 32) - 1


def ring_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned type that holds `bits` bits (the decoded values' dtype; the same choice as
    edgelora.secagg.ring.word_dtype, restated here because the codec imports nothing outside itself)."""
    _check_bits(bits, "bits")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(dt).itemsize:
            return np.dtype(dt)
    raise AssertionError("unreachable")


def ring_payload_size(count: int, bits: int) -> int:
    """Bytes of encode_ring's output for `count` values of `bits` bits: header + ceil(count * b / 8)."""
    return RING_HEADER_SIZE + (count * bits + 7) // 8


def encode_ring(values: np.ndarray, bits: int) -> bytes:
    """Header (magic, version, bits, count) + `values` packed at exactly `bits` bits each.

    values: a 1-D array of unsigned (or non-negative signed) integers, each < 2^bits; CodecError otherwise.
    """
    _check_bits(bits, "bits")
    values = np.asarray(values)
    if values.ndim != 1:
        raise CodecError(f"ring values: a 1-D array expected, got shape {values.shape}")
    if values.dtype.kind not in "ui":
        raise CodecError(f"ring values: integers expected, got dtype {values.dtype}")
    if values.size > MAX_RING_COUNT:
        raise CodecError(f"ring values: count {values.size} exceeds {MAX_RING_COUNT}")
    if values.size and values.dtype.kind == "i" and int(values.min()) < 0:
        raise CodecError("ring values: negative value; ring values are in [0, 2^bits)")
    words = values.astype(np.uint64, copy=False)
    if values.size and bits < 64 and int(words.max()) >> bits:
        raise CodecError(f"ring values: a value is >= 2^{bits}; ring values are in [0, 2^{bits})")
    return RING_HEADER.pack(RING_MAGIC, RING_VERSION, bits, values.size) + _pack(words, bits).tobytes()


def decode_ring(data: bytes, *, bits: int, count: int) -> np.ndarray:
    """The `count` values of `bits` bits in `data`, in ring_dtype(bits). Strict: CodecError, naming what is
    wrong, for other magic or version, another bit width or count than the round expects, truncated or
    trailing bytes, and padding bits that are not zero."""
    _check_bits(bits, "bits (expected)")
    if not 0 <= count <= MAX_RING_COUNT:
        raise CodecError(f"ring payload: expected count {count} is not in 0..{MAX_RING_COUNT}")
    view = memoryview(data)
    if len(view) < RING_HEADER_SIZE:
        raise CodecError(f"ring payload: {len(view)} bytes, shorter than its {RING_HEADER_SIZE}-byte header")
    magic, version, got_bits, got_count = RING_HEADER.unpack_from(view, 0)
    if magic != RING_MAGIC:
        raise CodecError(f"ring payload: magic {magic!r}, expected {RING_MAGIC!r}")
    if version != RING_VERSION:
        raise CodecError(f"ring payload: version {version}, this decoder reads {RING_VERSION}")
    if got_bits != bits:
        raise CodecError(f"ring payload: {got_bits}-bit values, this round expects {bits}")
    if got_count != count:
        raise CodecError(f"ring payload: {got_count} values, this round expects {count}")
    need = ring_payload_size(count, bits)
    if len(view) < need:
        raise CodecError(f"ring payload: truncated, {len(view)} bytes of {need} for {count} {bits}-bit values")
    if len(view) > need:
        raise CodecError(f"ring payload: {len(view) - need} trailing bytes after {count} {bits}-bit values")
    packed = np.frombuffer(view, np.uint8, offset=RING_HEADER_SIZE)
    words = _unpack(packed, bits, count)
    return words.astype(ring_dtype(bits), copy=False)


def _check_bits(bits: int, field: str) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_RING_BITS:
        raise CodecError(f"ring payload: {field} {bits!r} is not in 1..{MAX_RING_BITS}")


def _slots(bits: int):
    """(value slot j in a group of 8, byte k of the group's b bytes, shift) for every pair that shares bits:
    bits [8k, 8k + 8) of the group's stream hold value j shifted right by 8k - j*b (left if negative)."""
    for j in range(8):
        start = j * bits
        for k in range(start // 8, (start + bits - 1) // 8 + 1):
            yield j, k, 8 * k - start


def _pack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint64 values < 2^bits -> ceil(n * bits / 8) bytes, LSB-first bit stream."""
    n = words.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[:n] = words
    padded = padded.reshape(groups, 8)
    out = np.zeros((groups, bits), np.uint8)
    for j, k, shift in _slots(bits):
        col = padded[:, j] >> np.uint64(shift) if shift >= 0 else padded[:, j] << np.uint64(-shift)
        out[:, k] |= (col & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(-1)[: (n * bits + 7) // 8]


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of _pack; CodecError if any bit past the last value (the padding of the last byte) is set."""
    groups = -(-count // 8)
    stream = np.zeros(groups * bits, np.uint8)
    stream[: packed.size] = packed
    stream = stream.reshape(groups, bits)
    words = np.zeros((groups, 8), np.uint64)
    for j, k, shift in _slots(bits):
        byte = stream[:, k].astype(np.uint64)
        words[:, j] |= byte << np.uint64(shift) if shift >= 0 else byte >> np.uint64(-shift)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    words = words.reshape(-1)
    # Slots past `count` read only the last byte's padding bits (and the zeros appended above).
    if words[count:].any():
        raise CodecError("ring payload: padding bits after the last value are not zero")
    return words[:count]
