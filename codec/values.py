"""float32 values <-> the bytes of a value type. Decoded values are always float32.

A bundle's values travel as four byte planes (the "shuffle" of Blosc/HDF5): plane j holds byte j (little-
endian) of every value of every tensor whose values have more than j bytes. Each plane is its own zstd
frame, so the sign/exponent plane gets its own entropy table instead of sharing one with near-random
mantissa bytes or with each small tensor: a float16 top-k value of a normal tensor costs ~10.7 bits, not 16.

The blockwise types (int8_block, int4_block; bundle version 2) quantise each run of `block_size` values
against its own absmax, as bitsandbytes' and NVFlare's blockwise filters do: the codes go in plane 0 (int4:
two to a byte, the first in the high nibble), the float32 block scales in the tensor's side payload after its
indices. Rounding is to nearest, or stochastic (floor(v / scale + u), u uniform in [0, 1): unbiased, so the
mean of many devices' updates is too); decoding does not need to know which.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CodecError

# The header stores the position in this tuple; the last two need bundle version 2.
VALUE_TYPES = ("float32", "float16", "bfloat16", "int8", "int8_block", "int4_block")
BLOCK_TYPES = ("int8_block", "int4_block")
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int8_block": 1, "int4_block": 1}  # stored units
_STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "i1", "int8_block": "i1",
            "int4_block": "u1"}
N_PLANES = 4  # the widest value type, float32, has 4 bytes
INT8_LEVELS = 127  # symmetric: codes -127..127, so zero is exact and -128 never appears
LEVELS = {"int8": INT8_LEVELS, "int8_block": INT8_LEVELS, "int4_block": 7}  # int4: -7..7, nibble = code + 8
DEFAULT_BLOCK = 64
MAX_BLOCK = 1 << 16
ROUNDINGS = ("nearest", "stochastic")


def bytes_per_value(value_type: str, block_size: int = DEFAULT_BLOCK) -> float:
    """Bytes a value costs before zstd, block scales included (a planning estimate, not a wire size)."""
    if value_type == "int4_block":
        return 0.5 + 4.0 / block_size
    if value_type == "int8_block":
        return 1.0 + 4.0 / block_size
    return float(ITEM_SIZE[value_type])


def stored_count(value_type: str, count: int) -> int:
    """Stored units (bytes for the 1-byte types) of `count` values: int4 packs two to a byte."""
    return (count + 1) // 2 if value_type == "int4_block" else count


_ITEM = np.array([ITEM_SIZE[t] for t in VALUE_TYPES], np.int64)  # stored bytes per unit, by value type
_BLOCKWISE = np.array([t in BLOCK_TYPES for t in VALUE_TYPES])
_INT4 = VALUE_TYPES.index("int4_block")


def scale_sizes(vt: np.ndarray, counts: np.ndarray, block_sizes: np.ndarray) -> np.ndarray:
    """Bytes of each tensor's float32 block scales in its side payload (0 for the other types), for tensors of
    value types `vt` (places in VALUE_TYPES), `counts` values and `block_sizes` (int64 arrays)."""
    return np.where(_BLOCKWISE[vt] & (counts > 0), 4 * -(-counts // np.maximum(block_sizes, 1)), 0)


def check_value_type(value_type: str, field: str = "value_type") -> str:
    if value_type not in VALUE_TYPES:
        raise CodecError(f"{field}: {value_type!r} is not one of {VALUE_TYPES}")
    return value_type


def encode_values(values: np.ndarray, value_type: str, name: str, *, block_size: int = DEFAULT_BLOCK,
                  rounding: str = "nearest", rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, float, bytes]:
    """(values in the storage dtype, int8 scale or 0.0, block scales as bytes or b"") for finite float32
    `values`. Stochastic rounding (int8 types) draws from `rng`."""
    if value_type == "float32":
        return values.astype("<f4"), 0.0, b""
    if value_type == "float16":
        with np.errstate(over="ignore"):  # overflow becomes inf, rejected just below
            stored = values.astype("<f2")
        if not np.isfinite(stored).all():
            raise CodecError(f"{name}: values: magnitude above 65504 does not fit float16")
        return stored, 0.0, b""
    if value_type == "bfloat16":
        stored = _to_bfloat16(values)
        if ((stored & 0x7F80) == 0x7F80).any():
            raise CodecError(f"{name}: values: magnitude rounds past the bfloat16 range")
        return stored, 0.0, b""
    noise = _noise(rounding, rng, values.size)
    if value_type == "int8":
        codes, scale = _quantise(values, INT8_LEVELS, noise)
        return codes.astype("i1"), scale, b""
    codes, scales = _quantise_blocks(values, LEVELS[value_type], block_size, noise)
    if value_type == "int8_block":
        return codes.astype("i1"), 0.0, scales.astype("<f4").tobytes()
    return _pack_nibbles(codes), 0.0, scales.astype("<f4").tobytes()


def decode_values(stored: np.ndarray, value_type: str, scale: float, name: str, *, count: int | None = None,
                  block_size: int = DEFAULT_BLOCK, scales: bytes = b"") -> np.ndarray:
    """float32 values of one tensor; `count`, `block_size` and `scales` are the blockwise types' (the caller
    has checked len(scales) == scale_sizes(...))."""
    if value_type == "bfloat16":
        out = (stored.astype(np.uint32) << 16).view(np.float32)
    elif value_type == "int8":
        if stored.size and stored.min() < -INT8_LEVELS:
            raise CodecError(f"{name}: values: int8 code -128 is never written")
        with np.errstate(over="ignore"):  # a hostile scale may overflow to inf, rejected below
            out = stored.astype(np.float32) * np.float32(scale)
    elif value_type in BLOCK_TYPES:  # one tensor's pass of decode_blockwise, its checks named
        try:
            return decode_blockwise(stored, value_type, [stored.size if count is None else count], block_size,
                                    scales)
        except CodecError as e:
            raise CodecError(f"{name}: {e}") from None
    else:
        out = stored.astype(np.float32, copy=False)  # float32 as stored: no copy (the caller's fresh array)
    if not np.isfinite(out).all():
        raise CodecError(f"{name}: values: NaN or Inf")
    return out


def decode_blockwise(stored: np.ndarray, value_type: str, counts: list[int], block_size: int, scales: bytes
                     ) -> np.ndarray:
    """Every tensor's float32 values at once, for tensors that share one blockwise type and block size:
    `stored` holds their stored codes in order (plane 0, one byte each), `scales` their block scales laid end to
    end. Every check in whole-array steps; a CodecError here names no tensor (decode_values names its one; a
    bundle that fails is read again tensor by tensor to name it). A FLASC upload (int4_block, hundreds of LoRA
    tensors) is decoded without a step per tensor."""
    counts = np.asarray(counts, np.int64)
    stored = stored.view(np.uint8)
    if value_type == "int8_block":
        if stored.size and stored.view(np.int8).min() < -INT8_LEVELS:
            raise CodecError("values: int8 code -128 is never written")
        codes = stored.view(np.int8).astype(np.float32)
    else:  # int4_block: each tensor's ceil(count / 2) bytes, an odd count's last low nibble padding
        nib = np.empty(stored.size * 2, np.uint8)
        nib[0::2], nib[1::2] = stored >> 4, stored & 0x0F
        padding = 2 * np.cumsum((counts + 1) // 2)[counts % 2 == 1] - 1
        padded = bool(nib[padding].any())
        if padding.size:
            keep = np.ones(nib.size, bool)
            keep[padding] = False
            nib = nib[keep]
        if (nib == 0).any():
            raise CodecError("values: int4 nibble 0 (code -8) is never written")
        if padded:
            raise CodecError("values: the int4 padding nibble is not zero")
        codes = nib.astype(np.float32)
        codes -= 8.0
    block_scales = np.frombuffer(scales, "<f4")
    if not (np.isfinite(block_scales).all() and (block_scales >= 0).all()):
        raise CodecError("scales: a block scale is negative, NaN or Inf")
    blocks = -(-counts // block_size)
    lengths = np.full(int(blocks.sum()), block_size, np.int64)  # every block full but each tensor's last
    has = blocks > 0
    lengths[np.cumsum(blocks)[has] - 1] = counts[has] - (blocks[has] - 1) * block_size
    with np.errstate(over="ignore"):
        codes *= np.repeat(block_scales, lengths)
    if not np.isfinite(codes).all():
        raise CodecError("values: NaN or Inf")
    return codes


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise CodecError(f"rounding: {rounding!r} is not one of {ROUNDINGS}")
    return rounding


def _noise(rounding: str, rng: np.random.Generator | None, n: int) -> np.ndarray | None:
    """u in [0, 1) per value for stochastic rounding, None for round-to-nearest."""
    if check_rounding(rounding) == "nearest":
        return None
    if rng is None:
        raise CodecError("rounding: stochastic rounding needs a seeded numpy Generator (rng=)")
    return rng.random(n)


def _round(x: np.ndarray, levels: int, noise: np.ndarray | None) -> np.ndarray:
    """Codes in [-levels, levels]: nearest (ties to even) or floor(x + u), whose mean is x."""
    codes = np.rint(x) if noise is None else np.floor(x + noise)
    return np.clip(codes, -levels, levels)


def _quantise(values: np.ndarray, levels: int, noise) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric quantisation: scale = max|v| / levels, code = round(v / scale)."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = float(np.float32(peak / levels))
    if scale == 0.0:  # all zero, or so small that the scale underflows float32: send zeros
        return np.zeros(values.size, np.int64), 1.0
    return _round(values.astype(np.float64) / scale, levels, noise).astype(np.int64), scale


def _quantise_blocks(values: np.ndarray, levels: int, block: int, noise) -> tuple[np.ndarray, np.ndarray]:
    """Codes and float32 scales, one scale = max|v| / levels per run of `block` values (0 for a zero block)."""
    n = values.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    padded = np.zeros(math.ceil(n / block) * block, np.float64)
    padded[:n] = values
    blocks = padded.reshape(-1, block)
    scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
    x = (blocks / safe[:, None]).reshape(-1)[:n]
    return _round(x, levels, noise).astype(np.int64), scales


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes -7..7 as nibbles code + 8, two a byte (first value high); an odd count pads a zero nibble."""
    nib = (codes + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] << 4 | nib[1::2]).astype("u1")


def pack_planes(stored: list[np.ndarray]) -> list[bytes]:
    """Planes 0..3: plane j is byte j of every array with more than j bytes per value, in order."""
    views = [a.view(np.uint8).reshape(-1, a.dtype.itemsize) for a in stored]
    return [b"".join(v[:, j].tobytes() for v in views if v.shape[1] > j) for j in range(N_PLANES)]


def plane_sizes(vt: np.ndarray, counts: np.ndarray) -> list[int]:
    """Bytes of planes 0..3 for tensors of value types `vt` (places in VALUE_TYPES) and `counts` values."""
    units = np.where(vt == _INT4, (counts + 1) // 2, counts)  # stored_count, for every tensor at once
    return [int(units[_ITEM[vt] > j].sum()) for j in range(N_PLANES)]


def unpack_planes(planes: list[bytes], value_types: list[str], counts: list[int]) -> list[np.ndarray]:
    """Inverse of pack_planes; the caller has checked each plane's length against plane_sizes."""
    out = [np.empty((stored_count(t, c), ITEM_SIZE[t]), np.uint8) for t, c in zip(value_types, counts)]
    for j, plane in enumerate(planes):
        buf, pos = np.frombuffer(plane, np.uint8), 0
        for a in out:
            if a.shape[1] > j:
                a[:, j] = buf[pos:pos + a.shape[0]]
                pos += a.shape[0]
    return [a.view(_STORAGE[t]).reshape(-1) for a, t in zip(out, value_types)]


def unpack_uniform(planes: list[bytes], value_type: str) -> np.ndarray:
    """Every value of a bundle whose tensors share one value type (not int4_block), in its storage dtype."""
    size = ITEM_SIZE[value_type]
    columns = [np.frombuffer(p, np.uint8) for p in planes[:size]]
    whole = np.empty((columns[0].size, size), np.uint8)
    for j, c in enumerate(columns):
        whole[:, j] = c
    return whole.view(_STORAGE[value_type]).reshape(-1)


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Top 16 bits of the float32, rounded to nearest, ties to even (as torch and JAX round)."""
    bits = values.astype("<f4").view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
