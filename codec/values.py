"""float32 values <-> the bytes of a value type. Decoded values are always float32.

Bytes are laid out as byte planes (byte 0 of every value, then byte 1, ...), the "shuffle" of Blosc/HDF5:
sign and exponent bytes of nearby values are alike, so zstd's entropy stage compresses them well once they
are no longer interleaved with near-random mantissa bytes (about 12 bits per float16 top-k value, not 16).
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError

VALUE_TYPES = ("float32", "float16", "bfloat16", "int8")  # the header stores the position in this tuple
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "i1"}
INT8_LEVELS = 127  # symmetric: codes -127..127, so zero is exact and -128 never appears


def check_value_type(value_type: str, field: str = "value_type") -> str:
    if value_type not in VALUE_TYPES:
        raise CodecError(f"{field}: {value_type!r} is not one of {VALUE_TYPES}")
    return value_type


def encode_values(values: np.ndarray, value_type: str, name: str) -> tuple[bytes, float]:
    """(byte planes, int8 scale or 0.0) for finite float32 `values`."""
    if value_type == "float32":
        stored = values.astype("<f4")
    elif value_type == "float16":
        with np.errstate(over="ignore"):  # overflow becomes inf, rejected just below
            stored = values.astype("<f2")
        if not np.isfinite(stored).all():
            raise CodecError(f"{name}: values: magnitude above 65504 does not fit float16")
    elif value_type == "bfloat16":
        stored = _to_bfloat16(values)
        if ((stored & 0x7F80) == 0x7F80).any():
            raise CodecError(f"{name}: values: magnitude rounds past the bfloat16 range")
    else:
        stored, scale = _to_int8(values)
        return _planes(stored), scale
    return _planes(stored), 0.0


def decode_values(planes: bytes, value_type: str, count: int, scale: float, name: str) -> np.ndarray:
    size = ITEM_SIZE[value_type]
    if len(planes) != count * size:
        raise CodecError(f"{name}: value_size: {len(planes)} bytes for {count} {value_type} values")
    raw = np.frombuffer(planes, np.uint8).reshape(size, count).T.copy().view(_STORAGE[value_type]).reshape(-1)
    if value_type == "bfloat16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    elif value_type == "int8":
        if raw.size and raw.min() < -INT8_LEVELS:
            raise CodecError(f"{name}: values: int8 code -128 is never written")
        out = raw.astype(np.float32) * np.float32(scale)
    else:
        out = raw.astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError(f"{name}: values: NaN or Inf")
    return out


def _planes(stored: np.ndarray) -> bytes:
    size = stored.dtype.itemsize
    return stored.view(np.uint8).reshape(-1, size).T.tobytes()


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Top 16 bits of the float32, rounded to nearest, ties to even (as torch and JAX round)."""
    bits = values.astype("<f4").view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")


def _to_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric quantisation: scale = max|v| / 127, code = round(v / scale)."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = float(np.float32(peak / INT8_LEVELS))
    if scale == 0.0:  # all zero, or so small that the scale underflows float32: send zeros
        return np.zeros(values.size, np.int8), 1.0
    codes = np.rint(values.astype(np.float64) / scale)
    return np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale
