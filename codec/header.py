"""The bundle's tensor table: one entry per tensor, packed little-endian as FORMAT.md lays out byte by byte.

parse_header checks everything that can be checked without the payloads: enums, name uniqueness and
encoding, shape against the element cap, count against the shape, and the masked density and count.
Version 3 adds the joint index stream's size after the planes' records (FORMAT.md, "The joint index stream");
version 4 lets that stream be byte gaps (index coder 4) and a tensor's indices a zstd bitmap (index coder 5).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from .errors import CodecError
from .index_coding import CODER_NAMES, JOINT, JOINT_BYTES, JOINT_CODERS, NEEDS_VERSION
from .mask import mask_size
from .values import BLOCK_TYPES, MAX_BLOCK, N_PLANES, VALUE_TYPES

DENSE, SPARSE, MASKED = 0, 1, 2
RAW, ZSTD = 0, 1
MAX_NDIM = 32


@dataclass
class Entry:
    name: str
    form: int
    value_type: str
    shape: tuple[int, ...]
    count: int  # number of values carried
    seed: int = 0  # masked only
    density: float = 0.0  # masked only
    index_coder: int = 0  # sparse only
    index_param: int = 0  # sparse only
    index_size: int = 0  # sparse only: bytes of the index payload
    scale: float = 0.0  # int8 only
    block_size: int = 0  # blockwise types only: values per scale


@dataclass
class Table:
    entries: list[Entry]
    plane_codecs: list[int] = field(default_factory=lambda: [RAW] * N_PLANES)  # RAW bytes or one ZSTD frame
    plane_sizes: list[int] = field(default_factory=lambda: [0] * N_PLANES)  # bytes of each plane as stored
    joint_size: int = 0  # version 3: bytes of the joint index stream of the entries whose index_coder is joint

    @property
    def joint(self) -> list[Entry]:
        return [e for e in self.entries if e.form == SPARSE and e.index_coder in JOINT_CODERS]


def pack_header(table: Table) -> bytes:
    out = [struct.pack("<I", len(table.entries))]
    out += [struct.pack("<BQ", c, n) for c, n in zip(table.plane_codecs, table.plane_sizes)]
    if version_of(table) >= 3:
        out.append(struct.pack("<Q", table.joint_size))
    for e in table.entries:
        name = e.name.encode("utf-8")
        out.append(struct.pack("<H", len(name)) + name)
        out.append(struct.pack("<BBB", e.form, VALUE_TYPES.index(e.value_type), len(e.shape)))
        out.append(struct.pack(f"<{len(e.shape)}Q", *e.shape) + struct.pack("<Q", e.count))
        if e.form == MASKED:
            out.append(struct.pack("<Qd", e.seed, e.density))
        if e.form == SPARSE:
            out.append(struct.pack("<BQQ", e.index_coder, e.index_param, e.index_size))
        if e.value_type == "int8":
            out.append(struct.pack("<f", e.scale))
        if e.value_type in BLOCK_TYPES:
            out.append(struct.pack("<I", e.block_size))
    return b"".join(out)


def version_of(table: Table) -> int:
    """The oldest version that can say the table: 4 when the joint index stream is byte gaps or a tensor's
    indices are a zstd bitmap, 3 when the joint stream is Golomb codes, 2 when a tensor uses a blockwise value
    type, else 1 (older decoders do not know the newer features)."""
    return max([1] + [2 for e in table.entries if e.value_type in BLOCK_TYPES]
               + [NEEDS_VERSION[e.index_coder][0] for e in table.entries
                  if e.form == SPARSE and e.index_coder in NEEDS_VERSION])


_U16, _U32, _U64, _FORM = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<BBB")
_PLANE, _SPARSE, _MASKED, _SCALE = struct.Struct("<BQ"), struct.Struct("<BQQ"), struct.Struct("<Qd"), struct.Struct("<f")
_SHAPE_AND_COUNT = [struct.Struct(f"<{ndim + 1}Q") for ndim in range(MAX_NDIM + 1)]  # the dims, then count


class _Truncated(Exception):
    """The header ends inside `field` (parse_header turns it into the CodecError that names it)."""

    def __init__(self, field: str):
        self.field = field


def _take(s: struct.Struct, data: bytes, pos: int, field: str) -> tuple:
    if pos + s.size > len(data):
        raise _Truncated(field)
    return s.unpack_from(data, pos)


def parse_header(data: bytes, max_elements: int, version: int = 2) -> Table:
    try:
        return _parse(data, max_elements, version)
    except _Truncated as t:
        raise CodecError(f"header: truncated at {t.field}") from None


def _parse(data: bytes, max_elements: int, version: int) -> Table:
    (n_tensors,) = _take(_U32, data, 0, "tensor_count")
    pos, codecs, sizes = 4, [], []
    for j in range(N_PLANES):
        codec, size = _take(_PLANE, data, pos, f"plane_codec[{j}]")
        pos += _PLANE.size
        if codec not in (RAW, ZSTD):
            raise CodecError(f"plane_codec[{j}]: unknown codec {codec}")
        codecs.append(codec)
        sizes.append(size)
    joint_size = 0
    if version >= 3:
        (joint_size,) = _take(_U64, data, pos, "joint_size")
        pos += 8
    entries, names, total = [], set(), 0
    for _ in range(n_tensors):
        e, pos = _parse_entry(data, pos, max_elements - total, max_elements, version)
        if e.name in names:
            raise CodecError(f"name: {e.name!r} appears twice")
        names.add(e.name)
        total += math.prod(e.shape)
        entries.append(e)
    if pos != len(data):
        raise CodecError(f"header: {len(data) - pos} trailing bytes after the last entry")
    return Table(entries, codecs, sizes, joint_size)


def _parse_entry(data: bytes, pos: int, budget: int, max_elements: int, version: int) -> tuple[Entry, int]:
    """One entry from `pos`, and where the next begins; `budget` is what is left of max_elements (the sum of
    every tensor's element count). The header of an upload has an entry per tensor (420 for a SmolLM2 LoRA),
    so each field is one precompiled struct read."""
    (name_len,) = _take(_U16, data, pos, "name_len")
    pos += 2
    if pos + name_len > len(data):
        raise _Truncated("name")
    try:
        name = data[pos:pos + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("name: not valid UTF-8") from None
    pos += name_len
    form, value_type, ndim = _take(_FORM, data, pos, "form")
    pos += 3
    if form not in (DENSE, SPARSE, MASKED):
        raise CodecError(f"{name}: form: unknown form {form}")
    if value_type >= len(VALUE_TYPES):
        raise CodecError(f"{name}: value_type: unknown value type {value_type}")
    vt = VALUE_TYPES[value_type]
    if vt in BLOCK_TYPES and version < 2:
        raise CodecError(f"{name}: value_type: {vt} needs bundle version 2, this is {version}")
    if ndim > MAX_NDIM:
        raise CodecError(f"{name}: ndim: {ndim} > {MAX_NDIM}")
    shape_and_count = _SHAPE_AND_COUNT[ndim]
    *shape, count = _take(shape_and_count, data, pos, "shape")
    pos += shape_and_count.size
    shape = tuple(shape)
    n = math.prod(shape)
    if n > budget:
        raise CodecError(f"{name}: shape: {shape} takes the bundle past max_elements")
    if not n and math.prod(d for d in shape if d) > max_elements:  # numpy cannot make (0, 2**62, 2**62) either
        raise CodecError(f"{name}: shape: {shape} has axes beyond max_elements={max_elements}")
    e = Entry(name, form, vt, shape, count)
    if form == DENSE and count != n:
        raise CodecError(f"{name}: count: dense tensor of {n} elements declares {count} values")
    if form == SPARSE:
        if count > n:
            raise CodecError(f"{name}: count: {count} indices exceed the {n} elements of shape {shape}")
        e.index_coder, e.index_param, e.index_size = _take(_SPARSE, data, pos, "index_coder")
        pos += _SPARSE.size
        if e.index_coder not in CODER_NAMES:
            raise CodecError(f"{name}: index_coder: unknown coder {e.index_coder}")
        since, what = NEEDS_VERSION.get(e.index_coder, (1, ""))
        if version < since:
            raise CodecError(f"{name}: index_coder: {what} needs bundle version {since}, this is {version}")
        if e.index_coder in JOINT_CODERS:
            _check_joint(e, n)
    elif form == MASKED:
        e.seed, e.density = _take(_MASKED, data, pos, "seed")
        pos += _MASKED.size
        if not 0.0 <= e.density <= 1.0:  # also false for NaN
            raise CodecError(f"{name}: density: {e.density} outside [0, 1]")
        if count != mask_size(shape, e.density):
            raise CodecError(f"{name}: count: mask of density {e.density} has {mask_size(shape, e.density)}"
                             f" entries, header says {count}")
    if vt == "int8":
        (e.scale,) = _take(_SCALE, data, pos, "scale")
        pos += 4
        if not (math.isfinite(e.scale) and e.scale > 0):
            raise CodecError(f"{name}: scale: int8 scale {e.scale} must be finite and > 0")
    if vt in BLOCK_TYPES:
        (e.block_size,) = _take(_U32, data, pos, "block_size")
        pos += 4
        if not 1 <= e.block_size <= MAX_BLOCK:
            raise CodecError(f"{name}: block_size: {e.block_size} outside [1, {MAX_BLOCK}]")
    return e, pos


def _check_joint(e: Entry, n: int) -> None:
    """A joint entry: no bytes of its own, at least one index, and its parameter."""
    if e.index_size or not e.count:
        raise CodecError(f"{e.name}: index_coder: a joint entry has index_size 0 and count >= 1")
    if e.index_coder == JOINT and not 1 <= e.index_param <= max(1, n):
        raise CodecError(f"{e.name}: index_param: golomb m={e.index_param} outside [1, {n}]")
    if e.index_coder == JOINT_BYTES and e.index_param:
        raise CodecError(f"{e.name}: index_param: a byte-gap entry has index_param 0, not {e.index_param}")
