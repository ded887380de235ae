"""Masks and top-k: the one place that decides which entries of a set of tensors travel."""
from __future__ import annotations

import math

import numpy as np

from edgelora import codec


def mask_bool(seed: int, name: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Boolean mask of the implicit sparse mask the codec derives (SLoRA Stage 1, sparse fine-tuning)."""
    m = np.zeros(int(math.prod(shape)), bool)
    m[codec.mask_indices(seed, name, tuple(shape), density)] = True
    return m.reshape(shape)


def topk_count(total: int, density: float) -> int:
    """Entries a top-k at `density` keeps: ceil(d * N) (FLASC)."""
    return min(total, int(math.ceil(density * total - 1e-9))) if total else 0


def largest(mag: np.ndarray, k: int) -> np.ndarray:
    """The sorted positions of the k largest entries of a flat array; ties break towards the lower position,
    so the result is deterministic."""
    if k >= mag.size:
        return np.arange(mag.size, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, np.int64)
    # Stable selection: sort by (-|v|, position) among the candidates at or above the k-th magnitude.
    thresh = np.partition(mag, mag.size - k)[mag.size - k]
    above = np.flatnonzero(mag > thresh)
    ties = np.flatnonzero(mag == thresh)[: k - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def global_topk(tensors: dict[str, np.ndarray], density: float) -> dict[str, codec.Sparse]:
    """Top-k by magnitude over all tensors flattened together (FLASC's reference takes it globally, not per
    layer). Ties break towards the lower flat position, so the result is deterministic."""
    names = list(tensors)
    flats = [np.asarray(tensors[n], np.float32).reshape(-1) for n in names]
    sizes = np.array([f.size for f in flats], np.int64)
    allv = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    chosen = largest(np.abs(allv), topk_count(allv.size, density))
    out = {}
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for i, n in enumerate(names):
        lo, hi = np.searchsorted(chosen, [bounds[i], bounds[i + 1]])
        local = chosen[lo:hi] - bounds[i]
        out[n] = codec.Sparse(tuple(tensors[n].shape), local.astype(np.int64), flats[i][local].astype(np.float32))
    return out
