"""Values in the ring Z_(2^b): fixed point, stochastic rounding, and the bit width b that keeps the sum of
every device's integers from wrapping.

A device's upload, in order (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism", KLS,
section 4 and Algorithm 1, without the random rotation; the notes, "Values in the ring"):
1. clip the whole vector's L2 norm to C (l2_clip > 0), which bounds the DP sensitivity (dp.py);
2. multiply by the FedAvg weight w = min(examples, cap) / cap <= 1 (weight_cap > 0), so the sum over devices
   is sum w x and the weights' sum, carried by the count limbs, is the denominator;
3. clip each coordinate to [-c, c], c the bound the coordinator announces for the round;
4. scale by s = (2^(q-1) - 1) / c, so every value lies in [-L, L], L = 2^(q-1) - 1 (symmetric: 0 is exact);
5. round stochastically, floor(v + u) with u uniform in [0, 1): E[floor(v + u)] = v (KLS section 4.1), so
   the mean of many devices' uploads is unbiased; |result| <= L still, since L is an integer;
6. add integer noise N_Z(0, sigma^2) (dp.py), sized for the threshold's survivors;
7. append the count limbs: min(examples, cap) in (q-1)-bit limbs, low limb first, each in [0, L] like a value;
8. map to Z_(2^b) in two's complement, in word_dtype(b).
The coordinator unmasks only the sum and decode_sum lifts it back to [-2^(b-1), 2^(b-1)). plan_ring picks
the smallest b for which n devices' sums cannot reach 2^(b-1): n L for the values and limbs, plus a
sub-Gaussian tail of the summed noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import dp

MAX_BITS = 62
# The noise tail plan_ring leaves room for: a sum of n N_Z(0, sigma^2) is sub-Gaussian with variance proxy
# n sigma^2 (Canonne, Kamath, Steinke 2020, Corollary 9), so P(|S| >= k sqrt(n) sigma) <= 2 exp(-k^2 / 2).
# WRAP_PROBABILITY is per upload, union over up to MAX_COORDINATES coordinates: k ~ 10.05.
WRAP_PROBABILITY = 1e-12
MAX_COORDINATES = 1 << 32
NOISE_TAIL_SIGMAS = math.sqrt(2.0 * math.log(2.0 * MAX_COORDINATES / WRAP_PROBABILITY))


def word_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned numpy type that holds b bits. Arithmetic in it wraps mod 2^(8 x itemsize), a
    multiple of 2^b, so sums and differences can be reduced mod 2^b once, at the end (reduce)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"ring bits must be in 1..{MAX_BITS}, got {bits}")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(dt).itemsize:
            return np.dtype(dt)
    raise AssertionError("unreachable")


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """values mod 2^b, in place where it can (values already in word_dtype(bits))."""
    mask = (1 << bits) - 1
    if bits == 8 * values.dtype.itemsize:
        return values
    values &= values.dtype.type(mask)
    return values


def fixed_point_scale(value_bits: int, clip: float) -> float:
    """s = (2^(q-1) - 1) / c: a coordinate clipped to [-c, c] becomes a value in [-L, L], L = 2^(q-1) - 1."""
    return float((1 << (value_bits - 1)) - 1) / clip


@dataclass(frozen=True)
class RingSpec:
    """How one round's uploads become ring values, the same for every device (the coordinator announces it).

    bits: b; value_bits: q, a value becomes an integer in [-(2^(q-1) - 1), 2^(q-1) - 1] before noise; clip: c,
    the per-coordinate bound; l2_clip: C, the whole vector's L2 bound first (0: none); weight_cap: examples at
    which a device weighs 1, weight = min(examples, cap) / cap (0: unweighted); count_limbs: extra coordinates
    carrying min(examples, cap) in (q-1)-bit limbs (0 when unweighted); noise_stddev: per-device noise sigma in
    integer units (0: none).
    """

    bits: int
    value_bits: int
    clip: float
    l2_clip: float
    weight_cap: int
    count_limbs: int
    noise_stddev: float

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"RingSpec.bits must be in 1..{MAX_BITS}, got {self.bits}")
        if not 2 <= self.value_bits <= self.bits:
            raise ValueError(f"RingSpec.value_bits must be in 2..bits ({self.bits}), got {self.value_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"RingSpec.clip must be finite and > 0, got {self.clip}")
        if not (math.isfinite(self.l2_clip) and self.l2_clip >= 0):
            raise ValueError(f"RingSpec.l2_clip must be finite and >= 0 (0: no L2 clip), got {self.l2_clip}")
        if self.weight_cap < 0:
            raise ValueError(f"RingSpec.weight_cap must be >= 0 (0: unweighted), got {self.weight_cap}")
        want = limbs_for(self.weight_cap, self.value_bits)
        if self.count_limbs != want:
            raise ValueError(f"RingSpec.count_limbs must be {want} for weight_cap {self.weight_cap} at "
                             f"value_bits {self.value_bits}, got {self.count_limbs}")
        if not (math.isfinite(self.noise_stddev) and self.noise_stddev >= 0):
            raise ValueError(f"RingSpec.noise_stddev must be finite and >= 0 (0: none), got {self.noise_stddev}")

    @property
    def scale(self) -> float:
        """s, integer units per unit of value (fixed_point_scale)."""
        return fixed_point_scale(self.value_bits, self.clip)

    @property
    def level(self) -> int:
        """L = 2^(q-1) - 1, the largest |value| before noise, and the largest count limb."""
        return (1 << (self.value_bits - 1)) - 1


def limbs_for(weight_cap: int, value_bits: int) -> int:
    """Count limbs that carry any min(examples, cap) <= cap at q - 1 bits each (0 when unweighted)."""
    return -(-weight_cap.bit_length() // (value_bits - 1)) if weight_cap > 0 else 0


def plan_ring(devices: int, value_bits: int, clip: float, weight_cap: int = 0, l2_clip: float = 0.0,
              noise_stddev: float = 0.0) -> RingSpec:
    """The smallest b for which the sum of `devices` uploads cannot wrap: |sum| <= n L for the values and
    the count limbs, plus NOISE_TAIL_SIGMAS x sqrt(n) sigma for the noise (P(wrap) < 1e-12 per upload of up
    to 2^32 coordinates), must stay below 2^(b-1), the centered lift's bound. n is the sampled count (the
    most that can survive); sigma is per device. Without noise, 100 devices at q = 4: 700 < 2^10, b = 11 (the
    notes' q + ceil(log2 n) + 1 = 12 rounds L up to 2^(q-1))."""
    if devices < 1:
        raise ValueError(f"plan_ring: devices must be >= 1, got {devices}")
    if not 2 <= value_bits < MAX_BITS:
        raise ValueError(f"plan_ring: value_bits must be in 2..{MAX_BITS - 1}, got {value_bits}")
    if not (math.isfinite(noise_stddev) and noise_stddev >= 0):
        raise ValueError(f"plan_ring: noise_stddev must be finite and >= 0, got {noise_stddev}")
    level = (1 << (value_bits - 1)) - 1
    bound = devices * level + math.ceil(NOISE_TAIL_SIGMAS * math.sqrt(devices) * noise_stddev)
    bits = bound.bit_length() + 1  # 2^(b-1) > bound: |sum| <= bound lifts back exactly
    if bits > MAX_BITS:
        raise ValueError(f"plan_ring: {devices} devices at value_bits {value_bits} with noise_stddev "
                         f"{noise_stddev} need {bits} ring bits, more than {MAX_BITS}")
    return RingSpec(bits=bits, value_bits=value_bits, clip=float(clip), l2_clip=float(l2_clip),
                    weight_cap=weight_cap, count_limbs=limbs_for(weight_cap, value_bits),
                    noise_stddev=float(noise_stddev))


def ring_length(coordinates: int, spec: RingSpec) -> int:
    """Ring coordinates of one upload: the values, then the count limbs."""
    return coordinates + spec.count_limbs


def quantize(values: np.ndarray, examples: int, spec: RingSpec, rng: np.random.Generator) -> np.ndarray:
    """Steps 1-5 of the module docstring: float vector -> int64 integers in [-L, L], before noise."""
    x = np.asarray(values, dtype=np.float64).reshape(-1).copy()
    if not np.isfinite(x).all():
        raise ValueError("encode: values must be finite")
    if spec.l2_clip > 0:
        norm = float(np.linalg.norm(x))
        if norm > spec.l2_clip:
            x *= spec.l2_clip / norm
    if spec.weight_cap > 0:
        x *= min(examples, spec.weight_cap) / spec.weight_cap
    np.clip(x, -spec.clip, spec.clip, out=x)
    x *= spec.scale
    np.clip(x, -spec.level, spec.level, out=x)  # c * (L / c) may land an ulp past L
    x += rng.random(x.size)  # floor(v + u): unbiased stochastic rounding (KLS section 4.1)
    return np.floor(x).astype(np.int64)


def count_limb_values(examples: int, spec: RingSpec) -> np.ndarray:
    """min(examples, cap) as spec.count_limbs limbs of q - 1 bits, low limb first, int64."""
    count = min(examples, spec.weight_cap)
    width = spec.value_bits - 1
    return np.array([(count >> (width * k)) & spec.level for k in range(spec.count_limbs)], np.int64)


def to_ring(integers: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> Z_(2^b) in two's complement, in word_dtype(bits)."""
    words = integers.astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)
    return words.astype(word_dtype(bits))


def encode(values: np.ndarray, examples: int, spec: RingSpec, rng: np.random.Generator) -> np.ndarray:
    """A device's float vector -> its ring_length(values.size, spec) ring values in word_dtype(spec.bits):
    L2 clip, weight, clip to +-c, scale, stochastic rounding, + N_Z(0, sigma^2) noise (dp.py), the count
    limbs appended, mod 2^b. Every random draw comes from `rng` (the device's own, never shared)."""
    if examples < 0:
        raise ValueError(f"encode: examples must be >= 0, got {examples}")
    integers = quantize(values, examples, spec, rng)
    if spec.noise_stddev > 0:
        integers += dp.discrete_gaussian(integers.size, spec.noise_stddev, rng)
    return to_ring(np.concatenate([integers, count_limb_values(examples, spec)]), spec.bits)


def lift(total: np.ndarray, bits: int) -> np.ndarray:
    """Z_(2^b) -> the integers in [-2^(b-1), 2^(b-1)) (the centered lift), int64."""
    words = np.asarray(total).astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = words.astype(np.int64)
    signed[signed >= (1 << (bits - 1))] -= 1 << bits
    return signed


def decode_sum(total: np.ndarray, spec: RingSpec, *, survivors: int | None = None
               ) -> tuple[np.ndarray, float]:
    """The unmasked sum of the survivors' uploads -> (float64 sum over devices of weight x value, in value
    units; the sum of weights). Weighted: the weights' sum is rebuilt from the count limbs, sum of
    min(examples, cap) / cap. Unweighted (weight_cap 0) every weight is 1, so the sum is `survivors`, which
    the caller must pass (the ring carries no count then)."""
    total = np.asarray(total).reshape(-1)
    if total.dtype.kind not in "ui":
        raise ValueError(f"decode_sum: total must be integers, got dtype {total.dtype}")
    if total.size < spec.count_limbs:
        raise ValueError(f"decode_sum: total has {total.size} values, fewer than count_limbs "
                         f"({spec.count_limbs})")
    signed = lift(total, spec.bits)
    coordinates = total.size - spec.count_limbs
    sums = signed[:coordinates].astype(np.float64) / spec.scale
    if spec.weight_cap == 0:
        if survivors is None or survivors < 0:
            raise ValueError("decode_sum: spec.weight_cap is 0 (unweighted): every weight is 1, pass "
                             f"survivors= (the number of summed uploads), got {survivors}")
        return sums, float(survivors)
    width = spec.value_bits - 1
    count = sum(int(limb) << (width * k) for k, limb in enumerate(signed[coordinates:]))
    return sums, count / spec.weight_cap
