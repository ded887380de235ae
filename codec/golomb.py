"""Golomb coding of the gaps between sorted indices, laid out as three streams so decoding is vectorised.

A uniformly random k-subset of n positions has gaps g = idx[i] - idx[i-1] - 1 close to geometric with
p = k/n, and the Golomb code with the right m is the optimal prefix code for a geometric source (Gallager &
Van Voorhis, IEEE Trans. IT 21(2), 1975): within 2% of the bound log2(C(n,k))/k for p <= 0.34, 4% worst at
p ~ 0.38 (where the rANS bitmap coder takes over). Gap g is quotient q = g // m in unary (q zeros, then a one)
and remainder r = g % m in truncated binary: with b = ceil(log2 m) and u = 2**b - m, r < u takes b-1 bits,
others take b bits as r + u. Writing every codeword's first b-1 bits in one fixed-width stream, the b-th
bits in a second and the unary parts in a third gives exactly the Golomb bit count, but each stream decodes
with whole-array numpy operations (no per-element loop).
"""
from __future__ import annotations

import math

import numpy as np

from .bits import fixed_width_bits, read_fixed_width
from .errors import CodecError


def gaps_of(indices: np.ndarray) -> np.ndarray:
    return np.diff(indices, prepend=np.int64(-1)) - 1


def _layout(m: int) -> tuple[int, int]:
    """(b, u): remainder width b = ceil(log2 m) and the truncated-binary threshold u = 2**b - m."""
    b = (m - 1).bit_length()
    return b, (1 << b) - m


def golomb_bits(gaps: np.ndarray, m: int) -> int:
    """Exact payload size in bits of the gaps under parameter m (before byte padding)."""
    b, u = _layout(m)
    k = gaps.size
    if b == 0:
        return int(gaps.sum()) + k
    quotients, remainders = np.divmod(gaps, m)
    return int(quotients.sum()) + k + k * (b - 1) + int(np.count_nonzero(remainders >= u))


def best_parameter(gaps: np.ndarray, n: int) -> int:
    """m minimising golomb_bits, searched around the geometric optimum ceil(log(1+q) / -log q), q = 1 - p
    (Gallager & Van Voorhis), on an evenly strided sample of at most 2**16 gaps to keep encoding fast."""
    k = gaps.size
    q = 1.0 - k / (n + 1)
    m0 = 1 if q <= 0.5 else max(1, math.ceil(math.log1p(q) / -math.log(q)))
    candidates = {max(1, min(n, m)) for m in (m0 - 1, m0, m0 + 1, m0 + 2)}
    sample = gaps[::max(1, k >> 16)]
    return min(sorted(candidates), key=lambda m: golomb_bits(sample, m))


def encode(gaps: np.ndarray, m: int) -> bytes:
    return encode_joint([gaps], [m])  # one tensor's stream is the joint stream of one


def decode(payload: bytes, m: int, n: int, k: int) -> np.ndarray:
    """Indices from a Golomb payload, checking every length; CodecError names the field at fault."""
    if not 1 <= m <= max(1, n):
        raise CodecError(f"index_param: golomb m={m} outside [1, {n}]")
    if k < 1:
        raise CodecError(f"count: {k} indices cannot fit in a golomb payload (it codes at least one)")
    return decode_joint(payload, np.array([m]), np.array([n]), np.array([k]))  # the joint stream of one


# -- the joint stream: several tensors' gaps, each tensor under its own m, in one stream ------------------------
def encode_joint(gaps: list[np.ndarray], ms: list[int]) -> bytes:
    """One stream for several tensors' gaps, tensor i's under parameter ms[i]: the three parts of `encode`,
    each holding every tensor's codewords in order, so the stream is exactly the tensors' Golomb codes
    regrouped (FORMAT.md, "The joint index stream")."""
    layouts = [_layout(m) for m in ms]
    first, extra, unary = [], [], []
    for g, m, (b, u) in zip(gaps, ms, layouts):
        quotients, remainders = np.divmod(g, m)
        ones = np.cumsum(quotients + 1) - 1
        bits = np.zeros(int(ones[-1]) + 1 if ones.size else 0, np.uint8)
        bits[ones] = 1
        unary.append(bits)
        if b:
            long_code = remainders >= u
            first.append(fixed_width_bits(np.where(long_code, (remainders + u) >> 1, remainders), b - 1))
            extra.append(((remainders[long_code] + u) & 1).astype(np.uint8))
    return np.packbits(np.concatenate(first + extra + unary)).tobytes()


CHUNK = 1 << 15  # decode_joint works through tensors about this many indices at a time (its arrays stay in cache)


def decode_joint(payload: bytes, ms: np.ndarray, ns: np.ndarray, counts: np.ndarray,
                 offsets: np.ndarray | None = None) -> np.ndarray:
    """Every tensor's local indices plus its offset (default 0), concatenated in order (tensor i's are the
    counts[i] after the earlier tensors'), from a joint stream; each tensor has counts[i] >= 1 indices in
    [0, ns[i]) under parameter ms[i] in [1, ns[i]], which the caller has checked. CodecError names the part
    at fault.

    Whole-array operations over runs of whole tensors of about CHUNK indices: over all k at once each step
    would stream arrays of k int64 through memory, which costs more per index than a step per tensor."""
    ms, ns, counts = (np.asarray(a, np.int64) for a in (ms, ns, counts))
    k = int(counts.sum())
    if k > 8 * len(payload):  # every index costs at least its unary one-bit
        raise CodecError(f"count: {k} indices cannot fit in {len(payload)} golomb bytes")
    packed = np.frombuffer(payload + bytes(4), np.uint8)
    wide = packed.astype(np.uint32)  # the 32 bits from each byte on, native (a strided big-endian view
    windows = wide[:-3] << 24 | wide[1:-2] << 16 | wide[2:-1] << 8 | wide[3:]  # gathers 4x slower)
    bits = np.unpackbits(packed[:len(payload)])
    b = np.zeros(ms.size, np.int64)  # ceil(log2 m), one bit of every m at a time
    rest = ms - 1
    while (live := rest > 0).any():
        b += live
        rest >>= 1
    u = (np.int64(1) << b) - ms
    width = np.maximum(b - 1, 0)
    field_end = np.cumsum(width * counts)  # part 1: tensor i's fields end here
    if int(field_end[-1]) > bits.size:
        raise CodecError("index_payload: golomb remainder stream truncated")
    seg = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=seg[1:])
    chunks = _chunks(seg)
    remainders = np.empty(k, np.int64)
    extra_at = int(field_end[-1])
    for ta, tb in chunks:
        c = counts[ta:tb]
        w = width[ta:tb]
        start = int(field_end[ta] - w[0] * c[0])
        if (w == w[0]).all():
            first = read_fixed_width(bits[start:], int(c.sum()), int(w[0]))
        elif int(w.max()) <= 25:  # each field inside the 32 bits from its first byte: one gather a field
            wrep = np.repeat(w.astype(np.uint32), c)
            at = np.cumsum(wrep, dtype=np.int64)
            at -= wrep
            at += start
            win = windows[at >> 3]
            win <<= (at & 7).astype(np.uint32)
            wrep = np.uint32(32) - wrep
            win >>= wrep  # a width-0 field (m <= 2) shifts by 32, which numpy makes 0 (C leaves it undefined)
            first = win.astype(np.int64)
        else:
            first = _fields(bits, start, w, c)
        urep = np.repeat(u[ta:tb], c)
        long_code = first >= urep
        long_code &= np.repeat(b[ta:tb] > 0, c)
        at_long = np.flatnonzero(long_code)
        n_extra = at_long.size
        if extra_at + n_extra > bits.size:
            raise CodecError("index_payload: golomb extra-bit stream truncated")
        if n_extra:  # the i-th long code takes the i-th extra bit: r = 2 v + bit - u
            v = first[at_long]
            v <<= 1
            v += bits[extra_at:extra_at + n_extra]
            v -= urep[at_long]
            first[at_long] = v
        remainders[seg[ta]:seg[tb]] = first
        extra_at += n_extra
    ones = np.flatnonzero(bits[extra_at:].view(bool))
    if ones.size != k:
        raise CodecError(f"index_payload: golomb unary stream has {ones.size} terminators, count says {k}")
    if bits.size - extra_at - int(ones[-1]) - 1 >= 8:
        raise CodecError("index_payload: golomb payload longer than its codes")
    local = np.empty(k, np.int64)
    for ta, tb in chunks:
        c, off = counts[ta:tb], seg[ta:tb] - seg[ta]
        run = ones[seg[ta] - (seg[ta] > 0):seg[tb]]  # the one before the chunk's first, where there is one
        quotients = np.diff(run) - 1 if seg[ta] else np.diff(run, prepend=np.int64(-1)) - 1
        q_sums = np.add.reduceat(quotients, off)
        # checked before any product that could overflow int64: every tensor's gaps fit inside it
        over = q_sums > (ns[ta:tb] - c) // ms[ta:tb]
        if over.any():
            bad = ta + int(np.flatnonzero(over)[0])
            raise CodecError(f"index_payload: golomb gaps of the stream's tensor {bad} run past n={int(ns[bad])}")
        steps = quotients * np.repeat(ms[ta:tb], c)
        steps += remainders[seg[ta]:seg[tb]]
        steps += 1
        np.cumsum(steps, out=steps)
        before = np.zeros(tb - ta, np.int64)
        before[1:] = steps[off[1:] - 1]
        before += 1
        last = steps[off + c - 1] - before
        if offsets is not None:
            before -= offsets[ta:tb]
        steps -= np.repeat(before, c)
        if (last >= ns[ta:tb]).any():
            bad = int(np.flatnonzero(last >= ns[ta:tb])[0])
            raise CodecError(f"index_payload: golomb index {int(last[bad])} of the stream's tensor {ta + bad} >= "
                             f"n={int(ns[ta + bad])}")
        local[seg[ta]:seg[tb]] = steps
    return local


def _chunks(seg: np.ndarray) -> list[tuple[int, int]]:
    """Runs [ta, tb) of whole tensors holding at most CHUNK indices (a larger tensor is a run alone); seg[i]
    is where tensor i's indices begin."""
    out, ta, tensors = [], 0, seg.size - 1
    while ta < tensors:
        tb = int(np.searchsorted(seg, seg[ta] + CHUNK, side="right")) - 1
        tb = min(max(tb, ta + 1), tensors)
        out.append((ta, tb))
        ta = tb
    return out


def _fields(bits: np.ndarray, start: int, widths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Part 1's fields of a run of tensors, from bit `start`: tensor i has counts[i] fields of widths[i] bits."""
    if (widths == widths[0]).all():  # one width: one reshape
        return read_fixed_width(bits[start:], int(counts.sum()), int(widths[0]))
    first_bit = start + np.cumsum(widths * counts) - widths * counts  # each tensor's first field
    before = np.cumsum(counts) - counts  # each tensor's first index in the run
    width = np.repeat(widths, counts)
    at = np.repeat(first_bit - before * widths, counts) + np.arange(width.size) * width
    first = np.zeros(width.size, np.int64)
    for j in range(int(widths.max())):  # bit j of every field at least j + 1 wide
        live = width > j
        first <<= live
        first |= np.take(bits, np.minimum(at + j, bits.size - 1)) & live
    return first
