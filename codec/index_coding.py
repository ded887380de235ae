"""Sorted unique flat indices <-> bytes: per tensor, the smaller of the coders below, named in the header.

The bound to beat is log2(C(n, k)) bits for k of n positions (any coder must distinguish all subsets).
Golomb-coded gaps are within ~2% of it up to density ~0.34; past that the bitmap through zstd (bitmap.py) is
within ~1% once the tensor is large enough to amortise its frame; "none" covers k = 0 and k = n. rANS on the
bitmap (rans.py) is read, no longer written: the bitmap is about as small and reads 3-100x faster.
"""
from __future__ import annotations

import math

import numpy as np

from . import bitmap, golomb, rans
from .errors import CodecError

NONE, GOLOMB, RANS, JOINT, JOINT_BYTES, BITMAP = 0, 1, 2, 3, 4, 5
# JOINT: Golomb codes under the tensor's own m, in the bundle's joint stream with other tensors' (FORMAT.md);
# JOINT_BYTES: the same tensors' gaps as bytes through zstd in that stream instead (gap_bytes, version 4);
# BITMAP: the tensor's own bitmap through zstd (bitmap.py, version 4)
CODER_NAMES = {NONE: "none", GOLOMB: "golomb", RANS: "rans", JOINT: "joint", JOINT_BYTES: "joint-bytes",
               BITMAP: "bitmap"}
JOINT_CODERS = (JOINT, JOINT_BYTES)
NEEDS_VERSION = {JOINT: (3, "the joint stream"), JOINT_BYTES: (4, "the joint stream of byte gaps"),
                 BITMAP: (4, "a bitmap")}  # the bundle version a coder came in, and what it is called then


def bound_bits(n: int, k: int) -> float:
    """log2(C(n, k)), via lgamma so it is cheap for n in the millions."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def encode_indices(indices: np.ndarray, n: int, golomb_payload: bool = True, level: int = 3
                   ) -> tuple[int, int, bytes | None]:
    """(coder, parameter, payload) of the smallest coding; indices must already be validated. With
    golomb_payload False a Golomb choice comes without its payload (None): the caller codes it jointly."""
    k = indices.size
    if k == 0 or k == n:
        return NONE, 0, b""
    gaps = golomb.gaps_of(indices)
    m = golomb.best_parameter(gaps, n)
    golomb_size = -(-golomb.golomb_bits(gaps, m) // 8)
    # The bitmap is tried where Golomb is further over the bound than a zstd frame's fixed cost, or where its m
    # is 1 or 2 (densities past ~0.4: Golomb is then about the plain bitmap, read a bit at a time, 16x slower
    # than the frame at 0.5); it is kept unless larger by more than that fixed cost or 1 %, whichever is less.
    if m <= 2 or golomb_size > bound_bits(n, k) / 8 + bitmap.FRAME_BYTES:
        frame = bitmap.encode(indices, n, level)
        if len(frame) < golomb_size + min(bitmap.FRAME_BYTES, golomb_size // 100):
            return BITMAP, 0, frame
    return GOLOMB, m, golomb.encode(gaps, m) if golomb_payload else None


def decode_indices(coder: int, param: int, payload: bytes, n: int, k: int) -> np.ndarray:
    """Strictly decode k sorted unique indices in [0, n); CodecError names the field at fault."""
    if coder == NONE:
        if payload or param:
            raise CodecError("index_payload: coder 'none' carries no bytes and no parameter")
        if k == 0:
            return np.zeros(0, np.int64)
        if k == n:
            return np.arange(n, dtype=np.int64)
        raise CodecError(f"index_coder: 'none' needs count 0 or n={n}, got {k}")
    if k == 0:
        raise CodecError(f"index_coder: count 0 must use coder 'none', not {CODER_NAMES.get(coder, coder)}")
    if coder == GOLOMB:
        return golomb.decode(payload, param, n, k)
    if coder == RANS:
        return rans.decode(payload, param, n, k)
    if coder == BITMAP:
        if param:
            raise CodecError(f"index_param: a bitmap has index_param 0, not {param}")
        return bitmap.decode(payload, n, k)
    raise CodecError(f"index_coder: unknown coder {coder}")
