"""The versioned bundle: named tensors <-> bytes. FORMAT.md specifies the layout byte by byte.

    magic "ELCB" | version u8 | flags u8 | reserved u16 | header_size u32 | header (zstd frame)
    | side payload of each tensor (indices, then block scales) | value planes 0..3 (each raw or one zstd frame)
    | crc32 u32 of everything before it
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Mapping

import numpy as np

from . import zstd_frame
from .errors import CodecError
from .header import DENSE, MASKED, SPARSE, ZSTD, Entry, Table, pack_header, parse_header, version_of
from .index_coding import decode_indices, encode_indices
from .mask import mask_size
from .tensors import Dense, Masked, Sparse, Tensor
from .values import (BLOCK_TYPES, DEFAULT_BLOCK, MAX_BLOCK, check_rounding, check_value_type, decode_values,
                     encode_values, pack_planes, plane_sizes, scale_bytes, unpack_planes)

MAGIC = b"ELCB"
VERSION = 2  # the newest this codec writes and reads; it writes 1 when no tensor needs 2
VERSIONS = (1, 2)
DEFAULT_MAX_ELEMENTS = 1 << 28
MAX_HEADER_BYTES = 1 << 24
_PREAMBLE = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, header_size
_TRAILER = 4  # crc32


def encode_bundle(tensors: Mapping[str, Tensor], *, value_type: str = "float32", level: int = 3,
                  value_types: Mapping[str, str] | None = None, block_size: int = DEFAULT_BLOCK,
                  rounding: str = "nearest", seed: int | None = None) -> bytes:
    """Bytes of `tensors` in insertion order. `value_types` overrides `value_type` for the names it lists.

    block_size: values per scale of the blockwise types. rounding: "nearest", or "stochastic" for the int8
    types, whose draws come from numpy's Generator seeded with `seed` (required), so an encoding is
    reproducible."""
    check_value_type(value_type)
    check_rounding(rounding)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not 1 <= block_size <= MAX_BLOCK:
        raise CodecError(f"block_size: {block_size!r} must be an int in [1, {MAX_BLOCK}]")
    if rounding == "stochastic" and not (isinstance(seed, int) and seed >= 0):
        raise CodecError(f"seed: stochastic rounding needs a non-negative int seed, got {seed!r}")
    rng = np.random.default_rng(seed) if rounding == "stochastic" else None
    overrides = dict(value_types or {})
    unknown = set(overrides) - set(tensors)
    if unknown:
        raise CodecError(f"value_types: names not in the bundle: {sorted(unknown)}")
    if not isinstance(level, int) or isinstance(level, bool):
        raise CodecError(f"level: must be an int, got {level!r}")
    entries, index_payloads, stored = [], [], []
    for name, t in tensors.items():
        vt = check_value_type(overrides.get(name, value_type), f"value_types[{name!r}]")
        entry, index_payload, values = _encode_tensor(name, t, vt)
        stored_values, entry.scale, scales = encode_values(values, vt, name, block_size=block_size,
                                                           rounding=rounding, rng=rng)
        entry.block_size = block_size if vt in BLOCK_TYPES else 0
        entries.append(entry)
        index_payloads.append(index_payload + scales)
        stored.append(stored_values)
    table, planes = Table(entries), pack_planes(stored)
    for j, plane in enumerate(planes):
        packed = zstd_frame.compress(plane, level)
        if len(packed) < len(plane):  # zstd only where it helps
            table.plane_codecs[j], planes[j] = ZSTD, packed
        table.plane_sizes[j] = len(planes[j])
    return assemble(table, index_payloads, b"".join(planes), level=level)


def assemble(table: Table, side_payloads: list[bytes], values_section: bytes, *, level: int = 3,
             header_frame: bytes | None = None, preamble: tuple | None = None) -> bytes:
    """Lay out a bundle from its parts (preamble: magic, version, flags, reserved; by default the version
    the table needs). Tests and the fuzzer pass odd parts to reach each check."""
    preamble = (MAGIC, version_of(table), 0, 0) if preamble is None else preamble
    frame = zstd_frame.compress(pack_header(table), level) if header_frame is None else header_frame
    body = _PREAMBLE.pack(*preamble, len(frame)) + frame + b"".join(side_payloads) + values_section
    return body + struct.pack("<I", zlib.crc32(body))


def take_apart(data: bytes) -> tuple[Table, list[bytes], bytes]:
    """Inverse of assemble for a well-formed bundle: table, side payload per tensor (index bytes, then block
    scales), stored value planes."""
    (header_size,) = struct.unpack_from("<I", data, 8)
    frame = data[_PREAMBLE.size:_PREAMBLE.size + header_size]
    table = parse_header(zstd_frame.decompress(frame, zstd_frame.content_size(frame, "header"), "header"),
                         DEFAULT_MAX_ELEMENTS)
    side_payloads, pos = [], _PREAMBLE.size + header_size
    for e in table.entries:
        size = e.index_size + scale_bytes(e.value_type, e.count, e.block_size)
        side_payloads.append(data[pos:pos + size])
        pos += size
    return table, side_payloads, data[pos:len(data) - _TRAILER]


def decode_bundle(data: bytes | bytearray, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """Tensors in bundle order. Trusts nothing: any violation raises CodecError naming the field.

    max_elements caps the sum over tensors of their element counts (prod(shape)), which bounds every
    allocation decoding makes.
    """
    if not isinstance(data, (bytes, bytearray)):  # a bytearray (the server's upload buffer) is read in place
        data = bytes(data)
    table, body = _open(data, max_elements)
    side_sizes = [e.index_size + scale_bytes(e.value_type, e.count, e.block_size) for e in table.entries]
    index_total = sum(side_sizes)
    if index_total + sum(table.plane_sizes) != len(body):
        raise CodecError(f"index_size/plane_size: payload sizes (with block scales) do not add up to the "
                         f"{len(body)} body bytes")
    types, counts = [e.value_type for e in table.entries], [e.count for e in table.entries]
    planes, pos = [], index_total
    for j, expected in enumerate(plane_sizes(types, counts)):
        plane = bytes(body[pos:pos + table.plane_sizes[j]])
        pos += table.plane_sizes[j]
        if table.plane_codecs[j] == ZSTD:
            plane = zstd_frame.decompress(plane, expected, f"plane[{j}]")
        elif len(plane) != expected:
            raise CodecError(f"plane_size[{j}]: {len(plane)} raw bytes, the table implies {expected}")
        planes.append(plane)
    stored = unpack_planes(planes, types, counts)
    out, pos = {}, 0
    for e, s, size in zip(table.entries, stored, side_sizes):
        side = bytes(body[pos:pos + size])
        out[e.name] = _decode_tensor(e, side[:e.index_size], s, side[e.index_size:])
        pos += size
    return out


def _open(data: bytes, max_elements: int) -> tuple[Table, memoryview]:
    """Check the preamble and checksum, and parse the table; returns it and the body after the header."""
    if len(data) < _PREAMBLE.size + _TRAILER:
        raise CodecError(f"length: {len(data)} bytes is shorter than the smallest bundle")
    magic, version, flags, reserved, header_size = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"magic: {magic!r} is not {MAGIC!r}")
    if version not in VERSIONS:
        raise CodecError(f"version: {version} is not supported (this codec reads {VERSIONS})")
    if flags or reserved:
        raise CodecError(f"flags: reserved bits set ({flags}, {reserved})")
    if header_size > len(data) - _PREAMBLE.size - _TRAILER:
        raise CodecError(f"header_size: {header_size} runs past the end of the bundle")
    (crc,) = struct.unpack_from("<I", data, len(data) - _TRAILER)
    if zlib.crc32(memoryview(data)[:-_TRAILER]) != crc:
        raise CodecError("crc32: bundle checksum mismatch")
    frame = data[_PREAMBLE.size:_PREAMBLE.size + header_size]
    declared = zstd_frame.content_size(frame, "header")
    if declared > MAX_HEADER_BYTES:
        raise CodecError(f"header: declares {declared} bytes, more than {MAX_HEADER_BYTES}")
    table = parse_header(zstd_frame.decompress(frame, declared, "header"), max_elements, version)
    return table, memoryview(data)[_PREAMBLE.size + header_size:len(data) - _TRAILER]


def _encode_tensor(name: str, t: Tensor, value_type: str) -> tuple[Entry, bytes, np.ndarray]:
    """The table entry, index payload (empty unless Sparse) and flat float32 values of one tensor."""
    if not isinstance(name, str):
        raise CodecError(f"name: must be str, got {type(name).__name__}")
    try:
        if len(name.encode("utf-8")) > 0xFFFF:
            raise CodecError(f"name: {name[:40]!r}... is longer than 65535 bytes")
    except UnicodeEncodeError:
        raise CodecError(f"name: {name!r} is not encodable as UTF-8") from None
    if isinstance(t, Dense):
        values = _finite_float32(t.values, name)
        return Entry(name, DENSE, value_type, values.shape, values.size), b"", values.reshape(-1)
    if isinstance(t, Sparse):
        shape = _shape(t.shape, name)
        indices = _sorted_indices(t.indices, math.prod(shape), name)
        values = _finite_float32(t.values, name).reshape(-1)
        if values.size != indices.size:
            raise CodecError(f"{name}: values: {values.size} values for {indices.size} indices")
        coder, param, payload = encode_indices(indices, math.prod(shape))
        entry = Entry(name, SPARSE, value_type, shape, indices.size, index_coder=coder, index_param=param,
                      index_size=len(payload))
        return entry, payload, values
    if isinstance(t, Masked):
        shape = _shape(t.shape, name)
        seed, density = _seed(t.seed, name), _density(t.density, name)
        values = _finite_float32(t.values, name).reshape(-1)
        if values.size != mask_size(shape, density):
            raise CodecError(f"{name}: values: {values.size} values, the mask has {mask_size(shape, density)}")
        return Entry(name, MASKED, value_type, shape, values.size, seed=seed, density=density), b"", values
    raise CodecError(f"{name}: form: {type(t).__name__} is not Dense, Sparse or Masked")


def _decode_tensor(e: Entry, index_bytes: bytes, stored: np.ndarray, scales: bytes) -> Tensor:
    values = decode_values(stored, e.value_type, e.scale, e.name, count=e.count, block_size=e.block_size,
                           scales=scales)
    if e.form == DENSE:
        return Dense(values.reshape(e.shape))
    if e.form == MASKED:
        return Masked(e.shape, e.seed, e.density, values)
    try:
        indices = decode_indices(e.index_coder, e.index_param, index_bytes, math.prod(e.shape), e.count)
    except CodecError as exc:
        raise CodecError(f"{e.name}: {exc}") from None
    return Sparse(e.shape, indices, values)


def _shape(shape, name: str) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"{name}: shape: {shape!r} is not a sequence") from None
    if len(dims) > 32 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 <= d < 1 << 63
                                 for d in dims):
        raise CodecError(f"{name}: shape: {shape!r} must be at most 32 non-negative ints")
    return tuple(int(d) for d in dims)


def _finite_float32(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise CodecError(f"{name}: values: dtype {arr.dtype} is not real numeric")
    if arr.ndim > 32:
        raise CodecError(f"{name}: shape: {arr.ndim} dimensions, at most 32")
    with np.errstate(over="ignore"):
        arr = np.asarray(arr, np.float32, order="C")  # ascontiguousarray would make scalars 1-D
    if not np.isfinite(arr).all():
        raise CodecError(f"{name}: values: NaN or Inf (or beyond float32)")
    return arr


def _sorted_indices(indices, n: int, name: str) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise CodecError(f"{name}: indices: must be a 1-D integer array")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise CodecError(f"{name}: indices: outside [0, {n})")
    idx = idx.astype(np.int64)
    if np.any(np.diff(idx) <= 0):
        raise CodecError(f"{name}: indices: not strictly increasing (sorted and unique)")
    return idx


def _seed(seed, name: str) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 1 << 64:
        raise CodecError(f"{name}: seed: {seed!r} must be an int in [0, 2**64)")
    return int(seed)


def _density(density, name: str) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise CodecError(f"{name}: density: {density!r} is not a number") from None
    if not 0.0 <= d <= 1.0:  # also false for NaN
        raise CodecError(f"{name}: density: {density!r} outside [0, 1]")
    return d
