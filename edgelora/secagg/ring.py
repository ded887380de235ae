"""Values in the ring Z_(2^b): fixed point, stochastic rounding, and the bit width b that keeps the sum of
every device's integers from wrapping."""
from __future__ import annotations

import numpy as np

MAX_BITS = 62


def word_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned numpy type that holds b bits. Arithmetic in it wraps mod 2^(8 x itemsize), a
    multiple of 2^b, so sums and differences can be reduced mod 2^b once, at the end (reduce)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"ring bits must be in 1..{MAX_BITS}, got {bits}")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(dt).itemsize:
            return np.dtype(dt)
    raise AssertionError("unreachable")


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """values mod 2^b, in place where it can (values already in word_dtype(bits))."""
    mask = (1 << bits) - 1
    if bits == 8 * values.dtype.itemsize:
        return values
    values &= values.dtype.type(mask)
    return values
