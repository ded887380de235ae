"""The joint index stream as byte gaps through zstd (index coder 4, bundle version 4): fast to read, for a
small price in size where the gaps are short.

Gap g = idx[i] - idx[i-1] - 1 (from -1 at each tensor's start) is written as one byte min(g, 255), every
tensor's gaps in table order; each gap of 255 or more is followed up, after the k bytes, by g - 255 as a
little-endian u64, in order. The whole is one zstd frame. zstd's entropy stage codes the bytes close to
their order-0 entropy, which for the near-geometric gaps of a top-k is within a percent of Golomb's
size at densities 1/4 to 1/64 (at the ends through zstd's optimal parser: `encode`), and its decoder runs in
compiled code: reading 305,280 indices took
0.27 ms against Golomb's 2.3 ms in numpy (a 1/16 upload of SmolLM2's LoRA, FORMAT.md). Where the gaps are
longer or shorter, or the tensors' densities differ (one zstd table for all of them, where Golomb has a
parameter per tensor: 18-22 % larger on a LoRA update whose tensors differ in scale), the byte form loses
more, so the encoder keeps it only within `SLACK` of Golomb's size.
"""
from __future__ import annotations

import numpy as np

from . import zstd_frame
from .errors import CodecError

ESCAPE = 255  # a gap byte of 255 says "255 or more; the rest follows the bytes"
SLACK = 0.01  # the byte form is written where it is at most 1 % larger than the Golomb stream
FIELD = "joint index stream"


def encode(gaps: list[np.ndarray], level: int, bound: float = float("inf")) -> bytes:
    """One zstd frame of every tensor's gaps (each array: one tensor's, in order), at `level`; where that frame
    is over `bound` bytes, the optimal parser's instead if smaller (zstd_frame.compress_optimal: short gaps,
    density 1/4 and up, repeat 7-byte runs by chance, and a fast level's matches on them cost more than they
    save)."""
    g = np.concatenate(gaps)
    content = np.minimum(g, ESCAPE).astype(np.uint8).tobytes()
    content += (g[g >= ESCAPE] - ESCAPE).astype("<u8").tobytes()
    frame = zstd_frame.compress(content, level, zstd_frame.ENTROPY_MIN_MATCH)
    return frame if len(frame) <= bound else min(frame, zstd_frame.compress_optimal(content), key=len)


def decode(frame: bytes, ns: np.ndarray, counts: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Every tensor's local indices plus its offset (default 0: the local indices), concatenated in order, from
    a byte-gap stream; tensor i has counts[i] >= 1 indices in [0, ns[i]) (the caller checked the counts).
    CodecError names the part at fault."""
    ns, counts = np.asarray(ns, np.int64), np.asarray(counts, np.int64)
    k = int(counts.sum())
    declared = zstd_frame.content_size(frame, FIELD)
    if not k <= declared <= 9 * k or (declared - k) % 8:  # checked before anything is allocated
        raise CodecError(f"{FIELD}: zstd frame declares {declared} bytes; {k} gap bytes and their u64 escapes "
                         f"take {k} + 8 x (at most {k})")
    raw = zstd_frame.decompress(frame, declared, FIELD)
    small = np.frombuffer(raw, np.uint8, count=k)
    escaped = np.flatnonzero(small == ESCAPE)
    if 8 * escaped.size != declared - k:
        raise CodecError(f"{FIELD}: {escaped.size} gap bytes say 255 or more, the frame carries "
                         f"{(declared - k) // 8} u64 remainders")
    steps = np.add(small, 1, dtype=np.int64)  # index i is the sum of (gap + 1) over its tensor's gaps to i, less 1
    if escaped.size:
        rest = np.frombuffer(raw, "<u8", offset=k)
        if int(rest.max()) > int(ns.max()):  # also keeps the sums below from overflowing
            raise CodecError(f"{FIELD}: a gap of {ESCAPE + int(rest.max())} runs past every tensor's n")
        steps[escaped] += rest.astype(np.int64)
    firsts = np.zeros(counts.size, np.int64)
    np.cumsum(counts[:-1], out=firsts[1:])
    spans = np.add.reduceat(steps, firsts)  # tensor i's last index is spans[i] - 1
    if (spans > ns).any():
        bad = int(np.flatnonzero(spans > ns)[0])
        raise CodecError(f"{FIELD}: index {int(spans[bad]) - 1} of the stream's tensor {bad} >= n={int(ns[bad])}")
    # one running sum gives every tensor's indices plus its offset: each tensor's first step jumps from the
    # previous tensor's last index plus offset to its own offset
    offsets = np.zeros(counts.size, np.int64) if offsets is None else np.asarray(offsets, np.int64)
    steps[firsts[1:]] += offsets[1:] - offsets[:-1] - spans[:-1]
    steps[0] += offsets[0] - 1
    np.cumsum(steps, out=steps)
    return steps
