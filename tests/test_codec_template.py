"""The header template (codec/header.py, parse_header): a header that repeats a parsed one's skeleton is read in
whole-array steps. It must say exactly what the entry-by-entry parse says: the same table, or the same error.

Each case decodes a bundle twice, once with no template kept and once with the unaltered bundle's template
warm, and compares the outcomes: both equal Flats, or both the same CodecError message.
"""
import dataclasses

import numpy as np
import pytest

from edgelora import codec
from edgelora.codec import header as hdr
from edgelora.codec.container import assemble, take_apart
from edgelora.codec.index_coding import BITMAP, GOLOMB, JOINT, JOINT_BYTES, NONE, RANS

from .test_codec_joint import random_sparse


def bundle(seed: int, value_type: str = "float32", **kw) -> bytes:
    """A device's upload of one skeleton: sparse tensors at densities that give every coder (joint, a bitmap,
    'none' with no index), a dense and a masked one, and int8 scales where value_type is int8; the counts and
    values differ with `seed`, as two devices' uploads do."""
    rng = np.random.default_rng(seed)
    tensors = {
        "a": random_sparse(rng, (40, 30), 40 + seed % 7),
        "b": random_sparse(rng, (20, 30), 30 + seed % 5),
        "dense_one": random_sparse(rng, (64, 64), 3000),  # dense enough for a bitmap
        "empty": codec.Sparse((9, 9), np.zeros(0, np.int64), np.zeros(0, np.float32)),
        "c": random_sparse(rng, (64, 8), 25 + seed % 3),
    }
    if kw.pop("mixed", False):
        tensors["dense"] = codec.Dense(rng.normal(size=(3, 5)).astype(np.float32))
        tensors["masked"] = codec.Masked((8, 8), 3, 0.25, rng.normal(size=16).astype(np.float32))
    return codec.encode_bundle(tensors, value_type=value_type, **kw)


def outcome(data: bytes):
    try:
        flat = codec.decode_flat(data)
    except codec.CodecError as e:
        return "error", str(e)
    tensors = flat.tensors()
    return "ok", flat.names, flat.shapes, flat.values.tobytes(), \
        None if flat.positions is None else flat.positions.tobytes(), \
        [(type(t).__name__, getattr(t, "indices", np.zeros(0)).tobytes()) for t in tensors.values()]


def cold_and_warm(data: bytes, warm_with: bytes):
    hdr._TEMPLATES.clear()
    cold = outcome(data)
    hdr._TEMPLATES.clear()
    codec.decode_flat(warm_with)
    return cold, outcome(data)


@pytest.fixture
def parses(monkeypatch):
    """How many headers were parsed entry by entry."""
    calls = []
    real = hdr._parse
    monkeypatch.setattr(hdr, "_parse", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("value_type,mixed", [("float32", False), ("int8", True), ("int4_block", False),
                                              ("int8", False)])
def test_another_devices_header_takes_the_template_and_decodes_the_same(parses, value_type, mixed):
    first, second = bundle(1, value_type, mixed=mixed), bundle(2, value_type, mixed=mixed)
    hdr._TEMPLATES.clear()
    cold = outcome(second)
    assert len(parses) == 1
    hdr._TEMPLATES.clear()
    codec.decode_flat(first)
    assert len(parses) == 2
    assert outcome(second) == cold and cold[0] == "ok"
    assert len(parses) == 2  # read from the template: no entry-by-entry parse
    coders = [e.index_coder for e in take_apart(second)[0].entries if e.form == hdr.SPARSE]
    assert {NONE, BITMAP} <= set(coders) and set(coders) & {JOINT, JOINT_BYTES}


def test_a_template_never_outlives_its_skeleton(parses):
    """A header of another skeleton (another name, another shape) of the same length is parsed, not read."""
    first = bundle(1)
    table, sides, values = take_apart(first)
    table.entries[0] = dataclasses.replace(table.entries[0], name="z")  # same length, another name
    renamed = assemble(table, sides, values)
    cold, warm = cold_and_warm(renamed, first)
    assert warm == cold and cold[0] == "ok" and cold[1][0] == "z"


def mutations(rng, table):
    """(what, entry, changes): every variable field of a sparse or int8 entry set to a boundary or random value,
    and a few fixed fields."""
    u64 = [0, 1, 2, 3, 255, 256, 2**31, 2**32 - 1, 2**48, 2**63 - 1, 2**63, 2**64 - 1]
    for i, e in enumerate(table.entries):
        if e.form == hdr.SPARSE:
            n = int(np.prod(e.shape))
            for v in u64 + [n, n + 1, n - 1, e.count + 1, max(0, e.count - 1)]:
                yield "count", i, {"count": v}
            for coder in (NONE, GOLOMB, RANS, JOINT, JOINT_BYTES, BITMAP, 6, 200):
                yield "index_coder", i, {"index_coder": coder}
            for v in u64 + [n, n + 1]:
                yield "index_param", i, {"index_param": v}
                yield "index_size", i, {"index_size": v}
            yield "random", i, {"count": int(rng.integers(0, n + 2)), "index_coder": int(rng.integers(0, 7)),
                                "index_param": int(rng.integers(0, n + 2)), "index_size": int(rng.integers(0, 9))}
        if e.value_type == "int8":
            for v in (0.0, -1.0, float("inf"), float("nan"), 1e-45, 3.4e38, 0.5):
                yield "scale", i, {"scale": v}
        yield "block_size", i, {"block_size": 0 if e.block_size else 7}


@pytest.mark.parametrize("value_type,mixed", [("float32", True), ("int8", True), ("int4_block", False)])
def test_every_altered_field_gives_what_the_full_parse_gives(value_type, mixed):
    first, second = bundle(1, value_type, mixed=mixed), bundle(2, value_type, mixed=mixed)
    rng = np.random.default_rng(3)
    seen = {"error": 0, "ok": 0}
    for what, i, changes in mutations(rng, take_apart(second)[0]):
        table, sides, values = take_apart(second)
        try:
            table.entries[i] = dataclasses.replace(table.entries[i], **changes)
            data = assemble(table, sides, values)
        except Exception:  # struct cannot pack it (a u8 coder of 200 is fine; a u32 block of 0 too)
            continue
        cold, warm = cold_and_warm(data, first)
        assert warm == cold, (what, table.entries[i].name, changes)
        seen[cold[0]] += 1
    assert seen["error"] > 100 and seen["ok"] >= 3  # both kinds of outcome were compared


def test_planes_and_joint_size_are_read_from_each_header():
    """The fields outside the entries that vary by upload (plane codecs and sizes, the joint stream's size)."""
    first, second = bundle(1), bundle(2)
    for changes in ({"plane_sizes": [1, 2, 3, 4]}, {"plane_codecs": [2, 0, 0, 0]}, {"joint_size": 3},
                    {"joint_size": 2**64 - 1}):
        table, sides, values = take_apart(second)
        for k, v in changes.items():
            setattr(table, k, v)
        cold, warm = cold_and_warm(assemble(table, sides, values), first)
        assert warm == cold and cold[0] == "error", changes
