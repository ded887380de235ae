"""Aggregation in proportion to what was sent: a top-k or masked upload reaches the accumulator as codec.Sparse
(indices + values) and is added at its indices, never made dense per upload; sums, means, clipping and every
aggregator's result are bit for bit those of the dense path."""
from __future__ import annotations

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest

from benchmarks.aggregation import FixedPlan  # the benchmark's one-task method, shared
from edgelora import codec
from edgelora.config import load_config
from edgelora.protos.refusals import UpdateRejected
from edgelora.schema import FedAdamConfig, FedAvgConfig, MedianConfig
from edgelora.server.aggregation import (
    DpFedAvg,
    FedAdam,
    FedAvg,
    FlatSparse,
    Layout,
    Median,
    RunningMean,
    clip_to_norm,
    densify,
    global_norm,
)
from edgelora.server.engine import RoundEngine, mask_positions
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, PhaseTimes, Stage, Structure, StructureKind, UploadFormat

from .conftest import tiny_raw


def sparse(shape, indices, values):
    return codec.Sparse(tuple(shape), np.asarray(indices, np.int64), np.asarray(values, np.float32))


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()  # compares -0.0 and +0.0 as different, as == does not


# -- the accumulator, by hand --------------------------------------------------------------------------------
def test_sparse_adds_land_at_their_indices_by_hand():
    """A 3x4 tensor, 2 devices: device A (weight 1) sends 1, 2, 3 at flat 1, 5, 11; device B (weight 3) sends
    10, 20 at flat 5, 6. Sum: 1 at 1, 2 + 30 = 32 at 5, 60 at 6, 3 at 11; mean = sum / 4."""
    acc = RunningMean()
    acc.add({"w": sparse((3, 4), [1, 5, 11], [1, 2, 3])}, 1.0)
    acc.add({"w": sparse((3, 4), [5, 6], [10, 20])}, 3.0)
    np.testing.assert_array_equal(acc.sum["w"], [[0, 1, 0, 0], [0, 32, 60, 0], [0, 0, 0, 3]])
    np.testing.assert_array_equal(acc.mean()["w"], [[0, 0.25, 0, 0], [0, 8, 15, 0], [0, 0, 0, 0.75]])
    assert acc.sum["w"].dtype == np.float64 and acc.count == 2 and acc.weight == 4.0


def test_uploads_at_the_same_indices_are_summed_as_k_values_by_hand():
    """Devices A (weight 1) and B (weight 3) send at the same flat indices 1 and 5 (a shared mask): the sum is
    held as 2 values, 1 + 30 = 31 and 2 + 60 = 62. Device C (weight 4) sends 4 at index 0: the sum becomes a
    whole 3x4 array (16 at 0), and the mean is sum / 8."""
    acc, at = RunningMean(), np.array([1, 5])
    acc.add({"w": sparse((3, 4), at, [1, 2])}, 1.0)
    acc.add({"w": sparse((3, 4), at.copy(), [10, 20])}, 3.0)
    assert acc.held_bytes == 2 * 8
    np.testing.assert_array_equal(acc.mean()["w"], [[0, 7.75, 0, 0], [0, 15.5, 0, 0], [0, 0, 0, 0]])
    acc.add({"w": sparse((3, 4), [0], [4])}, 4.0)
    assert acc.held_bytes == 12 * 8
    np.testing.assert_array_equal(acc.sum["w"], [[16, 31, 0, 0], [0, 62, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(acc.mean()["w"], [[2, 3.875, 0, 0], [0, 7.75, 0, 0], [0, 0, 0, 0]])


def test_sparse_and_dense_uploads_mix_in_one_sum():
    acc = RunningMean()
    acc.add({"w": np.ones((3, 4), np.float32)}, 2.0)                 # dense: 2 everywhere
    acc.add({"w": sparse((3, 4), [0, 11], [5, -1])}, 1.0)             # 7 at 0, 1 at 11
    np.testing.assert_array_equal(acc.sum["w"], [[7, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 1]])


def test_a_minus_zero_ends_as_the_dense_path_leaves_it():
    """-0.0 + (+0.0) = +0.0: the dense path turns a -0.0 sum entry into +0.0 wherever a delta sent nothing; the
    sparse add, which skips those entries, must do the same (or the sign of a zero differs in the bits)."""
    deltas = [({"w": sparse((3, 4), [2, 7], [-0.0, -0.0])}, 1.0),  # first add keeps -0.0 at 2 and 7
              ({"w": sparse((3, 4), [7], [-0.0])}, 2.0),           # 7 stays -0.0, 2 becomes +0.0
              ({"w": sparse((3, 4), [4], [1.0])}, 1.0)]             # 7 becomes +0.0
    acc, ref = RunningMean(), RunningMean()
    for i, (d, w) in enumerate(deltas):
        acc.add(d, w)
        ref.add({k: densify(k, v) for k, v in d.items()}, w)
        assert bits(acc.sum["w"]) == bits(ref.sum["w"]), f"after delta {i}"
    assert not np.signbit(acc.sum["w"]).any()


@pytest.mark.parametrize("indices, values, match", [
    ([2, 2], [1, 1], "strictly increasing"),       # a duplicate would be added once by a fancy-index +=
    ([5, 1], [1, 1], "strictly increasing"),
    ([0, 12], [1, 1], r"in \[0, 12\)"),             # past the end of a 3x4 tensor
    ([-1, 3], [1, 1], r"in \[0, 12\)"),
    ([1, 3], [1], "1 values for 2 indices"),
])
def test_the_accumulator_refuses_indices_it_cannot_add(indices, values, match):
    acc = RunningMean()
    acc.add({"w": sparse((3, 4), [0], [1.0])}, 1.0)
    good = sparse((3, 4), [1], [1.0])
    with pytest.raises(ValueError, match=match):
        acc.add({"a_good_one_first": good, "w": sparse((3, 4), indices, values)}, 1.0)
    assert set(acc.sum) == {"w"} and acc.count == 1  # nothing of the refused delta was added
    np.testing.assert_array_equal(acc.sum["w"].reshape(-1)[:2], [1, 0])


# -- clipping and norms on the sparse form -------------------------------------------------------------------
def test_sparse_clipping_equals_dense_clipping_by_hand():
    """3 and 4 at the corners of a 3x4 tensor, 12 at index 0 of a 5-vector: norm 13; clipped to 6.5, every
    value halves, and the sparse form gives the dense form's numbers bit for bit."""
    delta = {"w": sparse((3, 4), [0, 11], [3, 4]), "b": sparse((5,), [0], [12])}
    dense = {k: densify(k, v) for k, v in delta.items()}
    assert global_norm(delta) == global_norm(dense) == 13.0
    clipped, clipped_dense = clip_to_norm(delta, 6.5), clip_to_norm(dense, 6.5)
    assert isinstance(clipped["w"], codec.Sparse)  # clipping keeps the form
    np.testing.assert_array_equal(clipped["w"].values, [1.5, 2.0])
    for k in delta:
        assert bits(densify(k, clipped[k])) == bits(clipped_dense[k])
    assert clip_to_norm(delta, 13.0) is delta  # within the norm: untouched


def test_sparse_norm_equals_dense_norm_on_random_updates():
    """The norm sums the squares of nonzero entries only, so it is one float64 number whatever the form
    (numpy's pairwise sum over the zeros would round differently)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        delta = {f"t{i}": _random_sparse(rng, (int(rng.integers(1, 400)),)) for i in range(3)}
        assert global_norm(delta) == global_norm({k: densify(k, v) for k, v in delta.items()})


# -- every running-sum aggregator equals its dense path bit for bit ------------------------------------------
def _random_sparse(rng, shape, minus_zeros=True):
    n = int(np.prod(shape))
    k = int(rng.integers(0, n + 1))
    values = rng.normal(size=k).astype(np.float32)
    if minus_zeros and k:
        values[rng.random(k) < 0.2] = -0.0
        values[rng.random(k) < 0.1] = 0.0
    return sparse(shape, np.sort(rng.choice(n, k, replace=False)), values)


def _random_round(rng, shapes, devices):
    """Per device: a delta mixing sparse tensors (some with -0.0 and 0.0 values) and dense ones, a weight."""
    out = []
    for _ in range(devices):
        delta = {}
        for name, shape in shapes.items():
            if rng.random() < 0.25:
                delta[name] = rng.normal(scale=2.0, size=shape).astype(np.float32)
            else:
                delta[name] = _random_sparse(rng, shape)
        out.append((delta, float(rng.choice([1.0, 3.0, 0.37, 250.0]))))
    return out


RUNNING_SUMS = pytest.mark.parametrize("make", [
    lambda run: FedAvg(FedAvgConfig()),
    lambda run: FedAvg(FedAvgConfig(weighted=False, clip_norm=2.5)),
    lambda run: FedAdam(FedAdamConfig(lr=0.05, clip_norm=4.0)),
    lambda run: DpFedAvg(run.aggregator, run),
], ids=["fedavg", "fedavg-clipped", "fedadam-clipped", "dp-fedavg"])


def _same_sums_and_weights(aggregator, params, acc, ref, rnd: int) -> None:
    """acc and ref hold the same sums, and the aggregator finishes both to the same weights, bit for bit."""
    assert list(acc.sum) == list(ref.sum)
    for k in ref.sum:
        assert bits(acc.sum[k]) == bits(ref.sum[k]), (rnd, k)
    ours, _ = aggregator.finish(params, acc, {}, rnd)
    theirs, _ = aggregator.finish(params, ref, {}, rnd)
    for k in params:
        assert bits(ours[k]) == bits(theirs[k]), (rnd, k)


@RUNNING_SUMS
def test_aggregators_give_the_dense_paths_bits_on_random_sparse_updates(make):
    aggregator = make(load_config(tiny_raw(server={"devices_per_round": 5}, data={"num_devices": 5}, aggregator={
        "name": "dp-fedavg", "clip_norm": 1.5, "noise_multiplier": 0.5})))
    rng = np.random.default_rng(7)
    shapes = {"a": (3, 4), "b": (7,), "c": (16, 5)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    clipped = 0
    for rnd in range(1, 21):
        ups = _random_round(rng, shapes, int(rng.integers(1, 6)))
        acc, ref = aggregator.start(), aggregator.start()
        for delta, w in ups:
            acc.add(aggregator.clip(delta), aggregator.weight(int(w * 100)))
            ref.add(aggregator.clip({k: densify(k, v) for k, v in delta.items()}), aggregator.weight(int(w * 100)))
            clipped += aggregator.clip(delta) is not delta
        _same_sums_and_weights(aggregator, params, acc, ref, rnd)
    assert clipped > 0 or getattr(aggregator.cfg, "clip_norm", 0) == 0  # the clipped cases did clip


def _random_flat(rng, layout: Layout) -> FlatSparse:
    t = _random_sparse(rng, (layout.size,))
    return FlatSparse(layout, t.indices, t.values)


@RUNNING_SUMS
def test_flat_uploads_give_the_dense_paths_bits(make):
    """A round of FlatSparse uploads (a top-k upload over every tensor at once, -0.0 values included) sums, and
    every aggregator finishes, bit for bit as the same deltas made dense tensor by tensor; clipping scales
    both by the flat delta's norm."""
    aggregator = make(load_config(tiny_raw(server={"devices_per_round": 5}, data={"num_devices": 5}, aggregator={
        "name": "dp-fedavg", "clip_norm": 1.5, "noise_multiplier": 0.5})))
    rng = np.random.default_rng(8)
    layout = Layout.of({"a": (3, 4), "b": (7,), "c": (16, 5), "empty": (0,)})
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in zip(layout.names, layout.shapes)}
    for rnd in range(1, 16):
        acc, ref = aggregator.start(), aggregator.start()
        for _ in range(int(rng.integers(1, 6))):
            delta, w = _random_flat(rng, layout), aggregator.weight(int(rng.integers(1, 300)))
            norm = global_norm(delta)
            acc.add(aggregator.clip(delta, norm), w)
            ref.add(aggregator.clip({k: densify(k, v) for k, v in delta.tensors().items()}, norm), w)
        _same_sums_and_weights(aggregator, params, acc, ref, rnd)


def test_flat_and_tensor_deltas_mix_in_one_sum_bit_for_bit():
    """Flat, flat, then per-tensor (sparse and dense), then flat again: the sum turns back into tensors when a
    per-tensor delta comes, carrying its -0.0 entries along, and stays the dense path's bits throughout."""
    rng = np.random.default_rng(9)
    layout = Layout.of({"a": (3, 4), "b": (9,)})
    acc, ref = RunningMean(), RunningMean()
    steps = [_random_flat(rng, layout), _random_flat(rng, layout),
             {"a": _random_sparse(rng, (3, 4)), "b": rng.normal(size=9).astype(np.float32)},
             _random_flat(rng, layout), {"a": _random_sparse(rng, (3, 4)), "b": _random_sparse(rng, (9,))}]
    for i, delta in enumerate(steps):
        w = float(rng.choice([1.0, 0.37, 3.0]))
        acc.add(delta, w)
        tensors = delta.tensors() if isinstance(delta, FlatSparse) else delta
        ref.add({k: densify(k, v) for k, v in tensors.items()}, w)
        for k in ref.sum:
            assert bits(acc.sum[k]) == bits(ref.sum[k]), (i, k)
    for k, v in acc.mean().items():
        assert bits(v) == bits(ref.mean()[k])


def test_a_flat_minus_zero_ends_as_the_dense_path_leaves_it():
    layout = Layout.of({"a": (2, 2), "b": (3,)})
    acc, ref = RunningMean(), RunningMean()
    for positions, values, w in (([1, 5], [-0.0, -0.0], 1.0), ([5], [-0.0], 2.0), ([0], [1.0], 1.0)):
        delta = FlatSparse(layout, np.array(positions), np.array(values, np.float32))
        acc.add(delta, w)
        ref.add({k: densify(k, v) for k, v in delta.tensors().items()}, w)
        for k in ref.sum:
            assert bits(acc.sum[k]) == bits(ref.sum[k])
    assert not any(np.signbit(v).any() for v in acc.sum.values())


@pytest.mark.parametrize("minus_zero,weights", [(False, [1.0, 0.37, 3.0]), (True, [1.0, 0.37, 3.0]),
                                                (False, [1.0, 1e-300])])
def test_waiting_flat_uploads_are_added_together_bit_for_bit(monkeypatch, minus_zero, weights):
    """Forty top-k uploads of 50 entries of a 5,000-entry layout wait (their bytes stay under the sum's) and one
    flush adds them, sweeping the sum 7 entries at a time: the sum is the dense path's bit for bit, with a -0.0
    among the values, or a weight so small that a negative value times it underflows to -0.0 (a -0.0 added to
    a sum entry that is not -0.0 changes nothing, which is why the flush only asks whether the sum has one)."""
    monkeypatch.setattr("edgelora.server.aggregation.SWEEP_BLOCK", 7)
    rng = np.random.default_rng(12)
    layout = Layout.of({"a": (50, 60), "b": (2000,)})
    acc, ref = RunningMean(), RunningMean()
    for i in range(40):
        values = rng.normal(size=50).astype(np.float32)
        if minus_zero and i == 20:
            values[3] = -0.0
        if weights[-1] < 1e-250:
            values[4] = -1e-40
        delta = FlatSparse(layout, np.sort(rng.choice(layout.size, 50, replace=False)), values)
        w = float(rng.choice(weights))
        acc.add(delta, w)
        ref.add({k: densify(k, v) for k, v in delta.tensors().items()}, w)
    assert len(acc._waiting) == 39  # every add after the round's first waited
    for k in ref.sum:
        assert bits(acc.sum[k]) == bits(ref.sum[k]), k
    assert not acc._waiting
    for k, v in acc.mean().items():
        assert bits(v) == bits(ref.mean()[k])


def test_flat_norm_and_clipping_keep_the_form_by_hand():
    """3 and 4 in tensor a (2x2), 12 in tensor b: norm 13 either way; clipped to 6.5, every value halves and
    the delta stays one FlatSparse; the robust aggregators take it tensor by tensor."""
    layout = Layout.of({"a": (2, 2), "b": (5,)})
    delta = FlatSparse(layout, np.array([0, 3, 4]), np.array([3, 4, 12], np.float32))
    assert global_norm(delta) == global_norm(delta.tensors()) == 13.0
    clipped = clip_to_norm(delta, 6.5)
    assert isinstance(clipped, FlatSparse) and clipped.layout is layout
    np.testing.assert_array_equal(clipped.values, [1.5, 2, 6])
    assert clip_to_norm(delta, 13.0) is delta
    med = Median(MedianConfig())
    acc = med.start()
    acc.add(delta, 1.0)
    out, _ = med.finish({"a": np.zeros((2, 2), np.float32), "b": np.zeros(5, np.float32)}, acc, {})
    np.testing.assert_array_equal(out["a"].reshape(-1), [3, 0, 0, 4])
    np.testing.assert_array_equal(out["b"], [12, 0, 0, 0, 0])


def test_flat_norm_is_the_tensor_norm_up_to_rounding():
    rng = np.random.default_rng(10)
    layout = Layout.of({f"t{i}": (int(rng.integers(1, 300)),) for i in range(6)})
    for _ in range(30):
        delta = _random_flat(rng, layout)
        assert global_norm(delta) == pytest.approx(global_norm(delta.tensors()), rel=1e-12, abs=0)


def test_robust_aggregators_densify_each_sparse_delta():
    med = Median(MedianConfig())
    acc = med.start()
    for values in ([1, 2], [5, 6], [3, 4]):
        acc.add({"w": sparse((3, 4), [0, 11], values)}, 1.0)
    out, _ = med.finish({"w": np.zeros((3, 4), np.float32)}, acc, {})
    np.testing.assert_array_equal(out["w"].reshape(-1), [3] + [0] * 10 + [4])


# -- the round: what the accumulator receives ------------------------------------------------------------------


def _round(shapes, structure, fmt, density=1.0, devices=2):
    ids = [str(i) for i in range(devices)]
    run = load_config(tiny_raw(server={"devices_per_round": devices},
                               data={"mode": "own", "num_devices": devices, "label_names": ["a", "b"]}))
    engine = RoundEngine(run, FixedPlan(run, structure, fmt, density), host=None)
    state = ServerState(round=0, stage=Stage.DENSE, stage_start=1,
                        params={n: np.zeros(s, np.float32) for n, s in shapes.items()})
    return engine, state, engine.open_round(state, ids, {}, {d: DeviceInfo(d) for d in ids})


def _deliver(rnd, d, tensors, num_examples):
    """Encode a device's upload, then the server's part: check (decode) and accept (clip, add)."""
    payload = codec.encode_bundle(tensors)
    task = rnd.hand_out(d)
    rnd.begin_upload(d, task.task_id, len(payload))
    return _server_side(rnd, d, payload, num_examples)


def _server_side(rnd, d, payload, num_examples):
    delta = rnd.check(d, payload, num_examples)
    rnd.accept(d, delta, num_examples, 0.1, PhaseTimes(), len(payload))
    return delta


def _no_densifying(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a sparse upload was made dense")
    monkeypatch.setattr(codec, "to_dense", refuse)


def test_a_topk_round_by_hand_adds_the_sparse_form(monkeypatch):
    """Top-k at density 1/4 of a 3x4 tensor (k = 3), 2 devices weighted by examples (1 and 3): the new weights
    are the hand-computed mean, and the accumulator was handed the upload as one FlatSparse over the round's
    tensors, never a dense array."""
    _no_densifying(monkeypatch)
    seen = []
    add = RunningMean.add
    monkeypatch.setattr(RunningMean, "add", lambda self, delta, w: (seen.append(delta), add(self, delta, w))[1])
    engine, state, rnd = _round({"w": (3, 4)}, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, 0.25)
    _deliver(rnd, "0", {"w": sparse((3, 4), [1, 5, 11], [1, 2, 3])}, 1)
    _deliver(rnd, "1", {"w": sparse((3, 4), [5, 6], [10, 20])}, 3)
    assert [type(d) for d in seen] == [FlatSparse, FlatSparse]
    np.testing.assert_array_equal(seen[1].positions, [5, 6])
    assert rnd.record.devices["1"].update_norm == pytest.approx(np.sqrt(500))
    new, _ = engine.finish(state, rnd.agg, {})
    np.testing.assert_array_equal(new.params["w"], [[0, 0.25, 0, 0], [0, 8, 15, 0], [0, 0, 0, 0.75]])


def test_a_topk_upload_in_plan_order_arrives_flat_and_any_order_gives_the_same_weights(monkeypatch):
    """Three tensors, top-k 1/4: bundles in the plan's order (what devices send) reach the accumulator as one
    FlatSparse; the same tensors in another order are checked tensor by tensor. The new weights agree bit for
    bit, and neither path makes a sparse upload dense."""
    _no_densifying(monkeypatch)
    shapes = {"a": (4, 6), "b": (10,), "c": (3, 3)}
    rng = np.random.default_rng(12)
    uploads = [({n: _random_sparse(rng, s, minus_zeros=False) for n, s in shapes.items()}, int(rng.integers(1, 9)))
               for _ in range(3)]
    uploads = [({n: codec.Sparse(t.shape, t.indices[:len(t.indices) // 4], t.values[:len(t.indices) // 4])
                 for n, t in u.items()}, w) for u, w in uploads]  # within k = ceil(43 / 4)
    results = []
    for order in (list(shapes), ["c", "a", "b"]):
        engine, state, rnd = _round(shapes, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, 0.25, 3)
        forms = [type(_deliver(rnd, str(d), {n: u[n] for n in order}, w)) for d, (u, w) in enumerate(uploads)]
        assert forms == ([FlatSparse] * 3 if order == list(shapes) else [dict] * 3)
        results.append(engine.finish(state, rnd.agg, {})[0].params)
    for n in shapes:
        assert bits(results[0][n]) == bits(results[1][n])


def test_flat_upload_checks_name_the_tensor():
    shapes = {"a": (3, 4), "b": (6,)}
    engine, state, rnd = _round(shapes, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, 0.25)
    too_big = codec.encode_bundle({"a": sparse((3, 4), [4], [2.0]), "b": sparse((6,), [1, 2], [3.0, -1500.0])})
    assert too_big[4] == 3  # the joint stream: the flat path
    with pytest.raises(UpdateRejected, match=r"tensor b: \|delta\| reaches 1\.5e\+03"):
        rnd.check("0", too_big, 1)
    too_many = codec.encode_bundle({"a": sparse((3, 4), [0, 1, 2, 3], [1] * 4), "b": sparse((6,), [0, 1], [1, 1])})
    with pytest.raises(UpdateRejected, match=r"carries 6 entries; .* allows 5"):  # k = ceil(18 / 4)
        rnd.check("0", too_many, 1)


def test_a_masked_upload_arrives_at_the_masks_indices_derived_once(monkeypatch):
    """SLoRA Stage 1 / SFT: a masked upload carries values only; the server adds them at the mask's indices
    (codec.mask_indices), which it derives once for every device of the round."""
    _no_densifying(monkeypatch)
    mask_positions.cache_clear()
    structure = Structure(kind=StructureKind.FULL, mask_density=0.5, mask_seed=3, dense_patterns=())
    engine, state, rnd = _round({"w": (3, 4)}, structure, UploadFormat.MASKED)
    where = codec.mask_indices(3, "w", (3, 4), 0.5)
    assert where.size == 6
    for d, values in (("0", [1, 2, 3, 4, 5, 6]), ("1", [6, 5, 4, 3, 2, 1])):
        delta = _deliver(rnd, d, {"w": codec.Masked((3, 4), 3, 0.5, np.array(values, np.float32))}, 1)
        assert isinstance(delta["w"], codec.Sparse)
        np.testing.assert_array_equal(delta["w"].indices, where)
    assert mask_positions.cache_info().misses == 1 and mask_positions.cache_info().hits == 1
    expect = np.zeros(12, np.float32)
    expect[where] = 3.5  # (v + (7 - v)) / 2
    new, _ = engine.finish(state, rnd.agg, {})
    np.testing.assert_array_equal(new.params["w"].reshape(-1), expect)


def test_upload_checks_work_on_the_sparse_form():
    engine, state, rnd = _round({"w": (3, 4)}, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, 0.25)
    too_big = codec.encode_bundle({"w": sparse((3, 4), [4], [2000.0])})  # server.max_update_abs = 1000
    with pytest.raises(UpdateRejected, match=r"\|delta\| reaches 2e\+03"):
        rnd.check("0", too_big, 1)
    too_many = codec.encode_bundle({"w": sparse((3, 4), [0, 1, 2, 3], [1, 1, 1, 1])})  # k = ceil(12 / 4) = 3
    with pytest.raises(UpdateRejected, match="carries 4 entries"):
        rnd.check("0", too_many, 1)


def test_an_upload_with_repeated_indices_is_refused_before_it_is_added(monkeypatch):
    """The codec's decoder cannot produce repeated indices (Golomb gaps are >= 1, rANS is a bitmap); should a
    decoder ever hand them over, the upload is refused as INVALID, not added once where it said twice."""
    engine, state, rnd = _round({"w": (3, 4)}, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, 0.5)
    payload = codec.encode_bundle({"w": sparse((3, 4), [1, 2], [1, 1])})
    decode_flat = codec.decode_flat
    monkeypatch.setattr(codec, "decode_flat", lambda data, max_elements: dataclasses.replace(
        decode_flat(data, max_elements=max_elements), positions=np.array([2, 2])))
    with pytest.raises(UpdateRejected, match="positions: indices must be strictly increasing"):
        rnd.check("0", payload, 1)
    with pytest.raises(ValueError, match="strictly increasing"):  # nor can anything else make one
        FlatSparse(Layout.of({"w": (3, 4)}), np.array([2, 2]), np.ones(2, np.float32))


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        held = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()


def test_a_topk_upload_costs_memory_in_proportion_to_what_was_sent():
    """A 1/256 top-k upload of a 2**20-entry tensor: once the round holds its float64 sum (made whole when
    the second device's indices differed from the first's), checking and adding a third allocates under a
    quarter of one dense float32 copy (4 MiB; the codec's index decoding is most of it). The dense path
    allocated a float32 copy, a float64 copy and weight x that copy per upload: 20 MiB."""
    n, k = 1 << 20, (1 << 20) // 256
    engine, state, rnd = _round({"w": (n,)}, Structure(kind=StructureKind.FULL), UploadFormat.TOPK, k / n, 3)
    rng = np.random.default_rng(0)
    uploads = [{"w": sparse((n,), np.sort(rng.choice(n, k, replace=False)), rng.normal(size=k))} for _ in range(3)]
    _deliver(rnd, "0", uploads[0], 1)
    _deliver(rnd, "1", uploads[1], 1)
    payload = codec.encode_bundle(uploads[2])
    rnd.begin_upload("2", rnd.hand_out("2").task_id, len(payload))
    peak = _traced_peak(lambda: _server_side(rnd, "2", payload, 1))
    assert peak < 0.25 * 4 * n, f"{peak / 2**20:.2f} MiB for a {k}-entry upload"
    expect = sum(densify("w", u["w"]).astype(np.float64) for u in uploads)  # weights 1, 1 and 1
    assert bits(rnd.agg.sum["w"]) == bits(expect)


def test_a_masked_round_sums_k_values_not_the_tensor():
    """Every device uploads under the round's mask (1/64 of a 2**20-entry tensor), so the running sum stays
    the k sums at the mask's indices: once the mask is derived (hashing every entry, once per run), no
    upload, the first included, allocates a whole-tensor array; the mean is the dense path's."""
    n = 1 << 20
    structure = Structure(kind=StructureKind.FULL, mask_density=1 / 64, mask_seed=5, dense_patterns=())
    engine, state, rnd = _round({"w": (n,)}, structure, UploadFormat.MASKED, devices=3)
    k = codec.mask_size((n,), 1 / 64)
    rng = np.random.default_rng(1)
    values = [rng.normal(size=k).astype(np.float32) for _ in range(3)]
    payloads = [codec.encode_bundle({"w": codec.Masked((n,), 5, 1 / 64, v)}) for v in values]
    mask_positions(5, "w", (n,), 1 / 64)
    for d, payload in zip("012", payloads):
        rnd.begin_upload(d, rnd.hand_out(d).task_id, len(payload))
        peak = _traced_peak(lambda: _server_side(rnd, d, payload, 2))
        assert peak < 0.25 * 4 * n, f"upload {d}: {peak / 2**20:.2f} MiB for {k} values"
    mean = rnd.agg.mean()["w"]
    where = codec.mask_indices(5, "w", (n,), 1 / 64)
    ref = RunningMean()
    for v in values:
        ref.add({"w": codec.to_dense("w", codec.Masked((n,), 5, 1 / 64, v))}, 2.0)
    assert bits(mean) == bits(ref.mean()["w"]) and np.count_nonzero(mean) == k == where.size
    assert rnd.agg.held_bytes == 8 * k  # k float64 sums, not 8 MiB


def test_the_aggregation_benchmark_runs(tmp_path):
    """benchmarks.aggregation on its LoRA structure at two densities, the densify-first comparison included:
    one record per point, every figure present (figures are printed, never asserted)."""
    from benchmarks.aggregation import main

    out = tmp_path / "agg.jsonl"
    assert main(["--structures", "lora", "--densities", "1,0.015625", "--uploads", "3", "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["structure"], r["density"], r["upload_format"]) for r in records] == [
        ("lora", 1.0, "dense"), ("lora", 0.015625, "topk")]
    assert all(r["seconds_per_upload"] > 0 and r["peak_mb"] >= 0 for r in records)
    assert records[1]["densified_seconds"] > 0
