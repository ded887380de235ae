"""Interleaved rANS over the bitmap's 16-bit words, under a per-tensor Bernoulli model, vectorised by lane.

At high density the gaps are short and any prefix code wastes a fraction of a bit each (Golomb is 4% over
the bound at p ~ 0.38). rANS (Duda, "Asymmetric numeral systems", arXiv:1311.2540; the 64-bit state / 32-bit
word variant of Giesen's ryg_rans) codes the bitmap at its entropy n*h(p) up to table quantisation.

Model: a 16-bit word with c ones has probability p^c (1-p)^(16-c); it is quantised to f[c] / 2**24, one
integer per class, stored in the payload so the decoder does no floating point. Words are spread round-robin
over W lanes (word i goes to lane i % W at step i // W); each step codes one word per lane with whole-array
numpy operations, so there are ceil(N / W) Python-level steps, not N. Each lane costs its 64-bit final
state.

Since bundle version 4 the encoder writes the zstd-coded bitmap (bitmap.py) instead: about as small, and read
without a Python step per group of lanes (a global top-k of a LoRA update whose tensors differ in scale took
the coordinator 74-112 ms to read at 1/16 with rANS). Decoding stays, for older bundles; `encode` stays to make
test payloads.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CodecError

PRECISION = 24  # probabilities are f / 2**24
STATE_LOW = 1 << 31  # rANS state invariant: x in [2**31, 2**63)
MAX_STEPS = 4096  # bounds the Python-level loop; the decoder rejects payloads that need more
SYMBOL_BITS = 16
_POPCOUNT = np.unpackbits(np.arange(1 << 16, dtype=">u2").view(np.uint8)).reshape(-1, 16).sum(1).astype(np.int64)
_CLASS_SIZES = [math.comb(SYMBOL_BITS, c) for c in range(SYMBOL_BITS + 1)]
# Words ordered by (class, value): the cumulative frequency of a word is then class_start[c] + rank * f[c],
# so coding needs 17-entry tables, not 65536-entry ones, and decoding finds the class by a 17-way search.
_BY_CLASS = np.argsort(_POPCOUNT, kind="stable")
_CLASS_OFFSET = np.concatenate([[0], np.cumsum(_CLASS_SIZES)]).astype(np.int64)
_RANK = np.empty(1 << 16, np.int64)
_RANK[_BY_CLASS] = np.arange(1 << 16) - _CLASS_OFFSET[_POPCOUNT[_BY_CLASS]]
TABLE_BYTES = 4 * (SYMBOL_BITS + 1)
_U32 = np.uint64(0xFFFFFFFF)
_MASK = np.uint64((1 << PRECISION) - 1)


def class_frequencies(p: float) -> list[int] | None:
    """f[c] >= 1 with sum(C(16,c) f[c]) == 2**24, near 2**24 p^c (1-p)^(16-c); None if not representable.

    Classes are rounded in turn, each absorbing the rounding carried from the ones before, and the last
    class has C(16,c) = 1 so it takes the exact remainder; it is the likelier of the all-zero and all-one
    words, whose share is at least 2**-16, far above the carry.
    """
    total = 1 << PRECISION
    order = list(range(SYMBOL_BITS, -1, -1) if p <= 0.5 else range(SYMBOL_BITS + 1))
    freqs = [0] * (SYMBOL_BITS + 1)
    ideal_so_far, assigned = 0.0, 0
    for c in order[:-1]:
        ideal_so_far += total * _CLASS_SIZES[c] * p ** c * (1 - p) ** (SYMBOL_BITS - c)
        freqs[c] = max(1, round((ideal_so_far - assigned) / _CLASS_SIZES[c]))
        assigned += _CLASS_SIZES[c] * freqs[c]
    last = order[-1]
    freqs[last] = total - assigned
    return freqs if freqs[last] >= 1 else None


def _tables(freqs: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its frequency per word and the cumulative frequency where the class begins."""
    f = np.asarray(freqs, np.uint64)
    class_start = np.zeros(f.size + 1, np.uint64)
    np.cumsum(f * np.asarray(_CLASS_SIZES, np.uint64), out=class_start[1:])
    return f, class_start


def _words(indices: np.ndarray, n: int) -> np.ndarray:
    n_words = -(-n // SYMBOL_BITS)
    bitmap = np.zeros(n_words * SYMBOL_BITS, np.uint8)
    bitmap[indices] = 1
    return np.packbits(bitmap).view(">u2").astype(np.int64)


def encode(indices: np.ndarray, n: int, lanes: int) -> bytes | None:
    """Payload = 17 x u32 class frequencies, `lanes` x u64 final states, then u32 words; None if p is too
    extreme for the table (the Golomb coder is then far smaller anyway)."""
    freqs = class_frequencies(indices.size / n)
    if freqs is None:
        return None
    f_class, class_start = _tables(freqs)
    symbols = _words(indices, n)
    classes = _POPCOUNT[symbols]
    f_of = f_class[classes]
    start_of = class_start[classes] + _RANK[symbols].astype(np.uint64) * f_of
    steps = -(-symbols.size // lanes)
    x = np.full(lanes, STATE_LOW, np.uint64)
    emitted = []
    for t in range(steps - 1, -1, -1):  # rANS encodes backwards so the decoder runs forwards
        s = slice(t * lanes, min((t + 1) * lanes, symbols.size))
        xa, f = x[:s.stop - s.start], f_of[s]
        spill = xa >= f << np.uint64(63 - PRECISION)  # x_max = ((L >> PRECISION) << 32) * f
        emitted.append((xa[spill] & _U32).astype("<u4"))
        xa[spill] >>= np.uint64(32)
        quotient, remainder = np.divmod(xa, f)
        x[:xa.size] = (quotient << np.uint64(PRECISION)) + remainder + start_of[s]
    words = np.concatenate(emitted[::-1])
    return np.asarray(freqs, "<u4").tobytes() + x.astype("<u8").tobytes() + words.tobytes()


def decode(payload: bytes, lanes: int, n: int, k: int) -> np.ndarray:
    n_words = -(-n // SYMBOL_BITS)
    if not -(-n_words // MAX_STEPS) <= lanes <= n_words:
        raise CodecError(f"index_param: rans lanes={lanes} outside [{-(-n_words // MAX_STEPS)}, {n_words}]")
    body = len(payload) - TABLE_BYTES - 8 * lanes
    if body < 0 or body % 4:
        raise CodecError(f"index_payload: rans payload of {len(payload)} bytes does not fit {lanes} lanes")
    freqs = np.frombuffer(payload, "<u4", SYMBOL_BITS + 1).astype(np.int64)
    if freqs.min() < 1 or sum(c * int(f) for c, f in zip(_CLASS_SIZES, freqs)) != 1 << PRECISION:
        raise CodecError("index_payload: rans class frequencies do not sum to 2**24")
    f_class, class_start = _tables([int(f) for f in freqs])
    x = np.frombuffer(payload, "<u8", lanes, TABLE_BYTES).astype(np.uint64)
    if x.min() < STATE_LOW or x.max() >= 1 << 63:
        raise CodecError("index_payload: rans state outside [2**31, 2**63)")
    words = np.frombuffer(payload, "<u4", body // 4, TABLE_BYTES + 8 * lanes).astype(np.uint64)
    symbols = np.empty(n_words, np.int64)
    pos = 0
    for t in range(-(-n_words // lanes)):
        xa = x[:min(lanes, n_words - t * lanes)]
        slot = xa & _MASK
        c = np.searchsorted(class_start, slot, side="right") - 1
        f = f_class[c]
        rank, offset = np.divmod(slot - class_start[c], f)
        symbols[t * lanes:t * lanes + xa.size] = _BY_CLASS[_CLASS_OFFSET[c] + rank.astype(np.int64)]
        xa = f * (xa >> np.uint64(PRECISION)) + offset
        refill = np.flatnonzero(xa < STATE_LOW)
        if pos + refill.size > words.size:
            raise CodecError("index_payload: rans word stream truncated")
        xa[refill] = (xa[refill] << np.uint64(32)) | words[pos:pos + refill.size]
        pos += refill.size
        x[:xa.size] = xa
    if pos != words.size or np.any(x != STATE_LOW):  # the encoder started every lane at STATE_LOW
        raise CodecError("index_payload: rans stream does not end where the encoder began")
    return _indices(symbols, n, k)


def _indices(symbols: np.ndarray, n: int, k: int) -> np.ndarray:
    if int(_POPCOUNT[symbols].sum()) != k:
        raise CodecError(f"count: rans bitmap holds {int(_POPCOUNT[symbols].sum())} indices, count says {k}")
    bits = np.unpackbits(symbols.astype(">u2").view(np.uint8))
    if bits[n:].any():
        raise CodecError(f"index_payload: rans bitmap sets a position >= n={n}")
    return np.flatnonzero(bits.view(bool)).astype(np.int64)
