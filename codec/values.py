"""float32 values <-> the bytes of a value type. Decoded values are always float32.

A bundle's values travel as four byte planes (the "shuffle" of Blosc/HDF5): plane j holds byte j (little-
endian) of every value of every tensor whose values have more than j bytes. Each plane is its own zstd
frame, so the sign/exponent plane gets its own entropy table instead of sharing one with near-random
mantissa bytes or with each small tensor: a float16 top-k value of a normal tensor costs ~10.7 bits, not 16.
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError

VALUE_TYPES = ("float32", "float16", "bfloat16", "int8")  # the header stores the position in this tuple
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_STORAGE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "i1"}
N_PLANES = 4  # the widest value type, float32, has 4 bytes
INT8_LEVELS = 127  # symmetric: codes -127..127, so zero is exact and -128 never appears


def check_value_type(value_type: str, field: str = "value_type") -> str:
    if value_type not in VALUE_TYPES:
        raise CodecError(f"{field}: {value_type!r} is not one of {VALUE_TYPES}")
    return value_type


def encode_values(values: np.ndarray, value_type: str, name: str) -> tuple[np.ndarray, float]:
    """(values in the storage dtype, int8 scale or 0.0) for finite float32 `values`."""
    if value_type == "float32":
        return values.astype("<f4"), 0.0
    if value_type == "float16":
        with np.errstate(over="ignore"):  # overflow becomes inf, rejected just below
            stored = values.astype("<f2")
        if not np.isfinite(stored).all():
            raise CodecError(f"{name}: values: magnitude above 65504 does not fit float16")
        return stored, 0.0
    if value_type == "bfloat16":
        stored = _to_bfloat16(values)
        if ((stored & 0x7F80) == 0x7F80).any():
            raise CodecError(f"{name}: values: magnitude rounds past the bfloat16 range")
        return stored, 0.0
    return _to_int8(values)


def decode_values(stored: np.ndarray, value_type: str, scale: float, name: str) -> np.ndarray:
    if value_type == "bfloat16":
        out = (stored.astype(np.uint32) << 16).view(np.float32)
    elif value_type == "int8":
        if stored.size and stored.min() < -INT8_LEVELS:
            raise CodecError(f"{name}: values: int8 code -128 is never written")
        with np.errstate(over="ignore"):  # a hostile scale may overflow to inf, rejected below
            out = stored.astype(np.float32) * np.float32(scale)
    else:
        out = stored.astype(np.float32)
    if not np.isfinite(out).all():
        raise CodecError(f"{name}: values: NaN or Inf")
    return out


def pack_planes(stored: list[np.ndarray]) -> list[bytes]:
    """Planes 0..3: plane j is byte j of every array with more than j bytes per value, in order."""
    views = [a.view(np.uint8).reshape(-1, a.dtype.itemsize) for a in stored]
    return [b"".join(v[:, j].tobytes() for v in views if v.shape[1] > j) for j in range(N_PLANES)]


def plane_sizes(value_types: list[str], counts: list[int]) -> list[int]:
    return [sum(c for t, c in zip(value_types, counts) if ITEM_SIZE[t] > j) for j in range(N_PLANES)]


def unpack_planes(planes: list[bytes], value_types: list[str], counts: list[int]) -> list[np.ndarray]:
    """Inverse of pack_planes; the caller has checked each plane's length against plane_sizes."""
    out = [np.empty((c, ITEM_SIZE[t]), np.uint8) for t, c in zip(value_types, counts)]
    for j, plane in enumerate(planes):
        buf, pos = np.frombuffer(plane, np.uint8), 0
        for a in out:
            if a.shape[1] > j:
                a[:, j] = buf[pos:pos + a.shape[0]]
                pos += a.shape[0]
    return [a.view(_STORAGE[t]).reshape(-1) for a, t in zip(out, value_types)]


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Top 16 bits of the float32, rounded to nearest, ties to even (as torch and JAX round)."""
    bits = values.astype("<f4").view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")


def _to_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-tensor symmetric quantisation: scale = max|v| / 127, code = round(v / scale)."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = float(np.float32(peak / INT8_LEVELS))
    if scale == 0.0:  # all zero, or so small that the scale underflows float32: send zeros
        return np.zeros(values.size, "i1"), 1.0
    codes = np.rint(values.astype(np.float64) / scale)
    return np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype("i1"), scale
