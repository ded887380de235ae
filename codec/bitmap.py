"""Index coder 5 (bundle version 4): a tensor's bitmap, packed eight positions to a byte (the first in the
high bit, as np.packbits writes it; the last byte's spare bits 0), as one zstd frame.

Where a tensor holds a large share of its entries, its bitmap's bytes are independent draws from a binomial
byte distribution whose order-0 entropy is exactly the bitmap's, and zstd's entropy stage codes bytes close to
that: within 1 % of log2(C(n, k)) at densities 0.3-0.7 for a tensor of 200,000 entries, where Golomb is 3 %
over at 0.4 and 13 % at 0.7. It replaced rANS in the encoder (which still reads rANS): about as small, and
read by zstd's compiled decoder plus two numpy passes, not a Python step per group of lanes (0.79 ms against
2.6 ms for 200,000 entries at 0.4; 0.015 ms against 1.7 ms for a 9,216-entry LoRA tensor at 0.7).
"""
from __future__ import annotations

import numpy as np

from . import zstd_frame
from .errors import CodecError

FRAME_BYTES = 32  # a zstd frame's fixed cost (header, block header, checksum), at least: a bitmap that cannot
#                   beat Golomb by this much is not tried


def encode(indices: np.ndarray, n: int, level: int) -> bytes:
    bits = np.zeros(n, np.uint8)
    bits[indices] = 1
    return zstd_frame.compress(np.packbits(bits).tobytes(), level, zstd_frame.ENTROPY_MIN_MATCH)


def decode(frame: bytes, n: int, k: int) -> np.ndarray:
    """k sorted unique indices in [0, n); CodecError names what is wrong."""
    raw = zstd_frame.decompress(frame, -(-n // 8), "index_payload: bitmap")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8)).view(bool)
    if bits[n:].any():
        raise CodecError(f"index_payload: bitmap sets a position >= n={n}")
    indices = np.flatnonzero(bits[:n])
    if indices.size != k:
        raise CodecError(f"count: bitmap holds {indices.size} indices, count says {k}")
    return indices.astype(np.int64, copy=False)
