"""Distributed differential privacy under secure aggregation: each device adds integer noise to its ring
integers, so the unmasked sum carries the whole noise and no party, the coordinator included, ever sees a
less noisy vector (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021; arXiv 2102.06387, cited below as KLS).

Noise: the distributed discrete Gaussian, each device N_Z(0, sigma^2) per coordinate (KLS section 3), drawn
by Canonne, Kamath, Steinke 2020 ("The Discrete Gaussian for Differential Privacy", Algorithm 3) from the
device's numpy Generator. Chosen over Skellam (Agarwal, Kairouz, Liu 2021) because
- its privacy is zCDP-shaped, so the accountant is dp-accounting's own `ZCDpEvent`, composed over rounds by its
  RDP accountant; the one gap, that a sum of discrete Gaussians is not exactly one, is KLS Theorem 1 /
  Proposition 14 in closed form (tau below, ~10 n exp(-pi^2 sigma^2): nil once sigma >= 2). Skellam's sum is
  exact, but its RDP (Agarwal et al. Theorem 3.5) has a non-Gaussian 1/mu^2 term that dp-accounting has no
  event for: we would hand-write the RDP curve;
- for the same noise multiplier z its epsilon equals the central Gaussian's to within tau, so "distributed DP
  at z" and central DP-FedAvg at z report the same budget (tests/test_secagg_dp.py checks it);
- it is sub-Gaussian with parameter sigma (CKS Corollary 9), so ring.plan_ring sizes b with a Gaussian tail.
The sampler computes its acceptance probabilities in float64 (as TFF's distributed DP does), not with CKS's
exact rational arithmetic: exact up to float64 rounding, and vectorised (no Python loop per value).

Honest accounting:
- sigma is sized for the threshold t (the fewest survivors for which the coordinator can still unmask): with
  n >= t survivors the noise only grows (device_noise_stddev, KLS section 5);
- the L2 sensitivity is in integer units after scaling and includes stochastic rounding's norm growth: every
  coordinate moves by less than 1, so ||round(s x)||_2 <= s C + sqrt(d), deterministically (KLS section 4.1
  gives this bound next to conditional rounding's tighter, probabilistic one; no beta enters delta here);
- no sampling amplification: devices are not Poisson-sampled and dropouts are adversarial, so each round
  costs the full mechanism;
- the count limbs (ring.py) carry the sum of min(examples, cap) without noise: with weight_cap > 0 the total
  weight is released exactly and is outside this guarantee (use weight_cap = 0 for DP runs, or a fixed
  denominator as McMahan et al. 2018 do).

Imports numpy; dp-accounting lazily (optional: the `dp` extra).
"""
from __future__ import annotations

import logging
import math

import numpy as np

# dp-accounting's RdpAccountant logs each order it cannot use; the epsilon is the library's either way.
_ABSL_LOGGER = "absl"


def discrete_gaussian(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """`size` independent draws of the discrete Gaussian N_Z(0, sigma^2) (P(x) ~ exp(-x^2 / (2 sigma^2)) on
    the integers), int64. CKS 2020 Algorithm 3: propose from the discrete Laplace with scale t = floor(sigma)
    + 1 (Algorithm 2: a difference of two geometric draws), accept with probability
    exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2)); the rejected coordinates are redrawn, all at once."""
    if size < 0:
        raise ValueError(f"discrete_gaussian: size must be >= 0, got {size}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"discrete_gaussian: sigma must be finite and >= 0, got {sigma}")
    out = np.zeros(size, np.int64)
    if sigma == 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # geometric success probability: P(k) ~ exp(-k / t)
    pending = np.arange(size)
    while pending.size:
        m = pending.size
        y = rng.geometric(p, m) - rng.geometric(p, m)
        accept = rng.random(m) < np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2.0 * sigma * sigma))
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


def l2_sensitivity(l2_clip: float, scale: float, dimension: int) -> float:
    """One device's largest L2 norm in integer units: s C + sqrt(d). The vector is clipped to C, weighted by
    at most 1, scaled by s, then stochastically rounded, which moves each of d coordinates by < 1 (KLS
    section 4.1, the deterministic bound)."""
    _check_positive("l2_clip", l2_clip)
    _check_positive("scale", scale)
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    return scale * l2_clip + math.sqrt(dimension)


def device_noise_stddev(noise_multiplier: float, l2_clip: float, scale: float, dimension: int,
                        min_survivors: int) -> float:
    """Per-device sigma (integer units) so that any min_survivors devices' noise sums to a stddev of
    noise_multiplier x the L2 sensitivity: z Delta_2 / sqrt(t). Sized for the threshold t, not the sampled
    count: fewer survivors would otherwise mean less noise than promised (KLS section 5)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    _check_survivors(min_survivors, min_survivors)
    return noise_multiplier * l2_sensitivity(l2_clip, scale, dimension) / math.sqrt(min_survivors)


def sum_gap_tau(noise_stddev: float, devices: int) -> float:
    """KLS Theorem 1's tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)): how far the sum of n
    devices' N_Z(0, sigma^2) is from N_Z(0, n sigma^2). Increasing in n, so the sampled count bounds it."""
    k = np.arange(1, devices, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi ** 2 * noise_stddev ** 2 * k / (k + 1)).sum())


def round_rho(noise_stddev: float, l2_clip: float, scale: float, dimension: int, min_survivors: int,
              devices: int | None = None) -> float:
    """zCDP rho of one round, for any number of survivors n in [min_survivors, devices] (devices: the sampled
    count, default min_survivors). KLS Proposition 14 (Theorem 1 in RDP form), the two terms linear in the
    order alpha, so D_alpha <= alpha rho:
        rho = min((D2^2 + 2 D1 tau + tau^2 d) / 2,  (D2 + sqrt(d) tau)^2 / 2),
        D2 = Delta_2 / (sqrt(n) sigma), D1 = Delta_1 / (sqrt(n) sigma), Delta_1 = sqrt(d) Delta_2.
    D2 and D1 are largest at n = t and tau at n = devices, so rho bounds every n in between."""
    devices = min_survivors if devices is None else devices
    _check_survivors(min_survivors, devices)
    if not (math.isfinite(noise_stddev) and noise_stddev >= 0):
        raise ValueError(f"noise_stddev must be finite and >= 0, got {noise_stddev}")
    if noise_stddev == 0:
        return math.inf
    delta_2 = l2_sensitivity(l2_clip, scale, dimension)
    d2 = delta_2 / (math.sqrt(min_survivors) * noise_stddev)
    d1 = math.sqrt(dimension) * d2  # ||v||_1 <= sqrt(d) ||v||_2
    tau = sum_gap_tau(noise_stddev, devices)
    return min((d2 * d2 + 2.0 * d1 * tau + tau * tau * dimension) / 2.0,
               (d2 + math.sqrt(dimension) * tau) ** 2 / 2.0)


def epsilon(rounds: int, *, noise_stddev: float, l2_clip: float, scale: float, dimension: int,
            min_survivors: int, delta: float, devices: int | None = None) -> float:
    """Epsilon at `delta` after `rounds` rounds of the distributed discrete Gaussian: round_rho as
    dp-accounting's ZCDpEvent, self-composed `rounds` times in its RDP accountant (no sampling amplification).
    0 rounds: 0; no noise: inf."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rho = round_rho(noise_stddev, l2_clip, scale, dimension, min_survivors, devices)
    if rounds == 0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ImportError("distributed DP's epsilon needs dp-accounting: pip install 'edgelora[dp]'") from None
    logging.getLogger(_ABSL_LOGGER).setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho), rounds))
    return float(accountant.get_epsilon(delta))


def _check_positive(field: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be finite and > 0 for distributed DP, got {value}")


def _check_survivors(min_survivors: int, devices: int) -> None:
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be >= 1, got {min_survivors}")
    if devices < min_survivors:
        raise ValueError(f"devices must be >= min_survivors ({min_survivors}), got {devices}")
