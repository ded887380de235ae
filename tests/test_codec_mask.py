"""The implicit mask: pinned vectors, an independent pure-Python reference, determinism and exact size."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelora import codec
from edgelora.codec.mask import mask_start_state, splitmix64

VECTORS = json.loads((Path(codec.__file__).parent / "mask_vectors.json").read_text("utf-8"))
M64 = (1 << 64) - 1


def reference_mask(seed: int, name: str, shape: tuple, density: float) -> list[int]:
    """FORMAT.md's algorithm written plainly with Python ints: sort all keys, keep the k smallest."""
    n, k = math.prod(shape), codec.mask_size(shape, density)
    state, b = mask_start_state(seed, name, shape), (n - 1).bit_length() if n else 0
    keys = []
    for i in range(n):
        z = (state + (i + 1) * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        keys.append((z >> b << b | i, i))
    return sorted(i for _, i in sorted(keys)[:k])


def test_splitmix64_matches_published_outputs():
    ref = VECTORS["splitmix64"]  # Vigna's splitmix64.c, state 1234567
    assert splitmix64(ref["state"], 0, 3).tolist() == ref["outputs"]


@pytest.mark.parametrize("case", VECTORS["masks"], ids=lambda c: c["name"])
def test_mask_matches_stored_vectors(case):
    got = codec.mask_indices(case["seed"], case["name"], tuple(case["shape"]), case["density"])
    assert got.dtype == np.int64
    if "indices" in case:
        assert got.tolist() == case["indices"]
    else:
        assert got.size == case["count"]
        assert hashlib.sha256(got.astype("<i8").tobytes()).hexdigest() == case["sha256_int64le"]


@pytest.mark.parametrize("case", [c for c in VECTORS["masks"] if "indices" in c], ids=lambda c: c["name"])
def test_stored_vectors_follow_the_written_algorithm(case):
    assert reference_mask(case["seed"], case["name"], tuple(case["shape"]), case["density"]) == case["indices"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), name=st.text(max_size=8), n=st.integers(0, 300), density=st.floats(0, 1))
def test_mask_equals_reference_and_has_exact_size(seed, name, n, density):
    got = codec.mask_indices(seed, name, (n,), density)
    assert got.tolist() == reference_mask(seed, name, (n,), density)
    assert got.size == codec.mask_size((n,), density)
    assert np.all(np.diff(got) > 0) and (got.size == 0 or 0 <= got[0] and got[-1] < n)


def test_mask_size_definition():
    assert codec.mask_size((100,), 0.125) == 12  # round half to even: 12.5 -> 12
    assert codec.mask_size((10, 10), 0.001) == 1  # at least one entry once density > 0
    assert codec.mask_size((10,), 0.0) == 0 and codec.mask_size((0, 5), 0.5) == 0
    assert codec.mask_size((), 1.0) == 1  # a scalar has one element


def test_mask_is_deterministic_and_depends_on_every_input():
    base = codec.mask_indices(5, "w", (40, 50), 0.1)
    np.testing.assert_array_equal(base, codec.mask_indices(5, "w", (40, 50), 0.1))
    for other in [codec.mask_indices(6, "w", (40, 50), 0.1), codec.mask_indices(5, "v", (40, 50), 0.1),
                  codec.mask_indices(5, "w", (50, 40), 0.1)]:
        assert not np.array_equal(base, other)


def test_masks_are_nested_across_densities():
    low, high = codec.mask_indices(1, "w", (1000,), 0.05), codec.mask_indices(1, "w", (1000,), 0.2)
    assert low.size == 50 and high.size == 200 and np.isin(low, high).all()


def test_mask_is_uniform_over_positions():
    # 200 masks of 10% over 100 positions: each position is picked ~20 times (binomial sd ~4.2).
    counts = sum(np.bincount(codec.mask_indices(s, "w", (100,), 0.1), minlength=100) for s in range(200))
    assert counts.sum() == 2000 and 5 < counts.min() and counts.max() < 40


def test_mask_of_twelve_million_elements_is_exact():
    idx = codec.mask_indices(0, "big", (3000, 4000), 0.0625)
    assert idx.size == 750_000 and np.all(np.diff(idx) > 0) and idx[-1] < 12_000_000
