"""(placeholder until the protocol branch lands: neighbour_count only)"""
import math


def neighbour_count(n: int, requested: int = 0) -> int:
    if requested:
        return min(requested, n - 1)
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(max(n, 2))))
