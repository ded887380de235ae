"""The versioned bundle: named tensors <-> bytes. FORMAT.md specifies the layout byte by byte.

    magic "ELCB" | version u8 | flags u8 | reserved u16 | header_size u32 | header (zstd frame)
    | [versions 3 and 4: the joint index stream] | side payload of each tensor (indices, then block scales)
    | value planes 0..3 (each raw or one zstd frame) | crc32 u32 of everything before it

decode_flat gives a bundle as whole-bundle arrays (every value in one float32 array, and for an all-sparse
bundle every value's position in one int64 array), so a reader that adds them (the server's aggregator) does
no Python step per tensor; decode_bundle gives the same bundle as named tensors.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import gap_bytes, golomb, zstd_frame
from .errors import CodecError
from .header import DENSE, MASKED, SPARSE, ZSTD, Columns, Entry, Table, pack_header, parse_header, version_of
from .index_coding import GOLOMB, JOINT, JOINT_BYTES, JOINT_CODERS, NONE, decode_indices, encode_indices
from .mask import mask_size
from .tensors import Dense, Masked, Sparse, Tensor
from .values import (BLOCK_TYPES, DEFAULT_BLOCK, MAX_BLOCK, VALUE_TYPES, check_rounding, check_value_type,
                     decode_blockwise, decode_values, encode_values, pack_planes, plane_sizes, scale_sizes,
                     unpack_planes, unpack_uniform)

MAGIC = b"ELCB"
VERSION = 4  # the newest this codec writes and reads; it writes the oldest version the bundle's features allow
VERSIONS = (1, 2, 3, 4)
DEFAULT_MAX_ELEMENTS = 1 << 28
MAX_HEADER_BYTES = 1 << 24
_PREAMBLE = struct.Struct("<4sBBHI")  # magic, version, flags, reserved, header_size
_TRAILER = 4  # crc32


def encode_bundle(tensors: Mapping[str, Tensor], *, value_type: str = "float32", level: int = 3,
                  value_types: Mapping[str, str] | None = None, block_size: int = DEFAULT_BLOCK,
                  rounding: str = "nearest", seed: int | None = None, joint_indices: bool = True,
                  byte_gap_slack: float = gap_bytes.SLACK) -> bytes:
    """Bytes of `tensors` in insertion order. `value_types` overrides `value_type` for the names it lists.

    block_size: values per scale of the blockwise types. rounding: "nearest", or "stochastic" for the int8
    types, whose draws come from numpy's Generator seeded with `seed` (required), so an encoding is
    reproducible. joint_indices: where two or more tensors are Sparse, code all their indices as one stream
    over the tensors laid end to end (version 3), which a reader decodes in one pass however many tensors
    there are; False gives each its own stream (versions 1 and 2). byte_gap_slack: that stream is written as
    byte gaps through zstd (version 4, gap_bytes: several times faster to read and to write) where it is at
    most this fraction larger than the Golomb stream; below 0 it never is."""
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
    entries, indices, scale_payloads, stored = [], [], [], []
    for name, t in tensors.items():
        vt = check_value_type(overrides.get(name, value_type), f"value_types[{name!r}]")
        entry, idx, values = _encode_tensor(name, t, vt)
        stored_values, entry.scale, scales = encode_values(values, vt, name, block_size=block_size,
                                                           rounding=rounding, rng=rng)
        entry.block_size = block_size if vt in BLOCK_TYPES else 0
        entries.append(entry)
        indices.append(idx)
        scale_payloads.append(scales)
        stored.append(stored_values)
    table, planes = Table(entries), pack_planes(stored)
    coders = [encode_indices(idx, math.prod(e.shape), golomb_payload=False, level=level) if e.form == SPARSE else None
              for e, idx in zip(entries, indices)]
    # tensors whose smallest coding is Golomb share one stream, each under its own m, where two or more do
    joint = joint_indices and sum(c is not None and c[0] == GOLOMB for c in coders) >= 2
    side_payloads, joint_gaps, joint_ms = [b""] if joint else [], [], []
    for e, idx, c, scales in zip(entries, indices, coders, scale_payloads):
        if c is not None:
            e.index_coder, e.index_param, payload = c
            if c[0] == GOLOMB and joint:
                e.index_coder = JOINT
                joint_gaps.append(golomb.gaps_of(idx))
                joint_ms.append(c[1])
            else:
                payload = golomb.encode(golomb.gaps_of(idx), c[1]) if c[0] == GOLOMB else payload
                e.index_size = len(payload)
                scales = payload + scales
        side_payloads.append(scales)
    if joint:
        side_payloads[0] = _joint_stream(table, joint_gaps, joint_ms, level, byte_gap_slack)
        table.joint_size = len(side_payloads[0])
    for j, plane in enumerate(planes):
        packed = zstd_frame.compress(plane, level)
        if len(packed) < len(plane):  # zstd only where it helps
            table.plane_codecs[j], planes[j] = ZSTD, packed
        table.plane_sizes[j] = len(planes[j])
    return assemble(table, side_payloads, b"".join(planes), level=level)


def _joint_stream(table: Table, gaps: list[np.ndarray], ms: list[int], level: int, slack: float) -> bytes:
    """The joint stream of the table's joint entries: byte gaps where within `slack` of Golomb's size (the
    entries then say so), else Golomb codes. Golomb's size is counted, not written, unless it is kept."""
    if slack >= 0:
        bound = (1 + slack) * -(-sum(golomb.golomb_bits(g, m) for g, m in zip(gaps, ms)) // 8)
        frame = gap_bytes.encode(gaps, level, bound)
        if len(frame) <= bound:
            for e in table.joint:
                e.index_coder, e.index_param = JOINT_BYTES, 0
            return frame
    return golomb.encode_joint(gaps, ms)


def assemble(table: Table, side_payloads: list[bytes], values_section: bytes, *, level: int = 3,
             header_frame: bytes | None = None, preamble: tuple | None = None) -> bytes:
    """Lay out a bundle from its parts (preamble: magic, version, flags, reserved; by default the version
    the table needs). Tests and the fuzzer pass odd parts to reach each check."""
    preamble = (MAGIC, version_of(table), 0, 0) if preamble is None else preamble
    frame = zstd_frame.compress(pack_header(table), level) if header_frame is None else header_frame
    body = _PREAMBLE.pack(*preamble, len(frame)) + frame + b"".join(side_payloads) + values_section
    return body + struct.pack("<I", zlib.crc32(body))


def take_apart(data: bytes) -> tuple[Table, list[bytes], bytes]:
    """Inverse of assemble for a well-formed bundle: table, side payloads (version 3: the joint index stream
    first; then one per tensor: its index bytes, then its block scales), stored value planes."""
    (header_size,) = struct.unpack_from("<I", data, 8)
    frame = data[_PREAMBLE.size:_PREAMBLE.size + header_size]
    table = parse_header(zstd_frame.decompress(frame, zstd_frame.content_size(frame, "header"), "header"),
                         DEFAULT_MAX_ELEMENTS, data[4])
    side_payloads, pos = [], _PREAMBLE.size + header_size
    for size in _side_sizes(table, data[4]):
        side_payloads.append(data[pos:pos + size])
        pos += size
    return table, side_payloads, data[pos:len(data) - _TRAILER]


def _side_sizes(table: Table, version: int) -> list[int]:  # (take_apart's)
    """Bytes of each side payload: the joint stream's (version 3), then each tensor's."""
    c = table.columns
    joint = [table.joint_size] if version >= 3 else []
    return joint + [i + s for i, s in zip(c.size.tolist(), scale_sizes(c.vt, c.count, c.block).tolist())]


_NO_INDICES = np.zeros(0, np.int64)  # a Sparse tensor's with coder 'none' and count 0
_NO_INDICES.flags.writeable = False


@dataclass(frozen=True, eq=False)
class Flat:
    """A decoded bundle as whole-bundle arrays (decode_flat). Tensor t is names[t], of shape shapes[t]; its
    values are values[starts[t]:starts[t + 1]]. When every tensor is Sparse, `positions` holds each value's
    position in the tensors' entries laid end to end in table order (tensor t's begin at sum of the earlier
    tensors' sizes): strictly increasing, so an accumulator over that layout adds the whole bundle at once;
    otherwise None."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    values: np.ndarray  # float32, every value in table order
    starts: np.ndarray  # int64, len(names) + 1
    positions: np.ndarray | None
    _table: Table
    _indices: dict[int, np.ndarray]  # tensor -> its local indices, for a Sparse tensor with its own stream
    _joint: "_Joint | None"  # the joint stream, whose tensors' local indices are cut from it when asked

    @property
    def all_sparse(self) -> bool:
        return self.positions is not None

    def tensors(self) -> dict[str, Tensor]:
        """The bundle as named tensors (what decode_bundle returns); values are views of `values`."""
        indices = dict(self._indices)
        if self._joint is not None:
            for i, t in enumerate(self._joint.where.tolist()):
                indices[t] = self._joint.indices(i)
        out = {}
        for t, e in enumerate(self._table.entries):
            values = self.values[self.starts[t]:self.starts[t + 1]]
            if e.form == DENSE:
                out[e.name] = Dense(values.reshape(e.shape))
            elif e.form == MASKED:
                out[e.name] = Masked(e.shape, e.seed, e.density, values)
            else:  # in neither: coder 'none' with no index (_own_indices)
                out[e.name] = Sparse(e.shape, indices.get(t, _NO_INDICES), values)
        return out


def decode_bundle(data: bytes | bytearray, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """Tensors in bundle order. Trusts nothing: any violation raises CodecError naming the field.

    max_elements caps the sum over tensors of their element counts (prod(shape)), which bounds every
    allocation decoding makes.
    """
    return decode_flat(data, max_elements=max_elements).tensors()


def decode_flat(data: bytes | bytearray, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Flat:
    """The bundle as whole-bundle arrays (Flat), with every check decode_bundle makes. Whole-array steps
    over the table's columns, however many tensors; a step per tensor only for a tensor with its own index
    stream, and, to name the tensor at fault, where a check of the whole fails."""
    if not isinstance(data, (bytes, bytearray)):  # a bytearray (the server's upload buffer) is read in place
        data = bytes(data)
    table, body, version = _open(data, max_elements)
    c = table.columns
    joint_size = table.joint_size if version >= 3 else 0
    scales = scale_sizes(c.vt, c.count, c.block)
    index_bytes = np.minimum(c.size, len(body)).astype(np.int64)  # (a larger one is refused just below)
    side_ends = np.cumsum(index_bytes + scales) + min(joint_size, len(body))
    if (joint_size > len(body) or (c.size > len(body)).any()
            or (int(side_ends[-1]) if c.names else joint_size) + sum(table.plane_sizes) != len(body)):
        raise CodecError(f"index_size/plane_size: payload sizes (with block scales) do not add up to the "
                         f"{len(body)} body bytes")
    scale_starts = side_ends - scales  # each tensor's side payload: its index bytes, then its block scales
    index_starts = scale_starts - index_bytes
    planes, pos = [], int(side_ends[-1]) if c.names else joint_size
    for j, expected in enumerate(plane_sizes(c.vt, c.count)):
        plane = bytes(body[pos:pos + table.plane_sizes[j]])
        pos += table.plane_sizes[j]
        if table.plane_codecs[j] == ZSTD:
            plane = zstd_frame.decompress(plane, expected, f"plane[{j}]")
        elif len(plane) != expected:
            raise CodecError(f"plane_size[{j}]: {len(plane)} raw bytes, the table implies {expected}")
        planes.append(plane)
    tensor_starts = np.zeros(len(c.names), np.int64)  # where each tensor begins in the tensors laid end to end
    np.cumsum(c.n[:-1], out=tensor_starts[1:])
    joint = _joint_indices(c, bytes(body[:joint_size]), tensor_starts) if version >= 3 else None
    starts = np.zeros(len(c.names) + 1, np.int64)
    np.cumsum(c.count, out=starts[1:])
    values = _values(table, c, planes, body, scale_starts, scales)
    indices = _own_indices(c, body, index_starts)
    positions = None
    if c.names and (c.form == SPARSE).all():
        positions = _positions(starts, tensor_starts, indices, joint)
    return Flat(c.names, c.shapes, values, starts, positions, table, indices, joint)


@dataclass(frozen=True, eq=False)
class _Joint:
    """The joint stream decoded: `where`, its tensors' places in the table; `positions`, their indices one after
    another, each plus where its tensor begins in the tensors laid end to end (`offsets`): tensor where[i]'s
    are positions[cuts[i]:cuts[i + 1]] - offsets[i]."""
    positions: np.ndarray
    where: np.ndarray
    cuts: np.ndarray
    offsets: np.ndarray

    def indices(self, i: int) -> np.ndarray:
        return self.positions[self.cuts[i]:self.cuts[i + 1]] - self.offsets[i]


def _joint_indices(c: Columns, payload: bytes, tensor_starts: np.ndarray) -> _Joint | None:
    """Decode the joint stream (its tensors' m, n and counts were checked with the header)."""
    where = np.flatnonzero((c.form == SPARSE) & np.isin(c.coder, JOINT_CODERS))
    if not where.size:
        if payload:
            raise CodecError(f"joint_size: {len(payload)} bytes of joint index stream, and no tensor says joint")
        return None
    coders = set(c.coder[where].tolist())
    if len(coders) > 1:
        raise CodecError("index_coder: the joint stream is Golomb codes (3) or byte gaps (4), and entries say both")
    counts, ns, offsets = c.count[where], c.n[where], tensor_starts[where]
    if JOINT_BYTES in coders:
        positions = gap_bytes.decode(payload, ns, counts, offsets)  # its errors name the joint index stream
    else:
        try:
            positions = golomb.decode_joint(payload, c.param[where].astype(np.int64), ns, counts, offsets)
        except CodecError as exc:
            raise CodecError(f"joint index stream: {exc}") from None
    cuts = np.zeros(where.size + 1, np.int64)
    np.cumsum(counts, out=cuts[1:])
    return _Joint(positions, where, cuts, offsets)


def _own_indices(c: Columns, body: memoryview, index_starts: np.ndarray) -> dict[int, np.ndarray]:
    """The local indices of each Sparse tensor with its own stream. Coder 'none' with no index (most of a
    top-k's tensors at low density) is checked for the whole table at once and left out (it has none); any
    other is decoded on its own."""
    own = (c.form == SPARSE) & ~np.isin(c.coder, JOINT_CODERS)
    plain = own & (c.coder == NONE) & (c.size == 0) & (c.param == 0) & (c.count == 0)
    out = {}
    for t in np.flatnonzero(own & ~plain).tolist():
        start = int(index_starts[t])
        try:
            out[t] = decode_indices(int(c.coder[t]), int(c.param[t]), bytes(body[start:start + int(c.size[t])]),
                                    int(c.n[t]), int(c.count[t]))
        except CodecError as exc:
            raise CodecError(f"{c.names[t]}: {exc}") from None
    return out


def _positions(starts: np.ndarray, tensor_starts: np.ndarray, indices: dict[int, np.ndarray],
               joint: _Joint | None) -> np.ndarray:
    """Every value's position in the (all sparse) tensors laid end to end, in one array: each tensor's indices
    plus where it begins (tensor_starts), at its values' places (starts)."""
    if joint is not None and joint.positions.size == starts[-1]:  # one stream holds every index: in order
        return joint.positions
    positions = np.empty(int(starts[-1]), np.int64)
    if joint is not None:
        positions[np.repeat(starts[joint.where] - joint.cuts[:-1], np.diff(joint.cuts))
                  + np.arange(joint.positions.size)] = joint.positions
    for t, idx in indices.items():
        positions[starts[t]:starts[t + 1]] = idx + tensor_starts[t]
    return positions


def _values(table: Table, c: Columns, planes: list[bytes], body: memoryview, scale_starts: np.ndarray,
            scale_lens: np.ndarray) -> np.ndarray:
    """Every tensor's float32 values, in table order, in one array: in one pass where the tensors share a value
    type (and a block size: their scales are then gathered into one array), else tensor by tensor; a failed
    check of the one pass is redone tensor by tensor, to name the tensor."""
    if not c.names:
        return np.zeros(0, np.float32)
    uniform = bool((c.vt == c.vt[0]).all())
    vt = VALUE_TYPES[int(c.vt[0])]
    whole = None
    try:
        if uniform and vt in BLOCK_TYPES and bool((c.block == c.block[0]).all()):
            body_bytes = np.frombuffer(body, np.uint8)
            total = int(scale_lens.sum())
            at = np.repeat(scale_starts - (np.cumsum(scale_lens) - scale_lens), scale_lens) + np.arange(total)
            return decode_blockwise(np.frombuffer(planes[0], np.uint8), vt, c.count, int(c.block[0]),
                                    body_bytes[at].tobytes())
        if uniform and vt not in BLOCK_TYPES:
            whole = unpack_uniform(planes, vt)
            scale = np.repeat(c.scale.astype(np.float32), c.count) if vt == "int8" else 0.0
            return decode_values(whole, vt, scale, "values")
    except CodecError:
        pass  # found again below, tensor by tensor, with the tensor's name
    entries = table.entries
    types, counts = [e.value_type for e in entries], [e.count for e in entries]
    stored = np.split(whole, np.cumsum(counts)[:-1]) if whole is not None else unpack_planes(planes, types, counts)
    scales = [bytes(body[s:s + n]) for s, n in zip(scale_starts.tolist(), scale_lens.tolist())]
    out = [decode_values(s, e.value_type, e.scale, e.name, count=e.count, block_size=e.block_size, scales=sc)
           for e, s, sc in zip(entries, stored, scales)]
    return np.concatenate(out)


def _open(data: bytes, max_elements: int) -> tuple[Table, memoryview, int]:
    """Check the preamble and checksum, and parse the table; returns it, the body after the header and the
    version."""
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
    return table, memoryview(data)[_PREAMBLE.size + header_size:len(data) - _TRAILER], version


def _encode_tensor(name: str, t: Tensor, value_type: str) -> tuple[Entry, np.ndarray | None, np.ndarray]:
    """The table entry, checked indices (Sparse; None otherwise) and flat float32 values of one tensor (the
    caller codes the indices, alone or in the joint stream)."""
    if not isinstance(name, str):
        raise CodecError(f"name: must be str, got {type(name).__name__}")
    try:
        if len(name.encode("utf-8")) > 0xFFFF:
            raise CodecError(f"name: {name[:40]!r}... is longer than 65535 bytes")
    except UnicodeEncodeError:
        raise CodecError(f"name: {name!r} is not encodable as UTF-8") from None
    if isinstance(t, Dense):
        values = _finite_float32(t.values, name)
        return Entry(name, DENSE, value_type, values.shape, values.size), None, values.reshape(-1)
    if isinstance(t, Sparse):
        shape = _shape(t.shape, name)
        indices = _sorted_indices(t.indices, math.prod(shape), name)
        values = _finite_float32(t.values, name).reshape(-1)
        if values.size != indices.size:
            raise CodecError(f"{name}: values: {values.size} values for {indices.size} indices")
        return Entry(name, SPARSE, value_type, shape, indices.size), indices, values
    if isinstance(t, Masked):
        shape = _shape(t.shape, name)
        seed, density = _seed(t.seed, name), _density(t.density, name)
        values = _finite_float32(t.values, name).reshape(-1)
        if values.size != mask_size(shape, density):
            raise CodecError(f"{name}: values: {values.size} values, the mask has {mask_size(shape, density)}")
        return Entry(name, MASKED, value_type, shape, values.size, seed=seed, density=density), None, values
    raise CodecError(f"{name}: form: {type(t).__name__} is not Dense, Sparse or Masked")


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
