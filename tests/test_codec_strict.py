"""Decoding trusts nothing and encoding accepts only well-formed tensors: one test per check.

Hostile bundles are built by taking a valid bundle apart (table, index payloads, values), changing one thing,
and putting it back together with a correct CRC, so each test reaches the check it names.
"""
import dataclasses
import math
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard

from edgelora import codec
from edgelora.codec import bitmap, container, header as hdr, rans, zstd_frame
from edgelora.codec.container import assemble, take_apart
from edgelora.codec.index_coding import BITMAP, GOLOMB, NONE, RANS
from edgelora.codec.values import VALUE_TYPES, pack_planes

RNG = np.random.default_rng(7)
TENSORS = {
    "dense": codec.Dense(RNG.normal(size=(3, 4)).astype(np.float32)),
    "sparse": codec.Sparse((50, 40), np.sort(RNG.choice(2000, 30, replace=False)), RNG.normal(size=30)),
    "masked": codec.Masked((8, 8), 3, 0.25, RNG.normal(size=16)),
}


def with_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def rebuilt(value_type="float32", *, name=None, index_payload=None, planes=None, codecs=None, **changes):
    """A valid bundle of TENSORS with one entry altered by `changes`, and optionally the sparse tensor's index
    payload or the four value planes (stored with `codecs`, default raw; sizes set to match) replaced."""
    table, index_payloads, section = take_apart(codec.encode_bundle(TENSORS, value_type=value_type))
    if name is not None:
        i = next(i for i, e in enumerate(table.entries) if e.name == name)
        table.entries[i] = dataclasses.replace(table.entries[i], **changes)
        if index_payload is not None:
            index_payloads[i] = index_payload
            table.entries[i].index_size = len(index_payload)
    if planes is not None:
        table.plane_codecs, table.plane_sizes = codecs or [hdr.RAW] * 4, [len(p) for p in planes]
        section = b"".join(planes)
    return assemble(table, index_payloads, section)


def f32_planes(dense=np.ones(12), sparse=np.ones(30), masked=np.ones(16)) -> list[bytes]:
    return pack_planes([np.asarray(a, "<f4") for a in (dense, sparse, masked)])


VALID = codec.encode_bundle(TENSORS)


def test_valid_bundle_decodes():  # the baseline every other test breaks in one place
    assert list(codec.decode_bundle(VALID)) == ["dense", "sparse", "masked"]
    assert list(codec.decode_bundle(assemble(*take_apart(VALID)))) == ["dense", "sparse", "masked"]


def test_every_truncation_is_rejected():
    for cut in range(len(VALID)):
        with pytest.raises(codec.CodecError):
            codec.decode_bundle(VALID[:cut])


@pytest.mark.parametrize("preamble,field", [
    ((b"ELCX", 1, 0, 0), "magic"), ((b"ELCB", 5, 0, 0), "version"), ((b"ELCB", 0, 0, 0), "version"),
    ((b"ELCB", 1, 1, 0), "flags"), ((b"ELCB", 1, 0, 9), "flags")])
def test_preamble_fields(preamble, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(assemble(*take_apart(VALID), preamble=preamble))


def test_header_size_past_the_end():
    data = bytearray(VALID)
    data[8:12] = struct.pack("<I", len(VALID))
    with pytest.raises(codec.CodecError, match="header_size"):
        codec.decode_bundle(with_crc(bytes(data)))


def test_crc_catches_a_flipped_bit_anywhere():
    for pos in range(12, len(VALID) - 4, 7):
        data = bytearray(VALID)
        data[pos] ^= 0x10
        with pytest.raises(codec.CodecError, match="crc32"):
            codec.decode_bundle(bytes(data))


def test_bit_flips_behind_a_valid_crc_raise_only_codec_error():
    for bit in range(8 * 12, 8 * (len(VALID) - 4)):
        data = bytearray(VALID)
        data[bit // 8] ^= 1 << (bit % 8)
        try:
            codec.decode_bundle(with_crc(bytes(data)))
        except codec.CodecError:
            pass


def test_header_frame_needs_content_size_and_checksum():
    raw = hdr.pack_header(take_apart(VALID)[0])
    no_size = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compressobj()
    no_size = no_size.compress(raw) + no_size.flush()
    no_sum = zstandard.ZstdCompressor(write_checksum=False).compress(raw)
    for frame, field in [(no_size, "content size"), (no_sum, "checksum"), (b"\0" * 20, "not a zstd frame")]:
        with pytest.raises(codec.CodecError, match=field):
            codec.decode_bundle(assemble(*take_apart(VALID), header_frame=frame))


def test_header_size_cap(monkeypatch):
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 40)
    with pytest.raises(codec.CodecError, match="header: declares"):
        codec.decode_bundle(VALID)


def test_header_trailing_bytes():
    table, index_payloads, section = take_apart(VALID)
    frame = zstd_frame.compress(hdr.pack_header(table) + b"\0", 3)
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.decode_bundle(assemble(table, index_payloads, section, header_frame=frame))


@pytest.mark.parametrize("changes,field", [
    (dict(name="dense", form=7), "form"),
    (dict(name="sparse", index_coder=9), "index_coder"),
    (dict(name="dense", count=11), "count"),
    (dict(name="sparse", count=2001), "count"),
    (dict(name="sparse", shape=(2**32, 2**32)), "max_elements"),
    (dict(name="sparse", shape=(2**62, 0, 2**62), count=0, index_coder=NONE, index_param=0), "axes beyond"),
    (dict(name="masked", density=float("nan")), "density"),
    (dict(name="masked", density=1.5), "density"),
    (dict(name="masked", count=15), "count"),
    (dict(name="dense", shape=(1,) * 33), "ndim"),
])
def test_header_field_checks(changes, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(**changes))


def test_duplicate_names():
    table, index_payloads, section = take_apart(VALID)
    table.entries[2].name = "dense"
    with pytest.raises(codec.CodecError, match="appears twice"):
        codec.decode_bundle(assemble(table, index_payloads, section))


def test_unknown_plane_codec():
    table, index_payloads, section = take_apart(VALID)
    table.plane_codecs[2] = 2
    with pytest.raises(codec.CodecError, match=r"plane_codec\[2\]"):
        codec.decode_bundle(assemble(table, index_payloads, section))


def test_unknown_value_type_and_bad_utf8_name():
    table, index_payloads, section = take_apart(VALID)
    first_entry = 4 + 4 * (1 + 8)  # tensor_count, then codec and size of each value plane
    for pos, byte, field in [(first_entry + 2 + len("dense") + 1, len(VALUE_TYPES), "value_type"),
                             (first_entry + 2, 0xFF, "UTF-8")]:
        raw = bytearray(hdr.pack_header(table))
        raw[pos] = byte
        frame = zstd_frame.compress(bytes(raw), 3)
        with pytest.raises(codec.CodecError, match=field):
            codec.decode_bundle(assemble(table, index_payloads, section, header_frame=frame))


def test_max_elements_caps_the_bundle():
    codec.decode_bundle(VALID, max_elements=12 + 2000 + 64)
    with pytest.raises(codec.CodecError, match="max_elements"):
        codec.decode_bundle(VALID, max_elements=12 + 2000 + 63)


def test_payload_sizes_must_add_up():
    table, index_payloads, section = take_apart(VALID)
    with pytest.raises(codec.CodecError, match="plane_size"):
        codec.decode_bundle(assemble(table, index_payloads, section + b"\0"))
    table.plane_sizes[0] += 1 << 60
    with pytest.raises(codec.CodecError, match="plane_size"):
        codec.decode_bundle(assemble(table, index_payloads, section))


def test_raw_plane_size_must_match_counts():
    planes = f32_planes()
    planes[3] = planes[3][:-1]
    with pytest.raises(codec.CodecError, match=r"plane_size\[3\]: 57 raw bytes, the table implies 58"):
        codec.decode_bundle(rebuilt(planes=planes))


def test_nan_and_inf_in_payload_are_rejected():
    for bad in (np.nan, np.inf, -np.inf):
        masked = np.ones(16)
        masked[5] = bad
        with pytest.raises(codec.CodecError, match="masked: values: NaN or Inf"):
            codec.decode_bundle(rebuilt(planes=f32_planes(masked=masked)))


def test_zstd_bomb_is_rejected_before_decompressing():
    bomb = zstd_frame.compress(b"\0" * (64 << 20), 3)  # 64 MiB of zeros in a few KiB
    planes = f32_planes()
    planes[0] = bomb
    tracemalloc.start()
    with pytest.raises(codec.CodecError, match=r"plane\[0\]: zstd frame declares 67108864 bytes, header implies 58"):
        codec.decode_bundle(rebuilt(planes=planes, codecs=[hdr.ZSTD, hdr.RAW, hdr.RAW, hdr.RAW]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


def test_zstd_frame_that_lies_about_its_size():
    frame = bytearray(zstd_frame.compress(RNG.bytes(400), 3))
    assert frame[4] >> 5 == 0b011  # single segment; content size in 2 bytes at offset 5, stored minus 256
    frame[5:7] = struct.pack("<H", 300 - 256)  # claims 300 bytes, holds 400
    assert zstd_frame.content_size(bytes(frame), "f") == 300
    with pytest.raises(codec.CodecError, match="plane: corrupt zstd frame"):
        zstd_frame.decompress(bytes(frame), 300, "plane")


def test_zstd_plane_frames_need_checksum_and_no_trailing_data():
    zstd_all = [hdr.ZSTD] * 4
    no_sum = [zstandard.ZstdCompressor(write_checksum=False).compress(p) for p in f32_planes()]
    with pytest.raises(codec.CodecError, match="checksum"):
        codec.decode_bundle(rebuilt(planes=no_sum, codecs=zstd_all))
    trailing = [zstd_frame.compress(p, 3) + b"junk" for p in f32_planes()]
    with pytest.raises(codec.CodecError, match="corrupt zstd frame"):
        codec.decode_bundle(rebuilt(planes=trailing, codecs=zstd_all))
    assert list(codec.decode_bundle(rebuilt(planes=[zstd_frame.compress(p, 3) for p in f32_planes()],
                                            codecs=zstd_all))) == ["dense", "sparse", "masked"]


def test_int8_scale_and_code_range():
    with pytest.raises(codec.CodecError, match="scale"):
        codec.decode_bundle(rebuilt("int8", name="dense", scale=0.0))
    with pytest.raises(codec.CodecError, match="scale"):
        codec.decode_bundle(rebuilt("int8", name="dense", scale=float("inf")))
    with pytest.raises(codec.CodecError, match="-128"):
        codec.decode_bundle(rebuilt("int8", planes=[b"\x80" * 58, b"", b"", b""]))


def blockwise(value_type="int4_block", values=None, block=4, preamble=None, scales=None, codes=None):
    """A one-tensor blockwise bundle of 9 values (3 blocks of 4, the last short), with its side payload (the
    scales) or its value plane (the codes) optionally replaced."""
    values = np.array([1, -2, 3, 4, 0.5, 0.25, -0.5, 0.125, 7], np.float32) if values is None else values
    table, side, section = take_apart(codec.encode_bundle({"q": codec.Dense(values)}, value_type=value_type,
                                                          block_size=block))
    if scales is not None:
        side = [np.asarray(scales, "<f4").tobytes()]
    if codes is not None:
        section, table.plane_codecs, table.plane_sizes = codes, [hdr.RAW] * 4, [len(codes), 0, 0, 0]
    return assemble(table, side, section, preamble=preamble)


def test_blockwise_valid_and_versioned():
    for vt in ("int8_block", "int4_block"):
        np.testing.assert_allclose(codec.decode_bundle(blockwise(vt))["q"].values,
                                   [1, -2, 3, 4, 0.5, 0.25, -0.5, 0.125, 7], atol=0.5 / 7 * 4)
        with pytest.raises(codec.CodecError, match="needs bundle version 2"):
            codec.decode_bundle(blockwise(vt, preamble=(b"ELCB", 1, 0, 0)))


@pytest.mark.parametrize("block", [0, (1 << 16) + 1])
def test_blockwise_block_size_range(block):
    table, side, section = take_apart(blockwise(block=4))
    table.entries[0].block_size = block
    with pytest.raises(codec.CodecError, match="block_size"):
        codec.decode_bundle(assemble(table, side, section))


@pytest.mark.parametrize("scales,field", [([1, -1, 1], "scales"), ([1, float("nan"), 1], "scales"),
                                          ([1, float("inf"), 1], "scales"), ([1, 1], "do not add up"),
                                          ([1, 1, 1, 1], "do not add up"), ([3e38, 1, 1], "NaN or Inf")])
def test_blockwise_scales(scales, field):
    """Each block's scale is finite and >= 0, there is one per block, and code x scale stays finite."""
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(blockwise(scales=scales, codes=None if field != "NaN or Inf" else b"\x7f" * 9,
                                      value_type="int8_block" if field == "NaN or Inf" else "int4_block"))


def test_blockwise_codes():
    """int8_block never writes -128; int4_block never writes nibble 0 (code -8) and pads with a zero nibble."""
    with pytest.raises(codec.CodecError, match="-128"):
        codec.decode_bundle(blockwise("int8_block", codes=b"\x01" * 8 + b"\x80"))
    with pytest.raises(codec.CodecError, match="nibble 0"):
        codec.decode_bundle(blockwise(codes=b"\x88\x88\x08\x88\x80"))
    with pytest.raises(codec.CodecError, match="padding nibble"):
        codec.decode_bundle(blockwise(codes=b"\x88\x88\x88\x88\x81"))
    assert codec.decode_bundle(blockwise(codes=b"\x88\x88\x88\x88\x80"))["q"].values.tolist() == [0.0] * 9


def test_blockwise_encoder_arguments():
    ok = {"d": codec.Dense(np.ones(3))}
    for kw, field in [({"block_size": 0}, "block_size"), ({"block_size": 1.5}, "block_size"),
                      ({"rounding": "up"}, "rounding"), ({"rounding": "stochastic"}, "seed"),
                      ({"rounding": "stochastic", "seed": -1}, "seed")]:
        with pytest.raises(codec.CodecError, match=field):
            codec.encode_bundle(ok, value_type="int4_block", **kw)


SPARSE_N = 2000
SPARSE_K = 30


@pytest.mark.parametrize("changes,field", [
    (dict(index_coder=NONE, index_param=0, index_payload=b""), "none"),
    (dict(index_coder=GOLOMB, index_param=0), "golomb m"),
    (dict(index_coder=GOLOMB, index_param=SPARSE_N + 1), "golomb m"),
    (dict(index_coder=GOLOMB, index_param=1, index_payload=b"\0"), "cannot fit"),
    (dict(index_coder=GOLOMB, index_param=1, index_payload=b"\xff" * 3 + b"\0" * 300), "terminators"),
    (dict(index_coder=GOLOMB, index_param=1, index_payload=b"\xff" * 3 + b"\x3f" + b"\0"), "longer than"),
    (dict(index_coder=GOLOMB, index_param=1, index_payload=b"\0" * 250 + b"\xff" * 3 + b"\x3f"), "past n"),
    (dict(index_coder=RANS, index_param=500), "lanes"),
    (dict(index_coder=RANS, index_param=1, index_payload=b"\0" * 10), "does not fit"),
    (dict(index_coder=RANS, index_param=1, index_payload=b"\1\0\0\0" * 17 + b"\0\0\0\x80" * 2), "frequencies"),
    (dict(index_coder=BITMAP, index_param=0, index_payload=zstd_frame.compress(bytes(249), 3)),
     "bitmap: zstd frame declares 249 bytes, header implies 250"),
    (dict(index_coder=BITMAP, index_param=0, index_payload=zstd_frame.compress(bytes(250), 3)),
     "count: bitmap holds 0 indices, count says 30"),
    (dict(index_coder=BITMAP, index_param=7, index_payload=zstd_frame.compress(bytes(250), 3)),
     "index_param: a bitmap has index_param 0, not 7"),
    (dict(index_coder=BITMAP, index_param=0, index_payload=b"\x28\xb5\x2f\xfd" + bytes(12)), "bitmap"),
])
def test_index_payload_checks(changes, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(name="sparse", **changes))


def test_rans_payload_is_checked_end_to_end():
    """The encoder no longer writes rANS (bitmap.py), so the payload is made by hand, as a version 1-3 encoder
    wrote it, 25 lanes; every flip of it is refused."""
    n, idx = 100_000, np.flatnonzero(np.random.default_rng(3).random(100_000) < 0.4)
    table, _, section = take_apart(codec.encode_bundle({"s": codec.Sparse((n,), idx, np.ones(idx.size, np.float32))}))
    payload = rans.encode(idx, n, 25)
    table.entries[0] = dataclasses.replace(table.entries[0], index_coder=RANS, index_param=25, index_size=len(payload))
    assert codec.decode_bundle(assemble(table, [payload], section))["s"].indices.tolist() == idx.tolist()
    # last word; top bit of lane 0's state (68 bytes of class table, then u64 states); a table entry
    for pos, flip, field in [(len(payload) - 1, 0x40, "rans (word stream truncated|stream does not end)"),
                             (68 + 7, 0x80, "rans state"), (0, 0x01, "frequencies"), (70, 0x01, "rans")]:
        bad = bytearray(payload)
        bad[pos] ^= flip
        with pytest.raises(codec.CodecError, match=field):
            codec.decode_bundle(assemble(table, [bytes(bad)], section))


def test_a_bitmap_is_checked_to_its_last_bit_and_needs_version_4():
    """A bitmap of n = 13 entries has 3 spare bits, which must be 0; a version 1 bundle cannot say bitmap."""
    idx = np.array([0, 5, 12])
    table, _, section = take_apart(codec.encode_bundle({"s": codec.Sparse((13,), idx, np.ones(3, np.float32))}))
    good = bitmap.encode(idx, 13, 3)
    table.entries[0] = dataclasses.replace(table.entries[0], index_coder=BITMAP, index_param=0, index_size=len(good))
    assert codec.decode_bundle(assemble(table, [good], section))["s"].indices.tolist() == [0, 5, 12]
    spare = zstd_frame.compress(bytes([0b10000100, 0b00001001]), 3)  # 0, 5, 12 and a spare bit, 15
    table.entries[0].index_size = len(spare)
    with pytest.raises(codec.CodecError, match="s: index_payload: bitmap sets a position >= n=13"):
        codec.decode_bundle(assemble(table, [spare], section))
    table.entries[0].index_size = len(good)
    raw = hdr.pack_header(table)  # a version 4 header; version 1's has no joint_size after the plane records
    record = 4 + 4 * 9
    v1 = zstd_frame.compress(raw[:record] + raw[record + 8:], 3)
    with pytest.raises(codec.CodecError, match="s: index_coder: a bitmap needs bundle version 4, this is 1"):
        codec.decode_bundle(assemble(table, [good], section, header_frame=v1, preamble=(b"ELCB", 1, 0, 0)))


@pytest.mark.parametrize("tensor,field", [
    (codec.Dense(np.array([1.0, np.nan], np.float32)), "NaN or Inf"),
    (codec.Dense(np.array([np.inf])), "NaN or Inf"),
    (codec.Dense(np.array([1e39])), "NaN or Inf"),  # float64 beyond float32
    (codec.Dense(np.array(["a"])), "dtype"),
    (codec.Sparse((10,), np.array([3, 1]), np.ones(2)), "strictly increasing"),
    (codec.Sparse((10,), np.array([1, 1]), np.ones(2)), "strictly increasing"),
    (codec.Sparse((10,), np.array([1, 10]), np.ones(2)), "outside"),
    (codec.Sparse((10,), np.array([-1, 2]), np.ones(2)), "outside"),
    (codec.Sparse((10,), np.array([1.0, 2.0]), np.ones(2)), "integer"),
    (codec.Sparse((10,), np.array([1, 2]), np.ones(3)), "3 values for 2 indices"),
    (codec.Sparse((10,), np.array([1, 2]), np.array([0.0, np.nan])), "NaN or Inf"),
    (codec.Sparse((-1, 3), np.array([], np.int64), np.ones(0)), "shape"),
    (codec.Masked((10,), 1, 0.5, np.ones(4)), "the mask has 5"),
    (codec.Masked((10,), -1, 0.5, np.ones(5)), "seed"),
    (codec.Masked((10,), 2**64, 0.5, np.ones(5)), "seed"),
    (codec.Masked((10,), 1, 1.5, np.ones(10)), "density"),
    (codec.Masked((10,), 1, 0.5, np.array([1, 2, 3, 4, np.inf])), "NaN or Inf"),
    (np.ones(3), "form"),
])
def test_encoder_rejects_bad_tensors(tensor, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.encode_bundle({"t": tensor})


def test_encoder_rejects_bad_options_and_names():
    ok = {"t": codec.Dense(np.ones(2))}
    with pytest.raises(codec.CodecError, match="value_type"):
        codec.encode_bundle(ok, value_type="float8")
    with pytest.raises(codec.CodecError, match="value_types"):
        codec.encode_bundle(ok, value_types={"u": "float16"})
    with pytest.raises(codec.CodecError, match="float16"):
        codec.encode_bundle({"t": codec.Dense(np.array([7e4]))}, value_type="float16")
    with pytest.raises(codec.CodecError, match="bfloat16"):
        codec.encode_bundle({"t": codec.Dense(np.array([3.4e38]))}, value_type="bfloat16")
    with pytest.raises(codec.CodecError, match="name"):
        codec.encode_bundle({3: codec.Dense(np.ones(2))})
    with pytest.raises(codec.CodecError, match="name"):
        codec.encode_bundle({"\ud800": codec.Dense(np.ones(2))})


def test_decode_rejects_non_bundles():
    for data in [b"", b"ELCB", b"\0" * 100, codec.encode_bundle({})[:-1]]:
        with pytest.raises(codec.CodecError):
            codec.decode_bundle(data)
    assert codec.decode_bundle(codec.encode_bundle({})) == {}
    assert math.isclose(codec.index_bound_bits(10, 5), math.log2(252))
