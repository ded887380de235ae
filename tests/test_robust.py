"""Robust and private aggregation: median, trimmed mean, norm clipping and DP-FedAvg, by hand on small arrays,
then the robust ones against devices that attack (R11) and the private one's noise and accounting (R12)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from edgelora import codec
from edgelora.config import load_config
from edgelora.configtools import ConfigError
from edgelora.schema import FedAvgConfig, MedianConfig, TrimmedMeanConfig
from edgelora.server.aggregation import DpFedAvg, FedAvg, Median, TrimmedMean, clip_to_norm, dp_epsilon, global_norm

from .conftest import tiny_raw


def _acc(aggregator, deltas, weights=None):
    acc = aggregator.start()
    for i, d in enumerate(deltas):
        acc.add(aggregator.clip(d), 1.0 if weights is None else weights[i])
    return acc


def test_median_and_trimmed_mean_by_hand():
    deltas = [{"w": np.array([1.0, -2.0, 0.0], np.float32)}, {"w": np.array([2.0, 100.0, 0.0], np.float32)},
              {"w": np.array([3.0, 3.0, -50.0], np.float32)}, {"w": np.array([4.0, 4.0, 1.0], np.float32)},
              {"w": np.array([1000.0, 5.0, 2.0], np.float32)}]
    params = {"w": np.zeros(3, np.float32)}
    med, _ = Median(MedianConfig()).finish(params, _acc(Median(MedianConfig()), deltas), {})
    np.testing.assert_array_equal(med["w"], [3.0, 4.0, 0.0])
    tm = TrimmedMean(TrimmedMeanConfig(beta=0.2))  # floor(0.2 x 5) = 1 dropped at each end
    out, _ = tm.finish(params, _acc(tm, deltas), {})
    np.testing.assert_allclose(out["w"], [3.0, 4.0, 1 / 3], rtol=1e-6)
    plain = FedAvg(FedAvgConfig(weighted=False))
    np.testing.assert_allclose(plain.finish(params, _acc(plain, deltas), {})[0]["w"], [202.0, 22.0, -9.4], rtol=1e-6)


def test_clipping_bounds_every_update_and_keeps_small_ones():
    big, small = {"a": np.full((3, 4), 2.0, np.float32), "b": np.full(5, -1.0, np.float32)}, {"a": np.full(2, 0.1, np.float32)}
    assert global_norm(big) == pytest.approx(np.sqrt(12 * 4 + 5))
    clipped = clip_to_norm(big, 1.5)
    assert global_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] / clipped["a"][0, 0], 1.0)  # direction kept
    assert clip_to_norm(small, 1.5) is small
    fedavg = FedAvg(FedAvgConfig(weighted=False, clip_norm=1.5))
    mean = fedavg.mean_delta(_acc(fedavg, [big, {k: -v for k, v in big.items()}, big]))
    assert global_norm(mean) == pytest.approx(0.5, rel=1e-6)  # (1.5 - 1.5 + 1.5) / 3


def test_aggregator_settings_fail_at_load_naming_the_field():
    for agg, match in (({"name": "trimmed-mean", "beta": 0.5}, "aggregator.beta"),
                       ({"name": "dp-fedavg", "clip_norm": 0}, "aggregator.clip_norm"),
                       ({"name": "dp-fedavg", "delta": 1.0}, "aggregator.delta"),
                       ({"name": "fedavg", "clip_norm": -1}, "aggregator.clip_norm"),
                       ({"name": "median", "beta": 0.1}, "unknown key(s) ['beta']")):
        with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            load_config(tiny_raw(aggregator=agg))
    raw = tiny_raw(aggregator={"name": "dp-fedavg"})
    raw["method"] = {"name": "sft"}
    with pytest.raises(ConfigError, match="aggregator.name: dp-fedavg adds noise outside sft's sparse mask"):
        load_config(raw)


def test_dp_noise_has_the_configured_std_and_epsilon_is_the_accountants():
    """R12: every update entering the sum is clipped to C; the noise on the sum (measured on zero updates over
    40 rounds x 50,000 coordinates) has std z x C within 5 %; the reported epsilon is dp-accounting's figure."""
    import dp_accounting
    from dp_accounting import rdp

    run = load_config(tiny_raw(server={"devices_per_round": 4}, data={"num_devices": 20},
                               aggregator={"name": "dp-fedavg", "clip_norm": 0.5, "noise_multiplier": 1.3,
                                           "delta": 1e-5}))
    dp = DpFedAvg(run.aggregator, run)
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(scale=s, size=50_000).astype(np.float32)} for s in (0.001, 1.0, 10.0, 100.0)]
    assert all(global_norm(dp.clip(u)) <= 0.5 * (1 + 1e-6) for u in updates)
    params = {"w": np.zeros(50_000, np.float32)}
    noise = []
    for r in range(1, 41):
        acc = _acc(dp, [{"w": np.zeros(50_000, np.float32)}] * 4)
        new, _ = dp.finish(params, acc, {}, round_number=r)
        noise.append(new["w"] * 4)  # the mean divides the noisy sum by K = 4
    assert np.std(np.concatenate(noise)) == pytest.approx(1.3 * 0.5, rel=0.05)
    again, _ = dp.finish(params, _acc(dp, [{"w": np.zeros(50_000, np.float32)}] * 4), {}, round_number=40)
    np.testing.assert_array_equal(again["w"] * 4, noise[-1])  # seeded per round: a resume draws the same noise
    acct = rdp.RdpAccountant()
    acct.compose(dp_accounting.PoissonSampledDpEvent(4 / 20, dp_accounting.GaussianDpEvent(1.3)), 10)
    assert dp.privacy_spent(10) == pytest.approx(acct.get_epsilon(1e-5), rel=1e-9)
    assert dp_epsilon(1.3, 0.2, 20, 1e-5) > dp.privacy_spent(10) > 0


# -- R11: attackers in a real (simulated) federation -------------------------------------------------------
KEYS = ["football", "election", "economy", "science"]
FILL = "the a of and to in is was for on that with as by at from this it be are have has not but or".split()


def _keyword_data(path, n, seed):
    """4 classes, each headline 6 filler words and its class's keyword: tiny-bert learns it in a few rounds."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            y = rng.randrange(4)
            words = [rng.choice(FILL) for _ in range(6)]
            words.insert(rng.randrange(7), KEYS[y])
            f.write(json.dumps({"text": " ".join(words), "label": y}) + "\n")


@pytest.mark.slow
def test_median_and_trimmed_mean_survive_20_percent_attackers_fedavg_does_not(tmp_path, monkeypatch):
    """R11: 2 of 10 devices attack every round (device 3 sends its delta x 100, device 7 sign-flipped x 100).
    Median and trimmed mean end within 1 point of the clean FedAvg run; FedAvg under attack does not."""
    from edgelora.edge_client.trainer import DeviceTrainer
    from edgelora.simulation.simulator import simulate

    _keyword_data(tmp_path / "train.jsonl", 600, 0)
    _keyword_data(tmp_path / "test.jsonl", 400, 1)

    def final_accuracy(aggregator, out, rounds=4):
        raw = tiny_raw(server={"rounds": rounds, "devices_per_round": 10, "min_devices": 1},
                       model={"max_seq_len": 16},
                       data={"dataset": "jsonl", "path": str(tmp_path / "train.jsonl"),
                             "test_path": str(tmp_path / "test.jsonl"), "num_devices": 10,
                             "max_examples_per_device": 48, "test_max_examples": 400},
                       train={"batch_size": 8, "lr": 1e-2, "local_epochs": 2, "precision": "fp32"},
                       aggregator=aggregator)
        raw["method"] = {"name": "fft"}
        simulate(load_config(raw), tmp_path / out, progress=False)
        return json.loads((tmp_path / out / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"]

    clean = final_accuracy({"name": "fedavg"}, "clean")
    assert clean >= 0.9  # the clean run learns measurably (chance: 0.25)

    honest = DeviceTrainer.run

    def attacked(self, task, payload, download_s=0.0, **kw):
        update = honest(self, task, payload, download_s, **kw)
        factor = {"3": 100.0, "7": -100.0}.get(self.device_id)
        if factor is not None:
            sent = codec.decode_bundle(update.payload)
            update.payload = codec.encode_bundle({n: codec.Dense(codec.to_dense(n, t) * factor) for n, t in sent.items()})
        return update

    monkeypatch.setattr(DeviceTrainer, "run", attacked)
    assert abs(final_accuracy({"name": "median"}, "median") - clean) <= 0.01 + 1e-9
    assert abs(final_accuracy({"name": "trimmed-mean", "beta": 0.2}, "trimmed") - clean) <= 0.01 + 1e-9
    # two rounds of 100x deltas are enough to wreck FedAvg
    assert final_accuracy({"name": "fedavg"}, "fedavg", rounds=2) < clean - 0.2
