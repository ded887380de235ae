"""zstd frames that always carry their content size and a checksum, and are opened only after checking both.

A frame's header declares its decompressed size; it is compared with the size the bundle header implies
(and with the caller's cap) before anything is allocated, so a small frame cannot inflate to gigabytes.
"""
from __future__ import annotations

import threading

import zstandard

from .errors import CodecError

_MAGIC = b"\x28\xb5\x2f\xfd"
# zstandard's (de)compressor objects are not thread-safe, and the server decodes uploads in several gRPC
# pool threads at once: sharing one corrupted concurrent decodes. One decompressor per thread.
_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    return d


ENTROPY_MIN_MATCH = 7  # for data whose bytes are independent draws (index gaps, a bitmap): LZ matches shorter
# than 7 bytes cost more than they save there (gap bytes at density 1/4: +18 % with zstd's default of 3, +5 %
# with 7), so the entropy stage is left to code them


# what every frame of ours carries, whichever parameters made it (content_size checks them on read)
_FRAME_FLAGS = dict(write_checksum=1, write_content_size=1, write_dict_id=0)


def compress(data: bytes, level: int, min_match: int | None = None) -> bytes:
    """One frame with its content size and checksum; min_match (ENTROPY_MIN_MATCH for index streams) overrides
    the level's shortest LZ match."""
    try:
        if min_match is None:
            compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True,
                                                  write_dict_id=False)
        else:
            compressor = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
                level, min_match=min_match, **_FRAME_FLAGS))
        return compressor.compress(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"level: zstd rejected level {level}: {exc}") from None


# zstd's optimal parser (btopt) in a 128 KiB window: it takes an LZ match only where the match saves bits, so bytes
# that are independent draws are left to the entropy stage. Gap bytes at density 1/4 (SmolLM2's LoRA, 1.2M
# indices): 0.7 % above Golomb's size in 28 ms, against +4.8 % at level 3 with ENTROPY_MIN_MATCH (chance matches
# of 7 bytes are common among ~10 symbols) and 0.7 % in 150-220 ms at levels 16-19.
OPTIMAL_PARSER = dict(window_log=17, chain_log=10, hash_log=10, search_log=1, min_match=ENTROPY_MIN_MATCH,
                      target_length=999, strategy=7)


def compress_optimal(data: bytes) -> bytes:
    """One frame of `data` with its content size and checksum, through zstd's optimal parser (OPTIMAL_PARSER)."""
    params = zstandard.ZstdCompressionParameters(**OPTIMAL_PARSER, **_FRAME_FLAGS)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def content_size(frame: bytes, field: str) -> int:
    """The decompressed size the frame declares; frames without one, or without a checksum, are rejected."""
    if frame[:4] != _MAGIC:
        raise CodecError(f"{field}: not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{field}: bad zstd frame header: {exc}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise CodecError(f"{field}: zstd frame does not declare its content size")
    if not params.has_checksum:
        raise CodecError(f"{field}: zstd frame has no checksum")
    if params.dict_id:
        raise CodecError(f"{field}: zstd frame needs a dictionary")
    return params.content_size


def decompress(frame: bytes, expected_size: int, field: str) -> bytes:
    """Exactly one frame of exactly `expected_size` bytes, checked before decompressing."""
    declared = content_size(frame, field)
    if declared != expected_size:
        raise CodecError(f"{field}: zstd frame declares {declared} bytes, header implies {expected_size}")
    try:
        # One-shot decompression writes into a buffer of the declared size and fails if the data runs past it.
        out = _decompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{field}: corrupt zstd frame: {exc}") from None
    if len(out) != expected_size:
        raise CodecError(f"{field}: zstd frame gave {len(out)} bytes, header implies {expected_size}")
    return out
