"""The implicit mask: derived from (seed, tensor name, shape, density), identically on every machine.

Every flat position i gets a 64-bit key from SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), a pure integer counter hash, so no numpy Generator algorithm (which numpy may
change between versions) is involved. The mask is the k = mask_size(shape, density) positions with the
smallest keys. Masks are nested: a lower density keeps a subset of a higher density's positions.
FORMAT.md gives the algorithm step by step for other implementations; mask_vectors.json pins its output.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

from .errors import CodecError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20  # keys are made a chunk at a time so memory stays O(chunk + k), not O(n)


def mask_size(shape: tuple[int, ...], density: float) -> int:
    """k = round(density * n), at least 1 when n > 0 and density > 0, at most n."""
    n = int(math.prod(shape))
    if not math.isfinite(density):
        raise CodecError(f"density: must be finite, got {density!r}")
    if n == 0 or density <= 0:
        return 0
    return min(n, max(1, int(round(density * n))))


def mask_start_state(seed: int, name: str, shape: tuple[int, ...]) -> int:
    """SplitMix64 start state: the first 8 bytes (little-endian) of SHA-256 over seed, name and shape."""
    message = b"edgelora-mask-v1\x00%d\x00%s\x00%s" % (
        int(seed), name.encode("utf-8"), ",".join(str(int(d)) for d in shape).encode())
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "little")


def splitmix64(state: int, start: int, stop: int) -> np.ndarray:
    """Outputs start..stop-1 of SplitMix64 from `state` (output i uses state + (i + 1) * gamma mod 2**64)."""
    z = np.arange(start + 1, stop + 1, dtype=np.uint64) * _GAMMA + np.uint64(state)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def mask_indices(seed: int, name: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Sorted int64 flat indices of the k positions whose keys are smallest.

    A key is the SplitMix64 output with its low b bits replaced by the position (b = bit length of n - 1),
    which makes keys unique, so "the k smallest" is one well-defined set whatever selection method is used.
    """
    shape = tuple(int(d) for d in shape)
    n = int(math.prod(shape))
    k = mask_size(shape, density)
    if k == 0:
        return np.zeros(0, np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    state = mask_start_state(seed, name, shape)
    b = (n - 1).bit_length()
    low = np.uint64((1 << b) - 1)
    # Keep only keys below a threshold expected to pass k + 6 sigma + 16 of them (binomial count), so the
    # exact selection runs on ~k candidates; if too few pass, the threshold doubles. The result does not
    # depend on the threshold, only on the keys.
    want = k + 6 * math.isqrt(k) + 16
    threshold = (want << 64) // n
    while True:
        cand = _keys_below(state, n, low, threshold)
        if cand.size >= k or threshold >= 1 << 64:
            break
        threshold *= 2
    if cand.size > k:
        kth = np.partition(cand, k - 1)[k - 1]
        cand = cand[cand <= kth]
    return (cand & low).astype(np.int64)  # candidates were kept in position order, so already sorted


def _keys_below(state: int, n: int, low: np.uint64, threshold: int) -> np.ndarray:
    keep_all = threshold >= 1 << 64
    t = np.uint64(min(threshold, (1 << 64) - 1))
    parts = []
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        keys = (splitmix64(state, start, stop) & ~low) | np.arange(start, stop, dtype=np.uint64)
        parts.append(keys if keep_all else keys[keys < t])
    return np.concatenate(parts)
