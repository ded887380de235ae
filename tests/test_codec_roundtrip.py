"""Round trips of every tensor form, value type and index coder, including empty, scalar and full tensors."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from edgelora import codec
from edgelora.codec import golomb, index_coding, rans

FAST = settings(max_examples=60, deadline=None)
shapes = st.lists(st.integers(0, 7), max_size=3).map(tuple)  # includes () scalars and empty tensors
value_types = st.sampled_from(codec.VALUE_TYPES)


def finite_values(shape):
    return hnp.arrays(np.float32, shape, elements=st.floats(-6e4, 6e4, width=32))


def expected_after(values: np.ndarray, value_type: str) -> np.ndarray:
    """What a value type may turn `values` into, checked as bounds so the test does not re-implement it."""
    return {"float32": values, "float16": values.astype(np.float16).astype(np.float32)}.get(value_type)


def assert_close(decoded: np.ndarray, values: np.ndarray, value_type: str) -> None:
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    if value_type in ("float32", "float16"):
        np.testing.assert_array_equal(decoded, expected_after(values, value_type))
    elif value_type == "bfloat16":  # 8 significant bits, round to nearest: relative error <= 2**-8
        assert not (decoded.view(np.uint32) & 0xFFFF).any()
        assert np.all(np.abs(decoded - values) <= np.abs(values) * 2.0 ** -8 + 2.0 ** -134)  # + subnormal step
    elif value_type == "int8":  # absolute error <= half a step of max|v| / 127
        step = np.abs(values).max() / 127 if values.size else 0.0
        assert np.all(np.abs(decoded - values) <= step / 2 * 1.0001 + 1e-30)
    else:  # blockwise: half a step of each block's own max|v| / levels
        assert np.all(np.abs(decoded - values) <= block_steps(values, value_type) / 2 * 1.0001 + 1e-30)


def block_steps(values: np.ndarray, value_type: str, block: int = 64, stochastic: bool = False) -> np.ndarray:
    """Each value's quantisation step under a blockwise type: its block's max|v| / levels."""
    levels = {"int8_block": 127, "int4_block": 7}[value_type]
    flat = values.reshape(-1)
    peaks = np.array([np.abs(flat[i:i + block]).max() for i in range(0, flat.size, block)]) if flat.size else np.zeros(0)
    return (np.repeat(peaks, block)[:flat.size] / levels).reshape(values.shape) * (2 if stochastic else 1)


@FAST
@given(shape=shapes, value_type=value_types, data=st.data())
def test_dense_round_trip(shape, value_type, data):
    values = data.draw(finite_values(shape))
    out = codec.decode_bundle(codec.encode_bundle({"w": codec.Dense(values)}, value_type=value_type))
    assert list(out) == ["w"] and isinstance(out["w"], codec.Dense)
    assert_close(out["w"].values, values, value_type)


@FAST
@given(shape=shapes, value_type=value_types, data=st.data())
def test_sparse_round_trip(shape, value_type, data):
    n = math.prod(shape)
    chosen = data.draw(hnp.arrays(bool, n))  # any subset, from empty to full
    indices = np.flatnonzero(chosen).astype(np.int64)
    values = data.draw(finite_values(indices.size))
    out = codec.decode_bundle(codec.encode_bundle({"s": codec.Sparse(shape, indices, values)},
                                                  value_type=value_type))["s"]
    assert isinstance(out, codec.Sparse) and out.shape == shape
    np.testing.assert_array_equal(out.indices, indices)
    assert out.indices.dtype == np.int64
    assert_close(out.values, values, value_type)


@FAST
@given(shape=shapes, density=st.floats(0, 1), seed=st.integers(0, 2**64 - 1), value_type=value_types,
       data=st.data())
def test_masked_round_trip(shape, density, seed, value_type, data):
    values = data.draw(finite_values(codec.mask_size(shape, density)))
    out = codec.decode_bundle(codec.encode_bundle({"m": codec.Masked(shape, seed, density, values)},
                                                  value_type=value_type))["m"]
    assert isinstance(out, codec.Masked)
    assert (out.shape, out.seed, out.density) == (shape, seed, density)
    assert_close(out.values, values, value_type)


def test_bundle_keeps_insertion_order_and_per_tensor_value_types():
    tensors = {"z": codec.Dense(np.arange(6, dtype=np.float32).reshape(2, 3) / 7),
               "a": codec.Sparse((10,), np.array([2, 5]), np.array([1.5, -2.25], np.float32)),
               "m": codec.Masked((4, 4), 3, 0.5, np.linspace(-1, 1, 8, dtype=np.float32))}
    data = codec.encode_bundle(tensors, value_type="float16", value_types={"z": "float32"})
    out = codec.decode_bundle(data)
    assert list(out) == ["z", "a", "m"]
    np.testing.assert_array_equal(out["z"].values, tensors["z"].values)  # float32 override: exact
    assert out["m"].values[1] == np.float16(np.linspace(-1, 1, 8)[1])  # float16: rounded
    dense = codec.to_dense("m", out["m"])
    np.testing.assert_array_equal(np.flatnonzero(dense.reshape(-1)), codec.mask_indices(3, "m", (4, 4), 0.5))


def test_value_types_known_numbers():
    values = np.array([1.0, -0.5, 1.00390625, 3.0e-3, 127.0], np.float32)
    out = {vt: codec.decode_bundle(codec.encode_bundle({"v": codec.Dense(values)}, value_type=vt))["v"].values
           for vt in codec.VALUE_TYPES}
    # bfloat16 keeps 8 significant bits: 1 + 2**-8 is a tie between 1 and 1 + 2**-7 and rounds to even (1).
    assert out["bfloat16"][2] == 1.0
    # int8 scale is max|v| / 127 = 1: values round to whole numbers.
    np.testing.assert_array_equal(out["int8"], [1.0, -0.0, 1.0, 0.0, 127.0])
    assert out["float16"][3] == np.float32(np.float16(3.0e-3))


def test_int8_scales_per_tensor():
    small, large = np.array([0.01, -0.02], np.float32), np.array([100.0, 50.0], np.float32)
    out = codec.decode_bundle(codec.encode_bundle({"s": codec.Dense(small), "l": codec.Dense(large)},
                                                  value_type="int8"))
    np.testing.assert_allclose(out["s"].values, small, atol=0.02 / 254)
    np.testing.assert_allclose(out["l"].values, large, atol=100 / 254)


@pytest.mark.parametrize("n,density,coder", [
    (1000, 0.0, index_coding.NONE), (1000, 1.0, index_coding.NONE), (100_000, 0.01, index_coding.GOLOMB),
    (100_000, 0.4, index_coding.BITMAP), (1000, 0.4, index_coding.GOLOMB),
    (200_000, 0.5, index_coding.BITMAP)])  # Golomb's m = 1 is the bitmap: the frame, 20 bytes more, reads faster
def test_smallest_coder_is_chosen(n, density, coder):
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(n, round(density * n), replace=False)).astype(np.int64)
    chosen, param, payload = index_coding.encode_indices(indices, n)
    assert chosen == coder
    np.testing.assert_array_equal(index_coding.decode_indices(chosen, param, payload, n, indices.size), indices)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.0625, 0.25, 0.38, 0.5])
def test_index_bits_within_three_percent_of_bound(density):
    n = 200_000
    rng = np.random.default_rng(1)
    indices = np.sort(rng.choice(n, round(density * n), replace=False)).astype(np.int64)
    _, _, payload = index_coding.encode_indices(indices, n)
    assert 8 * len(payload) <= 1.03 * index_coding.bound_bits(n, indices.size)


@FAST
@given(n=st.integers(1, 3000), m=st.integers(1, 70), data=st.data())
def test_golomb_any_parameter_round_trips(n, m, data):
    indices = np.flatnonzero(data.draw(hnp.arrays(bool, n))).astype(np.int64)
    if indices.size == 0:
        return
    m = min(m, n)
    payload = golomb.encode(golomb.gaps_of(indices), m)
    assert len(payload) == -(-golomb.golomb_bits(golomb.gaps_of(indices), m) // 8)
    np.testing.assert_array_equal(golomb.decode(payload, m, n, indices.size), indices)


@FAST
@given(n=st.integers(1, 5000), p=st.floats(0.05, 0.95), lanes=st.integers(1, 40), seed=st.integers(0, 99))
def test_rans_round_trips(n, p, lanes, seed):
    indices = np.flatnonzero(np.random.default_rng(seed).random(n) < p).astype(np.int64)
    lanes = min(lanes, -(-n // 16))
    payload = rans.encode(indices, n, lanes)
    if payload is None:  # the class table cannot represent this p; the encoder falls back to Golomb
        return
    np.testing.assert_array_equal(rans.decode(payload, lanes, n, indices.size), indices)


@FAST
@given(value_type=st.sampled_from(["int8", "int8_block", "int4_block"]), n=st.integers(0, 300),
       block=st.sampled_from([1, 7, 64, 256]), seed=st.integers(0, 2**32), data=st.data())
def test_stochastic_rounding_round_trip(value_type, n, block, seed, data):
    """Stochastic codes are floor(v / scale + u): within one step of v, never past the block's range."""
    values = data.draw(finite_values(n))
    encode = lambda: codec.encode_bundle({"d": codec.Dense(values)}, value_type=value_type, block_size=block,
                                         rounding="stochastic", seed=seed)
    first = encode()
    assert first == encode()  # the seed fixes the draws
    out = codec.decode_bundle(first)["d"].values
    if value_type == "int8":
        step = np.abs(values).max() / 127 if n else 0.0
    else:
        step = block_steps(values, value_type, block)
    assert np.all(np.abs(out - values) <= step * 1.0001 + 1e-30)


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    """A value 0.3 steps above a code: nearest always rounds it down, stochastic's mean over seeds is it."""
    values = np.full(640, 0.3 / 7, np.float32)
    values[::64] = 1.0  # each block's peak: scale 1/7, so the rest sit 0.3 of a step above code 0
    decode = lambda **kw: codec.decode_bundle(codec.encode_bundle({"d": codec.Dense(values)},
                                                                  value_type="int4_block", **kw))["d"].values
    assert np.all(decode()[values < 1] == 0.0)
    means = np.mean([decode(rounding="stochastic", seed=s)[values < 1] for s in range(400)], axis=0)
    assert abs(means.mean() - 0.3 / 7) < 0.002  # 400 x 630 draws: the mean's standard error is ~0.0004


def test_block_scales_follow_each_block():
    """A large value costs only its own block's precision: the small block stays exact to its own step."""
    values = np.concatenate([np.full(64, 1e-3, np.float32), np.full(64, 10.0, np.float32)])
    values[0], values[64] = 2e-3, 20.0
    for vt, levels in (("int8_block", 127), ("int4_block", 7)):
        out = codec.decode_bundle(codec.encode_bundle({"d": codec.Dense(values)}, value_type=vt))["d"].values
        assert np.abs(out[:64] - values[:64]).max() <= 2e-3 / levels / 2 * 1.0001
        per_tensor = codec.decode_bundle(codec.encode_bundle({"d": codec.Dense(values)}, value_type="int8"))["d"]
        assert np.all(per_tensor.values[1:64] == 0.0)  # one scale of 20 / 127 rounds the small block to zero


def test_blockwise_sizes_and_versions():
    """int4 packs two codes a byte plus a float32 scale per block; only bundles that use them are version 2."""
    rng = np.random.default_rng(3)
    values = rng.integers(-7, 8, 6401).astype(np.float32)  # incompressible codes; odd count pads a nibble
    i4 = codec.encode_bundle({"d": codec.Dense(values)}, value_type="int4_block", block_size=64)
    f16 = codec.encode_bundle({"d": codec.Dense(values)}, value_type="float16")
    assert i4[4] == 2 and f16[4] == 1
    header = 12 + int.from_bytes(i4[8:12], "little")
    assert len(i4) - header - 4 >= 3201 + 4 * 101  # the codes' bytes and 101 scales' bytes, as stored
    assert len(i4) < 3201 + 4 * 101 + 100
