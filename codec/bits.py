"""Vectorised bit-field packing, most significant bit first (np.packbits order)."""
from __future__ import annotations

import numpy as np


def fixed_width_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Each value as `width` bits, MSB first, as one flat uint8 0/1 array (len(values) * width)."""
    if width == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)


def read_fixed_width(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of fixed_width_bits for the first count * width bits; int64 results (width <= 62)."""
    if width == 0:
        return np.zeros(count, np.int64)
    columns = bits[: count * width].reshape(count, width)
    # a shift and an or per bit of width, in the narrowest type that holds the field: cheaper than a product
    dtype = np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64
    out = columns[:, 0].astype(dtype)
    for j in range(1, width):
        out <<= 1
        out |= columns[:, j]
    return out.astype(np.int64)

