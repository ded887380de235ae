"""The bundle's tensor table: one entry per tensor, packed little-endian as FORMAT.md lays out byte by byte.

parse_header checks everything that can be checked without the payloads: enums, name uniqueness and
encoding, shape against the element cap, count against the shape, and the masked density and count.
Version 3 adds the joint index stream's size after the planes' records (FORMAT.md, "The joint index stream");
version 4 lets that stream be byte gaps (index coder 4) and a tensor's indices a zstd bitmap (index coder 5).
"""
from __future__ import annotations

import dataclasses
import math
import struct
import threading
from dataclasses import dataclass

import numpy as np

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


class Table:
    """The tensor table: `entries` (an Entry per tensor, which the encoder fills and tests edit) and the same
    as `columns` (an array per field, which the decoder reads without a step per tensor). A parsed table
    carries its columns, and its entries or not (they are made from the columns when first asked for); once
    the entries are asked for they are what counts (they may be edited) and the columns are made from them
    when asked for."""

    def __init__(self, entries: list[Entry] | None = None, plane_codecs: list[int] | None = None,
                 plane_sizes: list[int] | None = None, joint_size: int = 0, *, columns: "Columns | None" = None):
        self._entries = entries if entries is not None or columns is not None else []
        self._columns = columns
        self.plane_codecs = [RAW] * N_PLANES if plane_codecs is None else plane_codecs  # RAW bytes or one ZSTD frame
        self.plane_sizes = [0] * N_PLANES if plane_sizes is None else plane_sizes  # bytes of each plane as stored
        self.joint_size = joint_size  # version 3: bytes of the joint index stream of the joint entries

    @property
    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = self._columns.entries()
        self._columns = None
        return self._entries

    @property
    def columns(self) -> "Columns":
        return self._columns if self._columns is not None else Columns.of(self._entries)

    @property
    def joint(self) -> list[Entry]:
        return [e for e in self.entries if e.form == SPARSE and e.index_coder in JOINT_CODERS]


@dataclass(frozen=True, eq=False)
class Columns:
    """A parsed table as one array per field, element t for entry t (Entry's fields; `vt` is the value type's
    place in VALUE_TYPES, `n` the element count), read-only. The u64 fields a device picks freely (seed,
    index_param, index_size) stay uint64; the others were bounded when the header was parsed."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n: np.ndarray  # int64
    form: np.ndarray  # int64
    vt: np.ndarray  # int64
    count: np.ndarray  # int64 (<= n)
    seed: np.ndarray  # uint64
    density: np.ndarray  # float64
    coder: np.ndarray  # int64
    param: np.ndarray  # uint64
    size: np.ndarray  # uint64
    scale: np.ndarray  # float64 (a float32 on the wire)
    block: np.ndarray  # int64

    @classmethod
    def of(cls, entries: list[Entry]) -> "Columns":
        """The columns of entries that parse_header accepted."""
        def column(field: str, dtype) -> np.ndarray:
            return _frozen(np.array([getattr(e, field) for e in entries], dtype))

        return cls(tuple(e.name for e in entries), tuple(e.shape for e in entries),
                   _frozen(np.array([math.prod(e.shape) for e in entries], np.int64)), column("form", np.int64),
                   _frozen(np.array([VALUE_TYPES.index(e.value_type) for e in entries], np.int64)),
                   column("count", np.int64), column("seed", np.uint64), column("density", np.float64),
                   column("index_coder", np.int64), column("index_param", np.uint64),
                   column("index_size", np.uint64), column("scale", np.float64), column("block_size", np.int64))

    def entries(self) -> list[Entry]:
        return [Entry(*fields) for fields in zip(
            self.names, self.form.tolist(), [VALUE_TYPES[v] for v in self.vt.tolist()], self.shapes,
            self.count.tolist(), self.seed.tolist(), self.density.tolist(), self.coder.tolist(),
            self.param.tolist(), self.size.tolist(), self.scale.tolist(), self.block.tolist())]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


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
    """The table of a decompressed header, every field checked (CodecError names the one at fault).

    The uploads of a round share their skeleton (names, shapes, forms, value types) and differ in a few fixed-
    width fields (a sparse tensor's count and index fields, an int8 scale, the plane and joint sizes). The
    last headers accepted are kept as templates: a header byte-identical to one outside those fields is read
    in whole-array steps, its fields checked as the entry-by-entry parse checks them (anything that fails is
    parsed again entry by entry, which names it). A SmolLM2 LoRA upload's 420 entries take about 0.05 ms
    that way against 0.8 ms."""
    key = (version, max_elements, len(data))
    template = _TEMPLATES.get(key)
    try:
        table = template.read(data, version) if template is not None else None
        if table is None:
            table, variable = _parse(data, max_elements, version)
            template = _Template.of(data, table, variable, version)
            with _TEMPLATES_LOCK:  # decoders run on the servicer's threads
                if len(_TEMPLATES) >= MAX_TEMPLATES:
                    _TEMPLATES.pop(next(iter(_TEMPLATES)))
                _TEMPLATES[key] = template
            table = Table(table.entries, table.plane_codecs, table.plane_sizes, table.joint_size,
                          columns=template.columns)
        return table
    except _Truncated as t:
        raise CodecError(f"header: truncated at {t.field}") from None


def _top(data: bytes, version: int) -> tuple[int, list[int], list[int], int, int]:
    """tensor_count, the planes' codecs and sizes, joint_size, and where the entries begin."""
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
    return n_tensors, codecs, sizes, joint_size, pos


def _parse(data: bytes, max_elements: int, version: int) -> tuple[Table, list[tuple[str, int, int]]]:
    """The table, and where each entry's variable fields lie: (field, entry, offset) with field "count" or
    "index" (a sparse entry's count and its index_coder, index_param, index_size) or "scale" (int8)."""
    n_tensors, codecs, sizes, joint_size, pos = _top(data, version)
    entries, names, total, variable = [], set(), 0, []
    for t in range(n_tensors):
        e, pos = _parse_entry(data, pos, max_elements - total, max_elements, version, variable, t)
        if e.name in names:
            raise CodecError(f"name: {e.name!r} appears twice")
        names.add(e.name)
        total += math.prod(e.shape)
        entries.append(e)
    if pos != len(data):
        raise CodecError(f"header: {len(data) - pos} trailing bytes after the last entry")
    return Table(entries, codecs, sizes, joint_size), variable


def _parse_entry(data: bytes, pos: int, budget: int, max_elements: int, version: int,
                 variable: list[tuple[str, int, int]], t: int) -> tuple[Entry, int]:
    """Entry t from `pos`, and where the next begins; `budget` is what is left of max_elements (the sum of
    every tensor's element count); the offsets of its variable fields are appended to `variable` (_parse)."""
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
        variable += [("count", t, pos - 8), ("index", t, pos)]
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
        variable.append(("scale", t, pos))
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


MAX_TEMPLATES = 8  # skeletons kept (a coordinator sees one per structure and version it plans)
_TEMPLATES: dict[tuple[int, int, int], "_Template"] = {}  # (version, max_elements, header length) -> the last
_TEMPLATES_LOCK = threading.Lock()
_NEEDS = np.array([NEEDS_VERSION.get(c, (1, ""))[0] for c in range(len(CODER_NAMES))], np.int64)
assert sorted(CODER_NAMES) == list(range(len(CODER_NAMES)))  # coder c's version is _NEEDS[c]


@dataclass(frozen=True, eq=False)
class _Template:
    """A header parse_header accepted: its bytes, which of them the next header must repeat (all but the
    variable fields), its columns, and where the variable fields lie (the sparse entries' counts and index
    fields, the int8 entries' scales)."""
    raw: np.ndarray
    fixed: np.ndarray  # bool, per byte
    columns: Columns
    sparse: np.ndarray  # the sparse entries
    count_at: np.ndarray  # offset of each one's count
    index_at: np.ndarray  # offset of each one's index_coder (index_param and index_size follow)
    int8: np.ndarray  # the int8 entries
    scale_at: np.ndarray

    @classmethod
    def of(cls, data: bytes, table: Table, variable: list[tuple[str, int, int]], version: int) -> "_Template":
        at = {"count": ([], []), "index": ([], []), "scale": ([], [])}
        for field, t, offset in variable:
            at[field][0].append(t)
            at[field][1].append(offset)
        fixed = np.ones(len(data), bool)
        fixed[4:_top(data, version)[4]] = False  # the planes' codecs and sizes, joint_size
        for field, width in (("count", 8), ("index", _SPARSE.size), ("scale", 4)):
            for offset in at[field][1]:
                fixed[offset:offset + width] = False
        arrays = {f: (np.array(ts, np.int64), np.array(offsets, np.int64)) for f, (ts, offsets) in at.items()}
        return cls(_frozen(np.frombuffer(data, np.uint8).copy()), _frozen(fixed), Columns.of(table.entries),
                   arrays["index"][0], arrays["count"][1], arrays["index"][1], *arrays["scale"])

    def read(self, data: bytes, version: int) -> Table | None:
        """The table of `data` in whole-array steps, or None where it is not this skeleton or a variable
        field fails a check (parse_header then parses it entry by entry, which names the field)."""
        got = np.frombuffer(data, np.uint8)
        if ((got != self.raw) & self.fixed).any():
            return None
        c, changed = self.columns, {}
        if self.sparse.size:
            count, param, size = (_u64(got, at) for at in (self.count_at, self.index_at + 1, self.index_at + 9))
            coder = got[self.index_at].astype(np.int64)
            n = c.n[self.sparse].astype(np.uint64)
            joint = np.isin(coder, JOINT_CODERS)
            if ((count > n).any() or (coder >= _NEEDS.size).any() or (_NEEDS[np.minimum(coder, _NEEDS.size - 1)]
                                                                        > version).any()
                    or (joint & ((size != 0) | (count == 0))).any()
                    or ((coder == JOINT) & ((param < 1) | (param > np.maximum(n, 1)))).any()
                    or ((coder == JOINT_BYTES) & (param != 0)).any()):
                return None
            for field, values in (("count", count.astype(np.int64)), ("coder", coder), ("param", param),
                                  ("size", size)):
                whole = getattr(c, field).copy()
                whole[self.sparse] = values
                changed[field] = _frozen(whole)
        if self.int8.size:
            scale = got[self.scale_at[:, None] + np.arange(4)].view("<f4").reshape(-1)
            if not (np.isfinite(scale) & (scale > 0)).all():
                return None
            whole = c.scale.copy()
            whole[self.int8] = scale
            changed["scale"] = _frozen(whole)
        _, codecs, sizes, joint_size, _ = _top(data, version)
        return Table(None, codecs, sizes, joint_size, columns=dataclasses.replace(c, **changed) if changed else c)


def _u64(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The little-endian u64 at each offset."""
    return data[at[:, None] + np.arange(8)].view("<u8").reshape(-1)


def _check_joint(e: Entry, n: int) -> None:
    """A joint entry: no bytes of its own, at least one index, and its parameter."""
    if e.index_size or not e.count:
        raise CodecError(f"{e.name}: index_coder: a joint entry has index_size 0 and count >= 1")
    if e.index_coder == JOINT and not 1 <= e.index_param <= max(1, n):
        raise CodecError(f"{e.name}: index_param: golomb m={e.index_param} outside [1, {n}]")
    if e.index_coder == JOINT_BYTES and e.index_param:
        raise CodecError(f"{e.name}: index_param: a byte-gap entry has index_param 0, not {e.index_param}")
