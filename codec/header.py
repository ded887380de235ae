"""The bundle's tensor table: one entry per tensor, packed little-endian as FORMAT.md lays out byte by byte.

parse_header checks everything that can be checked without the payloads: enums, name uniqueness and
encoding, shape against the element cap, count against the shape, and the masked density and count.
Version 3 adds the joint index stream's size after the planes' records (FORMAT.md, "The joint index stream");
version 4 lets that stream be byte gaps (index coder 4).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import CodecError
from .index_coding import CODER_NAMES, JOINT, JOINT_BYTES, JOINT_CODERS
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
    """The oldest version that can say the table: 4 when the joint index stream is byte gaps, 3 when it is
    Golomb codes, 2 when a tensor uses a blockwise value type, else 1 (older decoders do not know the newer
    features)."""
    joint = table.joint
    if joint:
        return 4 if joint[0].index_coder == JOINT_BYTES else 3
    return 2 if any(e.value_type in BLOCK_TYPES for e in table.entries) else 1


@lru_cache(maxsize=256)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


class _Reader:
    """Reads fields off a buffer; running past its end is a CodecError naming the field."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str, field: str) -> tuple:
        s = _struct(fmt)
        if self.pos + s.size > len(self.data):
            raise CodecError(f"header: truncated at {field}")
        values = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return values

    def raw(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.data):
            raise CodecError(f"header: truncated at {field}")
        self.pos += size
        return self.data[self.pos - size:self.pos]


_SHAPE_AND_COUNT = [f"<{ndim + 1}Q" for ndim in range(MAX_NDIM + 1)]  # the dims, then count


def parse_header(data: bytes, max_elements: int, version: int = 2) -> Table:
    r = _Reader(data)
    (n_tensors,) = r.take("<I", "tensor_count")
    codecs, sizes = [], []
    for j in range(N_PLANES):
        codec, size = r.take("<BQ", f"plane_codec[{j}]")
        if codec not in (RAW, ZSTD):
            raise CodecError(f"plane_codec[{j}]: unknown codec {codec}")
        codecs.append(codec)
        sizes.append(size)
    joint_size = r.take("<Q", "joint_size")[0] if version >= 3 else 0
    entries, names, total = [], set(), 0
    for _ in range(n_tensors):
        e = _parse_entry(r, max_elements - total, max_elements, version)
        if e.name in names:
            raise CodecError(f"name: {e.name!r} appears twice")
        names.add(e.name)
        total += math.prod(e.shape)
        entries.append(e)
    if r.pos != len(data):
        raise CodecError(f"header: {len(data) - r.pos} trailing bytes after the last entry")
    return Table(entries, codecs, sizes, joint_size)


def _parse_entry(r: _Reader, budget: int, max_elements: int, version: int) -> Entry:
    """One entry; `budget` is what is left of max_elements (the sum of every tensor's element count)."""
    (name_len,) = r.take("<H", "name_len")
    try:
        name = r.raw(name_len, "name").decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("name: not valid UTF-8") from None
    form, value_type, ndim = r.take("<BBB", "form")
    if form not in (DENSE, SPARSE, MASKED):
        raise CodecError(f"{name}: form: unknown form {form}")
    if value_type >= len(VALUE_TYPES):
        raise CodecError(f"{name}: value_type: unknown value type {value_type}")
    if VALUE_TYPES[value_type] in BLOCK_TYPES and version < 2:
        raise CodecError(f"{name}: value_type: {VALUE_TYPES[value_type]} needs bundle version 2, this is {version}")
    if ndim > MAX_NDIM:
        raise CodecError(f"{name}: ndim: {ndim} > {MAX_NDIM}")
    *shape, count = r.take(_SHAPE_AND_COUNT[ndim], "shape")
    n = math.prod(shape)
    if n > budget:
        raise CodecError(f"{name}: shape: {tuple(shape)} takes the bundle past max_elements")
    if not n and math.prod(d for d in shape if d) > max_elements:  # numpy cannot make (0, 2**62, 2**62) either
        raise CodecError(f"{name}: shape: {tuple(shape)} has axes beyond max_elements={max_elements}")
    e = Entry(name, form, VALUE_TYPES[value_type], tuple(shape), count)
    if form == DENSE and count != n:
        raise CodecError(f"{name}: count: dense tensor of {n} elements declares {count} values")
    if form == SPARSE:
        if count > n:
            raise CodecError(f"{name}: count: {count} indices exceed the {n} elements of shape {tuple(shape)}")
        e.index_coder, e.index_param, e.index_size = r.take("<BQQ", "index_coder")
        if e.index_coder not in CODER_NAMES:
            raise CodecError(f"{name}: index_coder: unknown coder {e.index_coder}")
        if e.index_coder in JOINT_CODERS:
            needs = 3 if e.index_coder == JOINT else 4
            if version < needs:
                raise CodecError(f"{name}: index_coder: the joint stream{' of byte gaps' if needs == 4 else ''} "
                                 f"needs bundle version {needs}, this is {version}")
            if e.index_size or not count:
                raise CodecError(f"{name}: index_coder: a joint entry has index_size 0 and count >= 1")
            if e.index_coder == JOINT and not 1 <= e.index_param <= max(1, n):
                raise CodecError(f"{name}: index_param: golomb m={e.index_param} outside [1, {n}]")
            if e.index_coder == JOINT_BYTES and e.index_param:
                raise CodecError(f"{name}: index_param: a byte-gap entry has index_param 0, not {e.index_param}")
    if form == MASKED:
        e.seed, e.density = r.take("<Qd", "seed")
        if not 0.0 <= e.density <= 1.0:  # also false for NaN
            raise CodecError(f"{name}: density: {e.density} outside [0, 1]")
        if count != mask_size(e.shape, e.density):
            raise CodecError(f"{name}: count: mask of density {e.density} has {mask_size(e.shape, e.density)}"
                             f" entries, header says {count}")
    if e.value_type == "int8":
        (e.scale,) = r.take("<f", "scale")
        if not (math.isfinite(e.scale) and e.scale > 0):
            raise CodecError(f"{name}: scale: int8 scale {e.scale} must be finite and > 0")
    if e.value_type in BLOCK_TYPES:
        (e.block_size,) = r.take("<I", "block_size")
        if not 1 <= e.block_size <= MAX_BLOCK:
            raise CodecError(f"{name}: block_size: {e.block_size} outside [1, {MAX_BLOCK}]")
    return e
