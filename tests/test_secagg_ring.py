"""Fixed point in Z_(2^b) (edgelora/secagg/ring.py): numbers checkable by hand, unbiased rounding, no wrap."""
import numpy as np
import pytest

from edgelora.secagg import ring
from edgelora.secagg.ring import RingSpec, decode_sum, encode, plan_ring, ring_length


def _sum(uploads, spec):
    total = np.zeros_like(uploads[0])
    for u in uploads:
        total += u  # word_dtype wraps mod 2^(8 itemsize), a multiple of 2^b
    return ring.reduce(total, spec.bits)


def test_plan_ring_by_hand():
    # 100 devices at q = 4: values in [-7, 7], sum in [-700, 700] < 2^10, so b = 11.
    assert plan_ring(100, 4, 1.0).bits == 11
    assert plan_ring(1, 2, 1.0).bits == 2  # one device, values in [-1, 1]
    assert plan_ring(128, 8, 1.0).bits == 15  # 128 * 127 = 16256 < 2^14: b = 15
    assert plan_ring(130, 8, 1.0).bits == 16  # 130 * 127 = 16510 >= 2^14
    spec = plan_ring(100, 4, 1.0, weight_cap=100)
    assert spec.count_limbs == 3 and spec.bits == 11  # 100 < 2^7 -> three 3-bit limbs, each like a value
    # Noise: 2 devices, sigma 10: 2 * 7 + ceil(10.05 * sqrt(2) * 10) = 14 + 143 = 157 < 2^8 -> b = 9.
    assert ring.NOISE_TAIL_SIGMAS == pytest.approx(10.05, abs=0.01)
    assert plan_ring(2, 4, 1.0, noise_stddev=10.0).bits == 9


def test_plan_ring_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="devices must be >= 1"):
        plan_ring(0, 4, 1.0)
    with pytest.raises(ValueError, match="value_bits must be in 2..61"):
        plan_ring(10, 1, 1.0)
    with pytest.raises(ValueError, match="more than 62"):
        plan_ring(1000, 60, 1.0)
    with pytest.raises(ValueError, match="RingSpec.clip must be finite and > 0"):
        plan_ring(10, 4, 0.0)
    with pytest.raises(ValueError, match="RingSpec.count_limbs must be 3"):
        RingSpec(bits=11, value_bits=4, clip=1.0, l2_clip=0.0, weight_cap=100, count_limbs=1, noise_stddev=0)


def test_two_devices_three_coordinates_by_hand():
    # c = 7, q = 4: s = 1, so integers stay integers and stochastic rounding leaves them alone.
    spec = plan_ring(2, 4, 7.0, weight_cap=4)  # weight = min(examples, 4) / 4
    assert spec.scale == 1.0 and spec.count_limbs == 1 and spec.bits == 5
    rng = np.random.default_rng(0)
    a = encode(np.array([4.0, -8.0, 2.0], np.float32), 2, spec, rng)  # weight 1/2: [2, -4, 1]
    b = encode(np.array([3.0, 1.0, -5.0], np.float32), 9, spec, rng)  # weight 1 (capped): [3, 1, -5]
    assert a.dtype == np.uint8 and a.tolist() == [2, 32 - 4, 1, 2]  # -4 mod 32, count limb 2
    assert b.tolist() == [3, 1, 32 - 5, 4]
    sums, weights = decode_sum(_sum([a, b], spec), spec)
    assert sums.tolist() == [5.0, -3.0, -4.0] and weights == 1.5  # (2 + 4) / 4


def test_clipping_order_l2_then_weight_then_coordinate():
    spec = plan_ring(1, 4, 7.0, l2_clip=5.0)
    x = np.array([6.0, 8.0, 0.0], np.float32)  # norm 10 -> [3, 4, 0]
    sums, _ = decode_sum(encode(x, 1, spec, np.random.default_rng(0)), spec, survivors=1)
    assert sums.tolist() == [3.0, 4.0, 0.0]
    spec = plan_ring(1, 4, 2.0)  # per coordinate only, to +-2; s = 3.5
    sums, n = decode_sum(encode(np.array([9.0, -9.0, 0.0], np.float32), 1, spec, np.random.default_rng(0)),
                         spec, survivors=1)
    assert sums.tolist() == [2.0, -2.0, 0.0] and n == 1.0


def test_unweighted_decode_needs_the_survivors():
    spec = plan_ring(3, 4, 1.0)
    with pytest.raises(ValueError, match="pass survivors="):
        decode_sum(np.zeros(3, np.uint8), spec)


def test_stochastic_rounding_is_unbiased():
    spec = plan_ring(1, 4, 1.0)  # s = 7
    x = np.array([0.3, -0.55, 0.999, -1.0, 1 / 7], np.float32)
    rng = np.random.default_rng(1)
    draws = np.stack([ring.quantize(x, 1, spec, rng) for _ in range(20000)])
    expect = x.astype(np.float64) * 7
    assert np.all(np.abs(draws - expect) < 1)  # each draw is floor or ceil of s x
    # mean of 20000 draws: stddev <= 0.5 / sqrt(20000) = 0.0035
    np.testing.assert_allclose(draws.mean(axis=0), expect, atol=0.02)
    assert not np.allclose(draws.mean(axis=0), np.round(expect), atol=0.05)  # not round-to-nearest


@pytest.mark.parametrize("value_bits", [4, 8])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_hundred_devices_at_the_extremes_do_not_wrap(value_bits, sign):
    n, d, cap = 100, 64, 1000
    spec = plan_ring(n, value_bits, 0.5, weight_cap=cap)
    rng = np.random.default_rng(2)
    uploads = [encode(np.full(d, sign * 3.0, np.float32), 10_000, spec, rng) for _ in range(n)]
    integers = [ring.lift(u, spec.bits) for u in uploads]
    assert all(np.all(i[:d] == sign * spec.level) for i in integers)  # every value at +-L
    total = _sum(uploads, spec)
    exact = np.sum(integers, axis=0)
    assert np.array_equal(ring.lift(total, spec.bits), exact)  # the ring sum is the integer sum: no wrap
    sums, weights = decode_sum(total, spec)
    np.testing.assert_allclose(sums, sign * 0.5 * n)
    assert weights == n


def test_hundred_devices_random_sum_matches_integers():
    n, d = 100, 500
    spec = plan_ring(n, 8, 1.0, weight_cap=50, l2_clip=4.0)
    rng = np.random.default_rng(3)
    examples = rng.integers(0, 120, n)
    uploads = [encode(rng.normal(0, 1, d).astype(np.float32), int(e), spec, rng) for e in examples]
    assert all(u.size == ring_length(d, spec) and u.dtype == ring.word_dtype(spec.bits) for u in uploads)
    exact = np.sum([ring.lift(u, spec.bits) for u in uploads], axis=0)
    total = _sum(uploads, spec)
    sums, weights = decode_sum(total, spec)
    np.testing.assert_allclose(sums, exact[:d] / spec.scale)
    assert weights == pytest.approx(np.minimum(examples, 50).sum() / 50)


def test_count_limbs_round_trip():
    spec = plan_ring(1, 4, 1.0, weight_cap=1000)  # 10 bits of count in 3-bit limbs: 4 limbs
    assert spec.count_limbs == 4
    for examples in (0, 1, 7, 8, 123, 999, 1000, 5000):
        up = encode(np.zeros(2, np.float32), examples, spec, np.random.default_rng(0))
        limbs = ring.lift(up, spec.bits)[2:]
        assert np.all((limbs >= 0) & (limbs <= spec.level))
        assert decode_sum(up, spec)[1] == min(examples, 1000) / 1000


def test_noise_is_added_to_values_only_and_has_the_planned_stddev():
    n, d, sigma = 10, 20_000, 3.0
    spec = plan_ring(n, 4, 1.0, weight_cap=8, noise_stddev=sigma)
    rng = np.random.default_rng(4)
    uploads = [encode(np.zeros(d, np.float32), 8, spec, rng) for _ in range(n)]
    sums, weights = decode_sum(_sum(uploads, spec), spec)
    assert weights == n  # the count limbs carry no noise
    noise = sums * spec.scale  # zero inputs: the sum is the noise, in integer units
    assert noise.std() == pytest.approx(np.sqrt(n) * sigma, rel=0.03)
    assert abs(noise.mean()) < 0.1
    np.testing.assert_allclose(noise, np.round(noise), atol=1e-9)  # integers
