"""The three tensor forms the codec carries. Values are float32 after decoding, whatever travelled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import CodecError
from .mask import mask_indices


@dataclass(frozen=True)
class Dense:
    values: np.ndarray  # any shape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.values))


@dataclass(frozen=True)
class Sparse:
    shape: tuple[int, ...]
    indices: np.ndarray  # int64, sorted, unique, flat indices into `shape`
    values: np.ndarray  # float32, len(indices)


@dataclass(frozen=True)
class Masked:
    shape: tuple[int, ...]
    seed: int
    density: float
    values: np.ndarray  # float32, in the order of mask_indices(seed, name, shape, density)


Tensor = Union[Dense, Sparse, Masked]


def to_dense(name: str, t: Tensor, base: np.ndarray | None = None) -> np.ndarray:
    """Materialise a tensor. Entries a sparse form does not carry come from `base` (default zeros)."""
    if isinstance(t, Dense):
        return np.asarray(t.values, dtype=np.float32)
    shape = tuple(t.shape)
    out = np.zeros(shape, np.float32) if base is None else np.array(base, dtype=np.float32, copy=True)
    if out.shape != shape:
        raise CodecError(f"{name}: base shape {out.shape} != tensor shape {shape}")
    flat = out.reshape(-1)
    if isinstance(t, Sparse):
        positions = np.asarray(t.indices, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= flat.size):
            raise CodecError(f"{name}: indices: outside [0, {flat.size})")
    elif isinstance(t, Masked):
        positions = mask_indices(t.seed, name, shape, t.density)
    else:
        raise CodecError(f"{name}: unknown tensor form {type(t).__name__}")
    if np.size(t.values) != positions.size:
        raise CodecError(f"{name}: values: {np.size(t.values)} values for {positions.size} positions")
    flat[positions] = np.asarray(t.values, np.float32).reshape(-1)
    return out
