"""Ring payloads (codec/ring.py): b-bit values packed at exactly b bits, strict decoding."""
import struct
import time

import numpy as np
import pytest

from edgelora.codec import CodecError, decode_ring, encode_ring, ring_payload_size
from edgelora.codec.ring import RING_HEADER_SIZE, ring_dtype

BITS = (1, 7, 8, 12, 16, 17, 31, 32, 33, 62)


def _values(bits: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=n, dtype=np.uint64).astype(ring_dtype(bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_round_trip_at_exactly_b_bits_a_value(bits, n):
    v = _values(bits, n, seed=bits * 1000 + n)
    data = encode_ring(v, bits)
    assert len(data) == RING_HEADER_SIZE + (n * bits + 7) // 8 == ring_payload_size(n, bits)
    out = decode_ring(data, bits=bits, count=n)
    assert out.dtype == ring_dtype(bits) and np.array_equal(out, v)


@pytest.mark.parametrize("bits", BITS)
def test_the_extremes_round_trip(bits):
    v = np.array([0, (1 << bits) - 1, 1, (1 << bits) - 2 if bits > 1 else 0] * 3, np.uint64)
    assert np.array_equal(decode_ring(encode_ring(v, bits), bits=bits, count=v.size), v)


def test_the_bytes_by_hand():
    # 3 values of 4 bits, LSB first: 0x1, 0x2, 0xF -> byte 0 = 0x21, byte 1 = 0x0F.
    data = encode_ring(np.array([1, 2, 15], np.uint8), 4)
    assert data == b"ELRG" + bytes([1, 4]) + struct.pack("<I", 3) + bytes([0x21, 0x0F])
    # 12 bits: 0xABC, 0x123 -> stream bytes BC, 3A, 12 (value 1's low nibble shares byte 1).
    assert encode_ring(np.array([0xABC, 0x123], np.uint16), 12)[10:] == bytes([0xBC, 0x3A, 0x12])
    # Whole-byte widths are plain little-endian words.
    v = np.array([0x0102030405060708, 7], np.uint64)
    assert encode_ring(v, 64)[10:] == v.astype("<u8").tobytes()


def test_encode_refuses_values_outside_the_ring():
    with pytest.raises(CodecError, match=r">= 2\^12"):
        encode_ring(np.array([4096], np.uint16), 12)
    with pytest.raises(CodecError, match="negative"):
        encode_ring(np.array([-1], np.int64), 12)
    with pytest.raises(CodecError, match="bits 0 is not in 1..64"):
        encode_ring(np.array([0], np.uint8), 0)
    with pytest.raises(CodecError, match="1-D"):
        encode_ring(np.zeros((2, 2), np.uint8), 4)
    with pytest.raises(CodecError, match="integers"):
        encode_ring(np.zeros(2, np.float32), 4)


def test_decode_names_what_is_wrong():
    v = _values(12, 100)
    data = encode_ring(v, 12)
    with pytest.raises(CodecError, match="12-bit values, this round expects 14"):
        decode_ring(data, bits=14, count=100)
    with pytest.raises(CodecError, match="100 values, this round expects 99"):
        decode_ring(data, bits=12, count=99)
    with pytest.raises(CodecError, match="truncated, 159 bytes of 160"):
        decode_ring(data[:-1], bits=12, count=100)
    with pytest.raises(CodecError, match="3 trailing bytes"):
        decode_ring(data + b"\0\0\0", bits=12, count=100)
    with pytest.raises(CodecError, match="magic"):
        decode_ring(b"ELCB" + data[4:], bits=12, count=100)
    with pytest.raises(CodecError, match="version 2"):
        decode_ring(data[:4] + b"\x02" + data[5:], bits=12, count=100)
    with pytest.raises(CodecError, match="shorter than its 10-byte header"):
        decode_ring(data[:6], bits=12, count=100)


def test_nonzero_padding_bits_are_refused():
    data = bytearray(encode_ring(np.array([1, 2, 3], np.uint8), 3))  # 9 bits: 7 padding bits in byte 2
    data[-1] |= 0x80
    with pytest.raises(CodecError, match="padding bits"):
        decode_ring(bytes(data), bits=3, count=3)
    data[-1] &= 0x01  # the value bit alone is fine
    assert decode_ring(bytes(data), bits=3, count=3).tolist() == [1, 2, 3]


def test_every_byte_flip_in_the_values_changes_them_or_is_refused():
    v = _values(17, 40, seed=3)
    data = bytearray(encode_ring(v, 17))
    for i in range(RING_HEADER_SIZE, len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        try:
            out = decode_ring(bytes(flipped), bits=17, count=40)
        except CodecError:
            continue
        assert not np.array_equal(out, v)


def test_five_million_values_at_12_bits_pack_fast():
    v = _values(12, 5_000_000, seed=7)
    t0 = time.perf_counter()
    data = encode_ring(v, 12)
    t1 = time.perf_counter()
    out = decode_ring(data, bits=12, count=v.size)
    t2 = time.perf_counter()
    assert np.array_equal(out, v) and len(data) == 10 + 7_500_000
    print(f"\n5M values at b=12: encode {t1 - t0:.3f} s, decode {t2 - t1:.3f} s, {len(data)} bytes "
          f"(int64 would be {8 * v.size})")
