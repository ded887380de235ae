"""The implicit mask: derived from (seed, tensor name, shape, density), identically on every machine."""
from __future__ import annotations

import hashlib
import math

import numpy as np


def mask_size(shape: tuple[int, ...], density: float) -> int:
    n = int(math.prod(shape))
    if n == 0 or density <= 0:
        return 0
    return min(n, max(1, int(round(density * n))))


def mask_indices(seed: int, name: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Sorted int64 flat indices of the mask entries (stand-in; the codec issue replaces it)."""
    n = int(math.prod(shape))
    k = mask_size(shape, density)
    digest = hashlib.sha256(f"{int(seed)}/{name}/{tuple(shape)}".encode()).digest()
    bits = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))
    keys = bits.bit_generator.random_raw(n)
    return np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64) if k else np.zeros(0, np.int64)
