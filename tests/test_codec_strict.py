"""Decoding trusts nothing and encoding accepts only well-formed tensors: one test per check.

Hostile bundles are built by taking a valid bundle apart (header entries + payloads), changing one thing,
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
from edgelora.codec import container, header as hdr, zstd_frame
from edgelora.codec.index_coding import GOLOMB, NONE, RANS
from edgelora.codec.values import VALUE_TYPES

RNG = np.random.default_rng(7)
TENSORS = {
    "dense": codec.Dense(RNG.normal(size=(3, 4)).astype(np.float32)),
    "sparse": codec.Sparse((50, 40), np.sort(RNG.choice(2000, 30, replace=False)), RNG.normal(size=30)),
    "masked": codec.Masked((8, 8), 3, 0.25, RNG.normal(size=16)),
}


def take_apart(data: bytes) -> tuple[list[hdr.Entry], list[bytes]]:
    (header_size,) = struct.unpack_from("<I", data, 8)
    frame = data[12:12 + header_size]
    entries = hdr.parse_header(zstd_frame.decompress(frame, zstd_frame.content_size(frame, "h"), "h"), 1 << 40)
    payloads, pos = [], 12 + header_size
    for e in entries:
        payloads.append(data[pos:pos + e.index_size])
        payloads.append(data[pos + e.index_size:pos + e.index_size + e.value_size])
        pos += e.index_size + e.value_size
    return entries, payloads


def assemble(entries, payloads, *, preamble=(b"ELCB", 1, 0, 0), header_frame=None) -> bytes:
    frame = header_frame if header_frame is not None else zstd_frame.compress(hdr.pack_header(entries), 3)
    body = struct.pack("<4sBBHI", *preamble, len(frame)) + frame + b"".join(payloads)
    return body + struct.pack("<I", zlib.crc32(body))


def with_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def rebuilt(value_type="float32", tensors=TENSORS, **changes):
    """A valid bundle with one tensor's entry (changes["name"]) altered by `changes`; payloads unchanged."""
    entries, payloads = take_apart(codec.encode_bundle(tensors, value_type=value_type))
    name = changes.pop("name")
    i = next(i for i, e in enumerate(entries) if e.name == name)
    payload_changes = {k: changes.pop(k) for k in ("index_payload", "value_payload") if k in changes}
    entries[i] = dataclasses.replace(entries[i], **changes)
    if "index_payload" in payload_changes:
        payloads[2 * i] = payload_changes["index_payload"]
        entries[i].index_size = len(payloads[2 * i])
    if "value_payload" in payload_changes:
        payloads[2 * i + 1] = payload_changes["value_payload"]
        entries[i].value_size = len(payloads[2 * i + 1])
    return assemble(entries, payloads)


VALID = codec.encode_bundle(TENSORS)


def test_valid_bundle_decodes():  # the baseline every other test breaks in one place
    assert list(codec.decode_bundle(VALID)) == ["dense", "sparse", "masked"]
    assert list(codec.decode_bundle(assemble(*take_apart(VALID)))) == ["dense", "sparse", "masked"]


def test_every_truncation_is_rejected():
    for cut in range(len(VALID)):
        with pytest.raises(codec.CodecError):
            codec.decode_bundle(VALID[:cut])


@pytest.mark.parametrize("preamble,field", [
    ((b"ELCX", 1, 0, 0), "magic"), ((b"ELCB", 2, 0, 0), "version"), ((b"ELCB", 0, 0, 0), "version"),
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
    entries, payloads = take_apart(VALID)
    frame = zstd_frame.compress(hdr.pack_header(entries) + b"\0", 3)
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.decode_bundle(assemble(entries, payloads, header_frame=frame))


@pytest.mark.parametrize("changes,field", [
    (dict(name="dense", form=7), "form"),
    (dict(name="sparse", index_coder=9), "index_coder"),
    (dict(name="dense", value_codec=5), "value_codec"),
    (dict(name="dense", count=11), "count"),
    (dict(name="sparse", count=2001), "count"),
    (dict(name="sparse", shape=(2**32, 2**32)), "max_elements"),
    (dict(name="masked", density=float("nan")), "density"),
    (dict(name="masked", density=1.5), "density"),
    (dict(name="masked", count=15), "count"),
    (dict(name="dense", shape=(1,) * 33), "ndim"),
])
def test_header_field_checks(changes, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(**changes))


def test_duplicate_names():
    entries, payloads = take_apart(VALID)
    entries[2].name = "dense"
    with pytest.raises(codec.CodecError, match="appears twice"):
        codec.decode_bundle(assemble(entries, payloads))


def test_unknown_value_type_and_bad_utf8_name():
    entries, payloads = take_apart(VALID)
    raw = bytearray(hdr.pack_header(entries))
    raw[4 + 2 + len("dense") + 1] = len(VALUE_TYPES)  # value_type byte of the first entry
    with pytest.raises(codec.CodecError, match="value_type"):
        codec.decode_bundle(assemble(entries, payloads, header_frame=zstd_frame.compress(bytes(raw), 3)))
    raw = bytearray(hdr.pack_header(entries))
    raw[6] = 0xFF  # first byte of the first name
    with pytest.raises(codec.CodecError, match="UTF-8"):
        codec.decode_bundle(assemble(entries, payloads, header_frame=zstd_frame.compress(bytes(raw), 3)))


def test_max_elements_caps_the_bundle():
    codec.decode_bundle(VALID, max_elements=12 + 2000 + 64)
    with pytest.raises(codec.CodecError, match="max_elements"):
        codec.decode_bundle(VALID, max_elements=12 + 2000 + 63)


def test_payload_sizes_must_add_up():
    entries, payloads = take_apart(VALID)
    with pytest.raises(codec.CodecError, match="value_size"):
        codec.decode_bundle(assemble(entries, payloads + [b"\0"]))
    entries[0].value_size += 1 << 60
    with pytest.raises(codec.CodecError, match="value_size"):
        codec.decode_bundle(assemble(entries, payloads))


def test_raw_value_size_must_match_count():
    data = rebuilt(name="masked", value_codec=hdr.RAW, value_payload=b"\0" * 60)
    with pytest.raises(codec.CodecError, match="value_size"):
        codec.decode_bundle(data)


def test_nan_and_inf_in_payload_are_rejected():
    for bad in (np.nan, np.inf, -np.inf):
        values = np.ones(12, "<f4")
        values[5] = bad
        data = rebuilt(name="dense", value_codec=hdr.RAW, value_payload=values.view(np.uint8).reshape(-1, 4).T.tobytes())
        with pytest.raises(codec.CodecError, match="NaN or Inf"):
            codec.decode_bundle(data)


def test_zstd_bomb_is_rejected_before_decompressing():
    bomb = zstd_frame.compress(b"\0" * (64 << 20), 3)  # 64 MiB of zeros in a few KiB
    data = rebuilt(name="dense", value_codec=hdr.ZSTD, value_payload=bomb)
    tracemalloc.start()
    with pytest.raises(codec.CodecError, match="declares 67108864 bytes, header implies 48"):
        codec.decode_bundle(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


def test_zstd_frame_that_lies_about_its_size():
    frame = bytearray(zstd_frame.compress(RNG.bytes(200), 3))
    assert frame[4] >> 5 == 1  # single-segment, 1-byte content size at offset 5
    frame[5] = 48  # claims the 48 bytes the header implies; holds 200
    with pytest.raises(codec.CodecError, match="corrupt zstd frame"):
        codec.decode_bundle(rebuilt(name="dense", value_codec=hdr.ZSTD, value_payload=bytes(frame)))


def test_zstd_value_frames_need_checksum_and_no_trailing_data():
    planes = np.ones(12, "<f4").view(np.uint8).reshape(-1, 4).T.tobytes()
    no_sum = zstandard.ZstdCompressor(write_checksum=False).compress(planes)
    with pytest.raises(codec.CodecError, match="checksum"):
        codec.decode_bundle(rebuilt(name="dense", value_codec=hdr.ZSTD, value_payload=no_sum))
    trailing = zstd_frame.compress(planes, 3) + b"junk"
    with pytest.raises(codec.CodecError, match="corrupt zstd frame"):
        codec.decode_bundle(rebuilt(name="dense", value_codec=hdr.ZSTD, value_payload=trailing))


def test_int8_scale_and_code_range():
    with pytest.raises(codec.CodecError, match="scale"):
        codec.decode_bundle(rebuilt("int8", name="dense", scale=0.0))
    with pytest.raises(codec.CodecError, match="scale"):
        codec.decode_bundle(rebuilt("int8", name="dense", scale=float("inf")))
    with pytest.raises(codec.CodecError, match="-128"):
        codec.decode_bundle(rebuilt("int8", name="dense", value_codec=hdr.RAW, value_payload=b"\x80" * 12))


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
])
def test_index_payload_checks(changes, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(name="sparse", **changes))


def test_rans_payload_is_checked_end_to_end():
    n, idx = 100_000, np.flatnonzero(RNG.random(100_000) < 0.4)
    tensors = {"s": codec.Sparse((n,), idx, np.ones(idx.size, np.float32))}
    entries, payloads = take_apart(codec.encode_bundle(tensors))
    assert entries[0].index_coder == RANS
    # last word; top bit of lane 0's state (68 bytes of class table, then u64 states); a table entry
    for pos, flip, field in [(len(payloads[0]) - 1, 0x40, "does not end"), (68 + 7, 0x80, "rans state"),
                             (0, 0x01, "frequencies"), (70, 0x01, "rans")]:
        bad = bytearray(payloads[0])
        bad[pos] ^= flip
        with pytest.raises(codec.CodecError, match=field):
            codec.decode_bundle(assemble(entries, [bytes(bad), payloads[1]]))


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
