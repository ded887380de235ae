"""A secure round's shared coordinate set S (edgelora.secagg.coordinates): what each choice derives, that the
coordinator's count matches what devices derive, and aggregate-topk's set, its bytes and their checks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgelora.secagg import coordinates as coords
from edgelora.secagg.ring import plan_ring
from edgelora.sparsity import global_topk, topk_count
from edgelora.tasks import Coordinates, SecureUpload, Structure, UploadFormat, UploadRule
from codec.index_coding import bound_bits

SHAPES = {"b.weight": (30, 8), "a.weight": (8, 40), "head.bias": (5,)}
TOTAL = sum(math.prod(s) for s in SHAPES.values())
RING = plan_ring(5, 8, 0.05)
STRUCTURE = Structure(mask_density=0.25, mask_seed=11)


def upload(how: Coordinates, density=0.0625, seed=0, indices=b"") -> SecureUpload:
    return SecureUpload(how, RING, density=density, seed=seed, indices=indices)


def flat(sets: coords.CoordinateSets) -> np.ndarray:
    """S as positions in the sorted-names concatenation."""
    at, out = 0, []
    for n in sorted(SHAPES):
        idx = sets[n]
        out.append(at + (np.arange(math.prod(SHAPES[n])) if idx is None else idx))
        at += math.prod(SHAPES[n])
    return np.concatenate(out)


def test_the_upload_format_picks_the_choice():
    for fmt, how in [(UploadFormat.DENSE, Coordinates.ALL), (UploadFormat.MASKED, Coordinates.MASK)]:
        up = coords.secure_upload(UploadRule(format=fmt, density=0.1), "random-k", RING, seed=5)
        assert up.coordinates is how and up.density == 1.0 and up.seed == 0 and up.indices == b""
    topk = UploadRule(format=UploadFormat.TOPK, density=0.1)
    assert coords.secure_upload(topk, "random-k", RING, seed=5).seed == 5
    assert coords.secure_upload(topk, "download-topk", RING, seed=5).seed == 0  # no seed: nothing drawn
    with pytest.raises(ValueError, match="trainable shapes"):
        coords.secure_upload(topk, "aggregate-topk", RING, seed=5)


@pytest.mark.parametrize("how", [Coordinates.ALL, Coordinates.MASK, Coordinates.RANDOM_K])
def test_the_count_before_derivation_is_what_devices_derive(how):
    masked = {"a.weight", "b.weight"}
    sets = coords.coordinate_sets(upload(how, seed=3), SHAPES, STRUCTURE, masked)
    assert coords.size(sets, SHAPES) == coords.count(upload(how, seed=3), SHAPES, STRUCTURE, masked)
    assert sets["head.bias"] is None or how is Coordinates.RANDOM_K  # a dense tensor goes whole under a mask


def test_random_k_is_fixed_by_its_seed_and_fresh_for_another():
    a = flat(coords.coordinate_sets(upload(Coordinates.RANDOM_K, seed=3), SHAPES, STRUCTURE, ()))
    b = flat(coords.coordinate_sets(upload(Coordinates.RANDOM_K, seed=3), SHAPES, STRUCTURE, ()))
    c = flat(coords.coordinate_sets(upload(Coordinates.RANDOM_K, seed=4), SHAPES, STRUCTURE, ()))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_download_topk_is_the_global_top_of_the_download():
    rng = np.random.default_rng(0)
    download = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    sets = coords.coordinate_sets(upload(Coordinates.DOWNLOAD_TOPK), SHAPES, STRUCTURE, (), download)
    top = global_topk({n: download[n] for n in sorted(SHAPES)}, 0.0625)
    for n in SHAPES:
        np.testing.assert_array_equal(sets[n], top[n].indices)
    with pytest.raises(ValueError, match="download"):
        coords.coordinate_sets(upload(Coordinates.DOWNLOAD_TOPK), SHAPES, STRUCTURE, ())


def aggregate(seed=0, moved=None):
    """A last aggregate that moved `moved` random positions (all of them: None)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=TOTAL).astype(np.float32)
    if moved is not None:
        keep = np.zeros(TOTAL, bool)
        keep[rng.choice(TOTAL, moved, replace=False)] = True
        values[~keep] = 0
    out, at = {}, 0
    for n in sorted(SHAPES):
        size = math.prod(SHAPES[n])
        out[n] = values[at:at + size].reshape(SHAPES[n])
        at += size
    return out, values


@pytest.mark.parametrize("explore", [0.0, 0.25, 0.5, 1.0])
def test_aggregate_topk_keeps_the_largest_and_draws_the_rest(explore):
    last, values = aggregate()
    k = topk_count(TOTAL, 0.0625)
    s = flat(coords.aggregate_topk(last, SHAPES, 0.0625, explore, seed=9))
    assert s.size == k and np.unique(s).size == k and np.all(np.diff(s) > 0)
    keep = math.floor((1 - explore) * k)
    top = np.argsort(-np.abs(values), kind="stable")[:keep]
    assert set(top) <= set(s)  # the largest (1 - explore) k of the aggregate are in S
    # the others are random: another seed changes exactly them
    other = flat(coords.aggregate_topk(last, SHAPES, 0.0625, explore, seed=10))
    assert set(top) <= set(other) and (explore == 0 or set(s) != set(other))


def test_aggregate_topk_only_keeps_what_moved_and_starts_random():
    last, values = aggregate(moved=4)  # fewer moved than (1 - explore) k: the rest is drawn
    k = topk_count(TOTAL, 0.0625)
    s = flat(coords.aggregate_topk(last, SHAPES, 0.0625, 0.0, seed=1))
    assert s.size == k and set(np.flatnonzero(values)) <= set(s)
    first = flat(coords.aggregate_topk({}, SHAPES, 0.0625, 0.25, seed=1))  # no aggregate yet
    assert first.size == k
    wrong = {n: np.ones(3, np.float32) for n in SHAPES}  # a stale aggregate of other shapes counts for nothing
    np.testing.assert_array_equal(flat(coords.aggregate_topk(wrong, SHAPES, 0.0625, 0.25, seed=1)), first)


def test_aggregate_topk_draws_its_random_share_where_the_aggregate_was_large():
    """The explored share is weighted by each tensor's energy in the last aggregate: with LoRA's B moving 100x
    more than A, all of it lands in B (and the head, which the aggregate did not move: it weighs the mean)."""
    last = {"a.weight": np.full(SHAPES["a.weight"], 0.01, np.float32), "b.weight": np.ones(SHAPES["b.weight"], np.float32),
            "head.bias": np.zeros(SHAPES["head.bias"], np.float32)}
    last["a.weight"][0, 0] = last["b.weight"][0, 0] = 0  # a moved entry of each is not needed
    for seed in range(5):
        sets = coords.aggregate_topk(last, SHAPES, 0.0625, 1.0, seed)  # explore = 1: all of S is drawn
        assert sets["a.weight"].size == 0 and sets["b.weight"].size > 0
    for uniform in (coords.aggregate_topk({}, SHAPES, 0.5, 1.0, 0),  # no aggregate, or weights = uniform:
                    coords.aggregate_topk(last, SHAPES, 0.5, 1.0, 0, "uniform")):  # every tensor drawn evenly
        assert all(0.3 < sets.size / math.prod(SHAPES[n]) < 0.7 for n, sets in uniform.items() if n != "head.bias")
    with pytest.raises(ValueError, match="energy or uniform"):
        coords.aggregate_topk(last, SHAPES, 0.5, 1.0, 0, "loud")


def test_aggregate_topk_travels_as_index_bytes_near_the_entropy_bound():
    last, _ = aggregate()
    rule = UploadRule(format=UploadFormat.TOPK, density=0.0625)
    up = coords.secure_upload(rule, "aggregate-topk", RING, seed=2, shapes=SHAPES, last=last, explore=0.25)
    assert up.coordinates is Coordinates.AGGREGATE_TOPK and up.seed == 0
    sets = coords.coordinate_sets(up, SHAPES, STRUCTURE, ())  # what the device derives from the bytes
    expected = coords.aggregate_topk(last, SHAPES, 0.0625, 0.25, seed=2)
    for n in SHAPES:
        np.testing.assert_array_equal(sets[n], expected[n])
    assert coords.count(up, SHAPES, STRUCTURE, ()) == coords.size(sets, SHAPES)
    # 1/16 of 300,000 coordinates: the bytes are within 5 % of log2 C(n, k) plus the bundle's frame
    big = {"w": (300, 1000)}
    rng = np.random.default_rng(0)
    data = coords.encode_sets(coords.aggregate_topk({"w": rng.normal(size=(300, 1000))}, big, 0.0625, 0.25, 0), big)
    assert len(data) < 1.05 * bound_bits(300_000, topk_count(300_000, 0.0625)) / 8 + 200


def test_aggregate_topk_bytes_that_do_not_fit_the_round_are_refused():
    last, _ = aggregate()
    good = coords.encode_sets(coords.aggregate_topk(last, SHAPES, 0.0625, 0.25, seed=2), SHAPES)
    k = topk_count(TOTAL, 0.0625)
    cases = {
        "garbage": (b"not a bundle", SHAPES, k, "aggregate-topk coordinates"),
        "other tensors": (good, {**SHAPES, "extra": (4,)}, k, "the round trains"),
        "other shape": (good, {**SHAPES, "head.bias": (6,)}, k, "head.bias"),
        "other count": (good, SHAPES, k + 1, "density gives"),
    }
    for what, (data, shapes, expected, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            coords.decode_sets(data, shapes, expected)


def test_gather_then_scatter_is_the_delta_on_s_and_zero_off_it():
    last, _ = aggregate(1)
    sets = coords.aggregate_topk(last, SHAPES, 0.25, 0.5, seed=4)
    back = coords.scatter(coords.gather(last, sets), sets, SHAPES)
    for n in SHAPES:
        on = np.zeros(math.prod(SHAPES[n]), bool)
        on[sets[n]] = True
        np.testing.assert_array_equal(back[n].reshape(-1)[on], last[n].reshape(-1)[on])
        assert not back[n].reshape(-1)[~on].any()
    with pytest.raises(ValueError, match="vector of"):
        coords.scatter(np.zeros(3, np.float32), sets, SHAPES)
