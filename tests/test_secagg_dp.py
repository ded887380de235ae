"""Distributed discrete Gaussian DP (edgelora/secagg/dp.py): the sampler, the sizing, the accountant."""
import math

import numpy as np
import pytest

from edgelora.secagg import dp

pytest.importorskip("dp_accounting")
from edgelora.server.aggregation import dp_epsilon  # noqa: E402  central DP-FedAvg's accountant


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    k = np.arange(-60 * math.ceil(sigma), 60 * math.ceil(sigma) + 1)
    norm = np.exp(-k.astype(float) ** 2 / (2 * sigma ** 2)).sum()
    return np.exp(-support.astype(float) ** 2 / (2 * sigma ** 2)) / norm


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5, 40.0])
def test_discrete_gaussian_matches_its_stddev(sigma):
    x = dp.discrete_gaussian(400_000, sigma, np.random.default_rng(int(sigma * 10)))
    assert x.dtype == np.int64
    k = np.arange(-60 * math.ceil(sigma), 60 * math.ceil(sigma) + 1)
    exact_var = float((_pmf(sigma, k) * k.astype(float) ** 2).sum())  # ~ sigma^2 once sigma >= 1
    assert x.var() == pytest.approx(exact_var, rel=0.02)
    assert abs(x.mean()) < 5 * math.sqrt(exact_var / x.size)


def test_discrete_gaussian_pmf_at_small_sigma():
    sigma = 1.0
    x = dp.discrete_gaussian(500_000, sigma, np.random.default_rng(5))
    values = np.arange(-3, 4)
    freq = np.array([(x == v).mean() for v in values])
    # P(0) = 1 / sum_k exp(-k^2 / 2) = 0.3989..., P(+-1) = 0.2420..., P(+-2) = 0.0540...
    np.testing.assert_allclose(freq, _pmf(sigma, values), atol=0.003)
    assert dp.discrete_gaussian(5, 0.0, np.random.default_rng(0)).tolist() == [0] * 5


def test_device_stddev_by_hand():
    # C = 1, s = 100, d = 10000: Delta_2 = 100 + 100 = 200; z = 1.5, t = 9: 1.5 * 200 / 3 = 100.
    assert dp.l2_sensitivity(1.0, 100.0, 10_000) == 200.0
    assert dp.device_noise_stddev(1.5, 1.0, 100.0, 10_000, 9) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="l2_clip must be finite and > 0"):
        dp.device_noise_stddev(1.0, 0.0, 100.0, 10, 3)
    with pytest.raises(ValueError, match="min_survivors must be >= 1"):
        dp.device_noise_stddev(1.0, 1.0, 100.0, 10, 0)


def test_noise_sums_to_the_target_over_the_threshold():
    z, clip, scale, d, t = 1.0, 1.0, 30.0, 400, 4
    sigma = dp.device_noise_stddev(z, clip, scale, d, t)
    rng = np.random.default_rng(6)
    total = sum(dp.discrete_gaussian(100_000, sigma, rng) for _ in range(t))
    assert total.std() == pytest.approx(z * dp.l2_sensitivity(clip, scale, d), rel=0.02)


def test_epsilon_matches_central_gaussian_at_large_sigma():
    z, clip, scale, d, t = 1.0, 1.0, 127 * 316 / 4, 100_000, 50
    sigma = dp.device_noise_stddev(z, clip, scale, d, t)
    eps = dp.epsilon(100, noise_stddev=sigma, l2_clip=clip, scale=scale, dimension=d, min_survivors=t,
                     delta=1e-5, devices=100)
    central = dp_epsilon(z, 1.0, 100, 1e-5)
    print(f"\nz=1, 100 rounds, delta 1e-5: distributed {eps:.4f}, central Gaussian {central:.4f}")
    assert central <= eps <= central * 1.001


def test_the_sum_gap_shows_at_small_sigma():
    # sigma ~ 0.4: tau = 10 sum exp(-2 pi^2 sigma^2 k / (k + 1)) is no longer nil, so epsilon is above central.
    z, clip, scale, d, t = 1.0, 1.0, 1.0, 4, 50
    sigma = dp.device_noise_stddev(z, clip, scale, d, t)
    assert dp.sum_gap_tau(sigma, t) > 1e-3
    eps = dp.epsilon(10, noise_stddev=sigma, l2_clip=clip, scale=scale, dimension=d, min_survivors=t, delta=1e-5)
    assert eps > dp_epsilon(z, 1.0, 10, 1e-5) * 1.01


def test_epsilon_grows_with_rounds_and_falls_with_z():
    clip, scale, d, t = 1.0, 50.0, 1000, 20

    def eps(rounds, z):
        sigma = dp.device_noise_stddev(z, clip, scale, d, t)
        return dp.epsilon(rounds, noise_stddev=sigma, l2_clip=clip, scale=scale, dimension=d, min_survivors=t,
                          delta=1e-5)

    by_rounds = [eps(r, 1.0) for r in (1, 10, 100, 1000)]
    by_z = [eps(100, z) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_z == sorted(by_z, reverse=True) and len(set(by_z)) == 4
    assert eps(0, 1.0) == 0.0
    assert dp.epsilon(5, noise_stddev=0.0, l2_clip=clip, scale=scale, dimension=d, min_survivors=t,
                      delta=1e-5) == math.inf


def test_sizing_for_the_sampled_count_would_overstate_privacy():
    # sigma sized for all 100 sampled, but only the threshold 50 survive: less noise than promised.
    clip, scale, d = 1.0, 50.0, 1000
    honest = dp.device_noise_stddev(1.0, clip, scale, d, 50)
    naive = dp.device_noise_stddev(1.0, clip, scale, d, 100)
    kw = dict(l2_clip=clip, scale=scale, dimension=d, min_survivors=50, delta=1e-5, devices=100)
    assert dp.epsilon(100, noise_stddev=naive, **kw) > dp.epsilon(100, noise_stddev=honest, **kw)
    assert honest == pytest.approx(naive * math.sqrt(2))
