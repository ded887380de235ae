"""Method correctness with numbers checkable by hand: masks, SVD priming, FLASC's top-k payloads."""
from __future__ import annotations

import copy
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgelora import codec
from edgelora.config import load_config
from edgelora.configtools import ConfigError
from edgelora.edge_client.trainer import DeviceHost, DeviceTrainer
from edgelora.methods import METHODS, ModelHost, make_method
from edgelora.methods.priming import svd_prime_lora
from edgelora.models import build_model, load_base_model, trainable_state
from edgelora.protos.refusals import UpdateRejected
from edgelora.server.engine import RoundEngine
from edgelora.sparsity import mask_bool, topk_count
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, LoraSpec, Stage, Structure, StructureKind

from .conftest import tiny_raw

SHAPES = {"a.weight": (7, 13), "b.weight": (384, 1536), "c.bias": (5,)}
MASK_SCRIPT = """
import hashlib, sys
from edgelora.sparsity import mask_bool
for name, shape in {shapes!r}.items():
    print(name, hashlib.sha256(mask_bool(42, name, shape, 0.1).tobytes()).hexdigest())
"""


def test_mask_identical_in_two_processes_with_declared_density():
    import hashlib

    out = subprocess.run([sys.executable, "-c", MASK_SCRIPT.format(shapes=SHAPES)], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    theirs = dict(line.split() for line in out if line.strip())
    for name, shape in SHAPES.items():
        m = mask_bool(42, name, shape, 0.1)
        assert hashlib.sha256(m.tobytes()).hexdigest() == theirs[name]
        assert abs(int(m.sum()) - 0.1 * math.prod(shape)) <= 1, (name, int(m.sum()))
    # different names and seeds give different masks (the mask really depends on them)
    assert not np.array_equal(mask_bool(42, "x", (50, 50), 0.1), mask_bool(43, "x", (50, 50), 0.1))


@pytest.fixture(scope="module")
def tiny_base():
    return load_base_model("tiny-bert", 4, 0)


def _reference(base, delta: dict[str, np.ndarray]):
    """W0 + delta on the plain model: the forward pass priming must reproduce."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in delta:
                p.add_(torch.from_numpy(delta[n].astype(np.float32)))
    return ref


def _rank_r(d: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("split", ["b", "sqrt"])
@pytest.mark.parametrize("rank", [3, 64])   # 64 >= every tiny-bert layer's min dim: full rank
def test_svd_priming_reproduces_rank_r_delta(tiny_base, split, rank):
    spec = LoraSpec(rank=rank, alpha=2.0 * rank + 1.0)  # alpha != r: the alpha/r scale must be absorbed
    model = build_model(tiny_base, Structure(kind=StructureKind.LORA, lora=spec))
    rng = np.random.default_rng(1)
    delta = {n: rng.normal(scale=0.5, size=tuple(p.shape)) for n, p in tiny_base.named_parameters()
             if n.endswith(".weight") and p.ndim == 2 and ".encoder." in n}
    primed = svd_prime_lora(model, delta, split=split)
    assert len(primed) == 12  # 2 layers x (q, k, v, attention out, intermediate, output)
    expected = {n: (_rank_r(delta[n], rank) if n in primed else 0 * delta[n]) for n in delta}
    ref = _reference(tiny_base, expected)
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
        plain = tiny_base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (got - plain).abs().max() > 1e-3  # priming really changed the outputs
    if rank == 64:  # full rank: exactly W0 + Delta W
        full = _reference(tiny_base, delta)
        with torch.no_grad():
            assert torch.allclose(got, full(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_slora_switch_primes_lora_and_carries_the_head(tiny_base):
    run = load_config(tiny_raw(method={"name": "slora", "density": 0.5, "stage1_rounds": 1,
                                       "lora": {"rank": 4, "alpha": 8.0}}))
    run = run.replace(model=type(run.model)(name="tiny-bert", num_labels=4, max_seq_len=32))
    engine = RoundEngine(run, make_method(run), ModelHost(tiny_base))
    state = engine.init_state({})
    assert state.stage.name == "SPARSE"
    rng = np.random.default_rng(2)
    w1 = {n: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for n, v in state.params.items()}
    new = engine.method.after_round(state.replace(round=1, params=w1, opt_state={"step": np.ones(1)}),
                                    engine.host, False)
    assert new.stage.name == "LORA" and new.stage_start == 2 and new.opt_state == {}
    head = "base_model.model.classifier.modules_to_save.default.weight"
    np.testing.assert_array_equal(new.params[head], w1["classifier.weight"])
    q = "base_model.model.bert.encoder.layer.0.attention.self.query."
    s = 8.0 / 4
    d = w1["bert.encoder.layer.0.attention.self.query.weight"].astype(np.float64) - \
        state.params["bert.encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_allclose(s * new.params[q + "lora_B.default.weight"] @ new.params[q + "lora_A.default.weight"],
                               _rank_r(d, 4), atol=1e-6)


def _flasc_engine(num_devices: int = 2, **method):
    raw = tiny_raw(method={"name": "flasc", "lora": {"rank": 4, "alpha": 8.0}, **method},
                   data={"num_devices": num_devices},
                   server={"value_type": "float32"})  # exact values: these tests check which entries travel
    run = load_config(raw)
    run = run.replace(model=type(run.model)(name="tiny-bert", num_labels=20, max_seq_len=32))
    return run, RoundEngine(run, make_method(run), ModelHost(load_base_model("tiny-bert", 20, 0)))


def _assert_topk(sent: dict, dense: dict[str, np.ndarray], density: float):
    n = sum(v.size for v in dense.values())
    k = math.ceil(density * n)
    assert k == topk_count(n, density)
    assert sum(len(t.indices) for t in sent.values()) == k
    chosen = np.concatenate([np.abs(dense[name].reshape(-1)[sent[name].indices]) for name in dense])
    rest = np.concatenate([np.delete(np.abs(dense[name].reshape(-1)), sent[name].indices) for name in dense])
    assert chosen.min() >= rest.max()  # the k largest by magnitude, globally across tensors
    for name, t in sent.items():
        np.testing.assert_array_equal(t.values, dense[name].reshape(-1)[t.indices])


def test_flasc_payloads_hold_exactly_ceil_dn_largest_entries_both_ways():
    run, engine = _flasc_engine(download_density=0.3, upload_density=0.07)
    rng = np.random.default_rng(3)
    state = engine.init_state(np.random.PCG64(0).state)
    state = state.replace(params={n: rng.normal(size=v.shape).astype(np.float32) for n, v in state.params.items()})
    plan = engine.plan(state, engine.method.configure(state, DeviceInfo("0")))
    down = codec.decode_bundle(plan.payload)
    assert all(isinstance(t, codec.Sparse) for t in down.values())
    _assert_topk(down, state.params, 0.3)

    host = DeviceHost(run.model)
    trainer = DeviceTrainer("0", host, run.data)
    update = trainer.run(plan.task, plan.payload)
    model = host.build(plan.task.structure)
    received = {n: codec.to_dense(n, t) for n, t in down.items()}
    delta = {n: v - received[n] for n, v in trainable_state(model).items()}
    up = codec.decode_bundle(update.payload)
    _assert_topk(up, delta, 0.07)
    assert engine.decode_update(plan, update.payload)  # and the server accepts it


def test_flasc_tiers_plan_each_device_and_hold_each_upload_to_its_own_plan():
    """3 tiers (FLASC's heterogeneous setting): tier i of 3 gets densities / 4^(2-i), tier = index mod 3 when
    the device gives none; every payload holds exactly ceil(d_tier x N) entries both ways, devices of one tier
    share one download, and an upload with more entries than its device's plan allows is refused by name."""
    run, engine = _flasc_engine(num_devices=5, download_density=0.5, upload_density=0.25, tiers=3)
    state = engine.init_state(np.random.PCG64(0).state)
    rng = np.random.default_rng(5)
    state = state.replace(params={n: rng.normal(size=v.shape).astype(np.float32) for n, v in state.params.items()})
    n = sum(v.size for v in state.params.values())
    devices = {d: DeviceInfo(d) for d in ("0", "1", "2", "3")} | {"4": DeviceInfo("4", tier=2)}
    rnd = engine.open_round(state, list(devices), {}, devices)
    expect = {"0": 0, "1": 1, "2": 2, "3": 0, "4": 2}
    assert {d: p.instruction.tier for d, p in rnd.plans.items()} == expect
    assert rnd.plans["0"] is rnd.plans["3"] and rnd.plans["2"] is rnd.plans["4"]  # one download per tier
    host = DeviceHost(run.model)
    uploads = {}
    for d in ("0", "1", "2"):
        tier, plan = expect[d], rnd.plans[d]
        down_d, up_d = 0.5 / 4 ** (2 - tier), 0.25 / 4 ** (2 - tier)
        assert plan.instruction.download_density == down_d and plan.task.upload.density == up_d
        down = codec.decode_bundle(plan.payload)
        assert sum(len(t.indices) for t in down.values()) == math.ceil(down_d * n)
        uploads[d] = DeviceTrainer(d, host, run.data).run(plan.task, plan.payload).payload
        up = codec.decode_bundle(uploads[d])
        assert sum(len(t.indices) for t in up.values()) == math.ceil(up_d * n)
        assert rnd.check(d, uploads[d], engine.partition_sizes[int(d)])  # accepted against its own plan
    with pytest.raises(UpdateRejected, match=r"this device's plan \(tier 0, download density 0.03125, upload "
                                             r"density 0.015625\) allows"):
        rnd.check("0", uploads["2"], engine.partition_sizes[0])  # tier 2's upload is 16x denser than tier 0 may send


@pytest.mark.parametrize("method, match", [
    ({"tiers": 0}, "method.tiers: must be >= 1"),
    ({"tier_densities": [[0.5, 0.1], [1.0]]}, "method.tier_densities: must be a list of"),
    ({"tier_densities": [[0.5, 0.1], [1.0, 2.0]]}, "method.tier_densities: must be a list of"),
    ({"tiers": 3, "tier_densities": [[0.5, 0.1], [1.0, 1.0]]}, "method.tiers: is 3 but tier_densities lists 2"),
])
def test_flasc_tier_settings_are_checked_at_load(method, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(tiny_raw(method={"name": "flasc", **method}))


def test_flasc_tier_densities_override_the_4x_rule():
    _, engine = _flasc_engine(tier_densities=[[0.1, 0.05], [1.0, 0.5]])
    state = engine.init_state(np.random.PCG64(0).state)
    ins = engine.method.configure(state, DeviceInfo("7"))  # 7 mod 2 = tier 1
    assert (ins.tier, ins.download_density, ins.task.upload.density) == (1, 1.0, 0.5)


def test_flasc_density_decays_by_round():
    _, engine = _flasc_engine(download_density=0.4, upload_density=0.2, density_decay=0.5, decay_every=2)
    state = engine.init_state(np.random.PCG64(0).state)
    assert engine.method.upload_rule(state.replace(round=3)).density == pytest.approx(0.1)
    n = sum(v.size for v in state.params.values())
    at4 = state.replace(round=4)
    down = engine.method.download(at4, engine.method.configure(at4, DeviceInfo("0")))
    assert sum(len(t.indices) for t in down.values()) == math.ceil(0.1 * n)


@pytest.mark.parametrize("eval_masked", [True, False])
def test_flasc_scores_and_saves_the_model_devices_download(eval_masked):
    _, engine = _flasc_engine(download_density=0.2, upload_density=0.1, density_decay=0.5, decay_every=2,
                              eval_masked=eval_masked)
    rng = np.random.default_rng(5)
    state = engine.init_state(np.random.PCG64(0).state)
    state = state.replace(round=2, params={n: rng.normal(size=v.shape).astype(np.float32)
                                           for n, v in state.params.items()})
    served = {n: p.detach().numpy() for n, p in engine.model_for(state).named_parameters() if p.requires_grad}
    if not eval_masked:  # the dense server weights
        for n, v in state.params.items():
            np.testing.assert_array_equal(served[n], v)
        return
    # round 2 made these weights; its devices downloaded at 0.2 (the next round's 0.1 is a download no device
    # has trained from yet: the last round's, never)
    made_by = state.replace(round=1)
    down = engine.method.download(state, engine.method.configure(made_by, DeviceInfo("0")))
    n_entries = sum(v.size for v in state.params.values())
    assert sum(int(np.count_nonzero(v)) for v in served.values()) == math.ceil(0.2 * n_entries)
    for n, t in down.items():
        np.testing.assert_array_equal(served[n], codec.to_dense(n, t))
    at3 = {n: p.detach().numpy() for n, p in engine.model_for(state.replace(round=3)).named_parameters()
           if p.requires_grad}
    assert sum(int(np.count_nonzero(v)) for v in at3.values()) == math.ceil(0.1 * n_entries)


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_adapters_start_as_identity_and_train_only_adapters_and_head(tiny_base, kind):
    from edgelora.tasks import AdapterSpec

    model = build_model(tiny_base, Structure(kind=StructureKind.ADAPTER, adapter=AdapterSpec(kind, 8)))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_base(input_ids=ids).logits)
    names = list(trainable_state(model))
    adapters = [n for n in names if ".adapter." in n]
    assert len(adapters) == (4 if kind == "houlsby" else 2) * 4  # blocks x (down w, down b, up w, up b)
    assert ("classifier.weight" in names) and not any("word_embeddings" in n for n in names)
    assert any("LayerNorm" in n for n in names) == (kind == "houlsby")


def test_every_method_is_registered_with_a_description():
    from edgelora.methods import describe_methods

    names = dict(describe_methods())
    assert set(names) >= {"fft", "lora", "sft", "slora", "flora", "bitfit", "houlsby", "pfeiffer", "flasc"}
    assert all(names[n] for n in names) and set(METHODS) == set(names)


def test_error_feedback_keeps_what_topk_did_not_send_once_accepted():
    import numpy as np

    from edgelora import codec
    from edgelora.data import Examples
    from edgelora.edge_client.trainer import DeviceTrainer
    from edgelora.tasks import Stage, Structure, Task, TrainSpec, UploadFormat, UploadRule

    trainer = DeviceTrainer("0", host=None, data=None, examples=Examples(("x",), np.zeros(1, np.int64)))
    task = Task(1, Stage.DENSE, "flasc", Structure(), TrainSpec(),
                UploadRule(format=UploadFormat.TOPK, density=0.25, error_feedback=True))

    def sent(delta):
        (t,) = codec.decode_bundle(trainer._encode(task, {"a": np.array(delta, np.float32)}, {})).values()
        return t.indices.tolist(), t.values.tolist()

    assert sent([5, 1, 0.5, 0.1]) == ([0], [5.0])  # k = ceil(0.25 * 4) = 1
    assert sent([5, 1, 0.5, 0.1]) == ([0], [5.0])  # refused and retried: the residual is not counted twice
    trainer.accepted()
    np.testing.assert_allclose(trainer.residual["a"], [0, 1, 0.5, 0.1])
    # next round: delta + residual = [0, 1, 0.5, 0.3]; the residual's largest entry now travels
    assert sent([0, 0, 0, 0.2]) == ([1], [1.0])
    trainer.accepted()
    np.testing.assert_allclose(trainer.residual["a"], [0, 0, 0.5, 0.3], atol=1e-7)


def test_error_feedback_carries_the_rounding_error_of_a_lossy_value_type():
    """With int4 values, what the server decodes is not what top-k chose: the residual is delta minus what was
    actually sent, so the rounding error travels in a later round too. Stochastic rounding is seeded by the
    round's seed and the device, so a retried upload is the same bytes."""
    import numpy as np

    from edgelora import codec
    from edgelora.data import Examples
    from edgelora.edge_client.trainer import DeviceTrainer
    from edgelora.tasks import Stage, Structure, Task, TrainSpec, UploadFormat, UploadRule

    trainer = DeviceTrainer("3", host=None, data=None, examples=Examples(("x",), np.zeros(1, np.int64)))
    delta = {"a": np.array([1.0, 0.30, 0.52, -0.9, 0.01, 0.02, 0.03, 0.04], np.float32)}
    for rounding in ("nearest", "stochastic"):
        task = Task(1, Stage.DENSE, "flasc", Structure(), TrainSpec(seed=7),
                    UploadRule(format=UploadFormat.TOPK, density=0.5, error_feedback=True, value_type="int4_block",
                               rounding=rounding))
        payload = trainer._encode(task, dict(delta), {})
        assert payload == trainer._encode(task, dict(delta), {})  # a retry sends the same bytes
        trainer.accepted()
        (sent,) = codec.decode_bundle(payload).values()
        assert sent.indices.tolist() == [0, 1, 2, 3]  # top-4 of 8 by magnitude
        assert not np.allclose(sent.values, delta["a"][:4])  # 4 bits cannot hold 0.30 and 0.52 exactly
        np.testing.assert_allclose(trainer.residual["a"], delta["a"] - codec.to_dense("a", sent), atol=1e-7)
        trainer.residual = {}


def test_cosine_lr_schedule_runs_per_stage():
    """train.lr_schedule = cosine: lr x (1 + cos(pi (t - first) / span)) / 2 in round t of a stage spanning
    `span` rounds; SLoRA's Stage 1 runs its own from stage1_lr and Stage 2 its own from train.lr."""
    raw = tiny_raw(server={"rounds": 4}, train={"lr": 0.01, "lr_schedule": "cosine"})
    m = make_method(load_config(raw))
    at = lambda r, **kw: m.train_spec(ServerState(round=r, stage=Stage.DENSE, stage_start=1, params={}, **kw)).lr
    assert [at(r) for r in range(4)] == pytest.approx([0.01, 0.01 * (1 + math.cos(math.pi / 4)) / 2, 0.005,
                                                       0.01 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert make_method(load_config(tiny_raw(train={"lr": 0.01}))).train_spec(
        ServerState(round=1, stage=Stage.DENSE, stage_start=1, params={})).lr == 0.01  # constant by default
    raw = tiny_raw(server={"rounds": 6}, train={"lr": 0.01, "lr_schedule": "cosine"},
                   method={"name": "slora", "stage1_rounds": 2, "stage1_lr": 0.1})
    s = make_method(load_config(raw))
    lr = lambda r, stage, start: s.train_spec(ServerState(round=r, stage=stage, stage_start=start, params={})).lr
    assert [lr(0, Stage.SPARSE, 1), lr(1, Stage.SPARSE, 1)] == pytest.approx([0.1, 0.05])
    assert [lr(r, Stage.LORA, 3) for r in (2, 3, 4, 5)] == pytest.approx(
        [0.01 * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)])


def test_deadline_policy_fits_each_devices_transfer_into_its_share_of_the_deadline():
    """density = rate / 8 x budget / (N x bytes per entry), clipped to [min, max]: a device declaring 1 Mbit/s
    up gets 1/8 of the upload density of one declaring 8; measured rates and bytes per entry win over
    declared ones (link_rates = measured) and are ignored under link_rates = declared; no known rate ->
    the configured densities."""
    from edgelora.methods.flasc import fit_density

    assert fit_density(8e6, 2.0, 1000, 4.0, 0.01, 1.0) == 1.0  # 2 MB of room for 4 kB: clipped to max
    assert fit_density(8e3, 2.0, 1000, 4.0, 0.01, 1.0) == pytest.approx(0.5)
    assert fit_density(8e1, 2.0, 1000, 4.0, 0.01, 1.0) == 0.01 and fit_density(0.0, 2.0, 1000, 4.0, 0.01, 1.0) is None
    kw = dict(density_policy="deadline", min_density=0.001, max_density=1.0, transfer_fraction=0.5)
    run, engine = _flasc_engine(**kw)
    run_d, engine_d = _flasc_engine(link_rates="declared", **kw)
    state = engine.init_state(np.random.PCG64(0).state)
    n = sum(v.size for v in state.params.values())
    budget = 0.5 * run.server.round_deadline_s / 2
    slow, fast = DeviceInfo("0", declared_uplink_bps=1e3), DeviceInfo("1", declared_uplink_bps=8e3)
    d_slow = engine.method.configure(state, slow).task.upload.density
    d_fast = engine.method.configure(state, fast).task.upload.density
    assert d_slow == pytest.approx(1e3 / 8 * budget / (n * 6.0)) and d_fast == pytest.approx(8 * d_slow)
    measured = DeviceInfo("0", declared_uplink_bps=1e3, uplink_bps=2e3, up_bytes_per_entry=3.0)
    assert engine.method.configure(state, measured).task.upload.density == pytest.approx(4 * d_slow)
    assert engine_d.method.configure(state, measured).task.upload.density == pytest.approx(d_slow)
    unknown = engine.method.configure(state, DeviceInfo("0"))
    assert (unknown.task.upload.density, unknown.download_density) == (0.25, 0.25)  # FlascConfig's defaults
    with pytest.raises(ConfigError, match="method.density_policy"):
        load_config(tiny_raw(method={"name": "flasc", "density_policy": "deadline", "tiers": 2}))


def test_own_data_weighs_reported_counts_up_to_the_cap(caplog):
    """data.mode = own: an update is weighted by the example count its device reports, at most
    server.max_examples_per_device (a larger claim is weighted at the cap and logged); a zero count is refused.
    Partitions: the count must equal the partition's size."""
    from edgelora.protos.refusals import UpdateRejected

    raw = tiny_raw(server={"max_examples_per_device": 100},
                   data={"mode": "own", "label_names": ["a", "b"], "dataset": "csv"})
    run = load_config(raw)
    engine = RoundEngine(run, make_method(run), ModelHost(load_base_model("tiny-bert", 2, 0)))
    engine.check_examples("phone-7", 250)
    assert engine.counted_examples("phone-7", 40) == 40 and engine.counted_examples("phone-7", 250) == 100
    assert "device phone-7 reports 250 examples; weighted at server.max_examples_per_device = 100" in caplog.text
    with pytest.raises(UpdateRejected, match="num_examples 0"):
        engine.check_examples("phone-7", 0)
    with pytest.raises(ConfigError, match="data.label_names: data.mode = own needs the run's classes"):
        load_config(tiny_raw(data={"mode": "own"}))


@pytest.mark.parametrize("field, value", [("decay_every", 0), ("density_decay", 0.0), ("density_decay", 1.5)])
def test_flasc_decay_settings_out_of_bounds_are_refused_at_load(field, value):
    """They were checked after a return and never ran: decay_every = 0 loaded and divided by zero when a
    round opened."""
    from edgelora.config import load_config

    with pytest.raises(ConfigError, match=f"method.{field}: must be"):
        load_config({"method": {"name": "flasc", field: value}})


# Every bound a method config checks, with values on the wrong side of it (and the method that owns it).
OUT_OF_BOUNDS = {
    "bottleneck": ("houlsby", [0, -3]),
    "lora.rank": ("lora", [0, -1]),
    "lora.alpha": ("lora", [0.0, -1.0]),
    "lora.dropout": ("lora", [-0.1, 1.0, 2.0]),
    "download_density": ("flasc", [0.0, -0.5, 1.5]),
    "upload_density": ("flasc", [0.0, 1.01]),
    "tiers": ("flasc", [0, -2]),
    "density_decay": ("flasc", [0.0, 1.5]),
    "decay_every": ("flasc", [0, -1]),
    "tier_densities": ("flasc", [[[0.5, 0.0]], [[1.5, 0.5]], [[0.5]]]),
    "min_density/max_density": ("flasc", [{"min_density": 0.0}, {"max_density": 1.5},
                                          {"min_density": 0.5, "max_density": 0.25}]),
    "transfer_fraction": ("flasc", [0.0, 1.5]),
    "density_policy": ("flasc", [{"density_policy": "deadline", "tiers": 2}]),
    "density": ("sft", [0.0, 1.5, -1.0]),
    "stage1_rounds": ("slora", [-1]),
    "stage1_fraction": ("slora", [0.0, 1.0]),
    "stage1_lr": ("slora", [-1e-3]),
}


def _method_with(name: str, key: str, bad):
    if isinstance(bad, dict):
        return {"name": name, **bad}
    if key.startswith("lora."):
        return {"name": name, "lora": {"rank": 4, "alpha": 8.0, key.split(".", 1)[1]: bad}}
    return {"name": name, key: bad}


@pytest.mark.parametrize("key", list(OUT_OF_BOUNDS))
def test_every_bounded_method_field_is_refused_out_of_bounds_by_name(key):
    name, values = OUT_OF_BOUNDS[key]
    for bad in values:
        raw = tiny_raw()
        raw["method"] = _method_with(name, key, bad)
        with pytest.raises(ConfigError, match=re.escape(f"method.{key}")):
            load_config(raw)
    raw = tiny_raw()
    raw["method"] = {"name": "flora", "density": 0.5}
    with pytest.raises(ConfigError, match="flora trains every weight"):
        load_config(raw)


def test_the_bounds_table_covers_every_check_in_the_method_configs():
    """A bound added to a method config without a row above fails here."""
    import ast

    from .conftest import REPO

    checked = set()
    for path in (REPO / "edgelora" / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "check" and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("method."):
                checked.add(node.args[1].value.removeprefix("method."))
    assert checked == set(OUT_OF_BOUNDS), checked ^ set(OUT_OF_BOUNDS)


def test_warm_up_builds_the_first_structure_and_leaves_its_weights_alone(tiny_config):
    """A device builds the run spec's first structure before it registers (one forward and backward pass):
    the model its first task gets is that one, not rebuilt, with the weights a fresh build has and no grads."""
    import numpy as np

    from edgelora.data import with_num_labels
    from edgelora.edge_client.trainer import DeviceHost, DeviceTrainer
    from edgelora.models import trainable_state

    run = with_num_labels(tiny_config())
    structure = make_method(run).initial_structure()
    host = DeviceHost(run.model)
    assert DeviceTrainer("0", host, run.data).warm_up(structure) > 0
    warmed = host.build(structure)
    assert host.prepare(structure)[0] is warmed  # the first task reuses it
    assert all(p.grad is None for p in warmed.parameters())
    fresh = trainable_state(DeviceHost(run.model).build(structure))
    for name, value in trainable_state(warmed).items():
        np.testing.assert_array_equal(value, fresh[name], err_msg=name)
