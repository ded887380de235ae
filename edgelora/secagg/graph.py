"""SecAgg+'s communication graph (Bell et al. 2020, section 3): each device shares its secrets with, and
masks toward, k = O(log n) neighbours instead of all n - 1 others, which cuts each device's work from O(n)
to O(log n). The graph is public: both sides compute it from the round's setup."""
from __future__ import annotations

import math
import random
from typing import Sequence


def neighbour_count(n: int, requested: int = 0) -> int:
    """k for n devices. 0 asks for SecAgg+'s default, min(n - 1, 2 * ceil(1.5 * log2(n))) (Bell et al. 2020
    take k = O(log n); the constant 1.5 is issue 27's choice). A requested k is capped at n - 1 and, when n is
    odd, made even (no k-regular graph has n * k odd)."""
    if n < 1 or requested < 0:
        raise ValueError(f"neighbour_count needs n >= 1 and requested >= 0, got n={n}, requested={requested}")
    k = min(n - 1, requested or 2 * math.ceil(1.5 * math.log2(n)))
    return k + 1 if (k * n) % 2 else k


def neighbours(devices: Sequence[str], k: int, seed: int) -> dict[str, tuple[str, ...]]:
    """A Harary graph H(k, n) over a permutation of `devices` drawn from `seed`: position i links to
    i +- 1 .. i +- k/2 (and, for odd k, to i + n/2). Symmetric, every device has exactly k neighbours;
    k >= n - 1 links everyone. random.Random suffices: the graph is public (Bell et al. 2020, section 3.1)."""
    n = len(devices)
    if len(set(devices)) != n:
        raise ValueError("neighbours needs distinct device ids")
    if k >= n - 1:
        return {d: tuple(sorted(e for e in devices if e != d)) for d in devices}
    if k < 0 or (k * n) % 2:
        raise ValueError(f"no {k}-regular graph on {n} devices (k must be >= 0 and k * n even)")
    order = list(devices)
    random.Random(seed).shuffle(order)
    steps = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    linked: dict[str, set[str]] = {d: set() for d in devices}
    for i, d in enumerate(order):
        for step in steps:
            e = order[(i + step) % n]
            linked[d].add(e)
            linked[e].add(d)
    return {d: tuple(sorted(linked[d])) for d in devices}
