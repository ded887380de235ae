"""The simulator against the real thing: for every method, two tiny-bert rounds over real gRPC (an in-process
server on port 0, one EdgeClient hosting every device) and the same run in the simulator end with identical
global weights, stage and wire byte counts. Plus: the CLI runs every example config, and resume continues a
run exactly (SLoRA's stage switch included)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edgelora.config import load_config
from edgelora.server.checkpoint import load_state
from edgelora.simulation.simulator import simulate

from .conftest import REPO, tiny_raw

pytestmark = pytest.mark.slow  # trains tiny-bert and starts real gRPC servers: ~3 min on 2 idle CPUs

METHOD_CONFIGS = {
    "fft": {},
    "lora": {"lora": {"rank": 4, "alpha": 8.0}},
    "sft": {"density": 0.05},
    "slora": {"density": 0.1, "stage1_rounds": 1, "lora": {"rank": 4, "alpha": 4.0}},
    "flora": {"stage1_rounds": 1, "lora": {"rank": 4, "alpha": 4.0}},
    "bitfit": {},
    "houlsby": {"bottleneck": 8},
    "pfeiffer": {"bottleneck": 8},
    "flasc": {"download_density": 0.5, "upload_density": 0.2, "error_feedback": True,
              "lora": {"rank": 4, "alpha": 8.0}},
    # 4-bit blockwise uploads with stochastic rounding (seeded per device and round), int8 blockwise downloads,
    # error feedback carrying both top-k's and rounding's errors
    "flasc-int4": {"name": "flasc", "download_density": 0.5, "upload_density": 0.2, "error_feedback": True,
                   "lora": {"rank": 4, "alpha": 8.0}},
    # 3 devices, server-assigned tiers 0, 1, 2: each device's own download and upload density
    "flasc-tiers": {"name": "flasc", "download_density": 0.5, "upload_density": 0.4, "tiers": 3,
                    "lora": {"rank": 4, "alpha": 8.0}},
    # densities from declared links (the gRPC client declares what the simulator emulates): 7.5 kB each way
    "flasc-bandwidth": {"name": "flasc", "density_policy": "deadline", "link_rates": "declared",
                        "min_density": 0.001, "transfer_fraction": 0.0005, "lora": {"rank": 4, "alpha": 8.0}},
}
SERVER_EXTRAS = {"flasc-bandwidth": {"simulated_uplink_mbps": [2.0], "simulated_downlink_mbps": [4.0]},
                 "flasc-int4": {"value_type": "int4_block", "rounding": "stochastic",
                                "download_value_type": "int8_block"}}


def method_run(name: str, server: dict | None = None, data: dict | None = None, **extra):
    # 3 devices, 2 per round: sampling matters, and a sum of two terms is exact in any arrival order.
    raw = tiny_raw(server={"rounds": 2, "devices_per_round": 2, "min_registered": 3, "heartbeat_s": 1.0,
                           **SERVER_EXTRAS.get(name, {}), **(server or {})},
                   data={"num_devices": 3, "max_examples_per_device": 16, "test_max_examples": 16, **(data or {})},
                   method={"name": name, **METHOD_CONFIGS[name]}, **extra)
    raw["train"]["precision"] = "fp32"  # bit-identity is asserted in fp32, whatever `auto` picks on this CPU
    raw["method"] = {"name": name, **METHOD_CONFIGS[name]}  # replace, not merge, conftest's lora table
    return load_config(raw)


def grpc_run(run, run_dir, **client_options):
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.server.app import run_server

    cfg = run.server  # the links the simulator emulates, declared (one rate for the one client's devices)
    assert len(cfg.simulated_uplink_mbps) <= 1 and len(cfg.simulated_downlink_mbps) <= 1
    with run_server(run, run_dir) as (coord, port):
        client = EdgeClient(ClientOptions(server=f"127.0.0.1:{port}", device_ids=["0", "1", "2"], progress=False,
                                          give_up_s=30.0,
                                          declared_uplink_mbps=sum(cfg.simulated_uplink_mbps),
                                          declared_downlink_mbps=sum(cfg.simulated_downlink_mbps), **client_options))
        t = threading.Thread(target=client.run, daemon=True)
        t.start()
        try:
            coord.run_rounds()
        finally:
            t.join(timeout=30)
            client.close()


def _records(run_dir):
    import json

    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_simulator_matches_grpc_bit_for_bit(name, tmp_path):
    _assert_bit_identical(method_run(name), name, tmp_path)


@pytest.mark.parametrize("aggregator", [
    {"name": "fedadam", "lr": 0.01}, {"name": "fedavg", "clip_norm": 0.05}, {"name": "median"},
    {"name": "trimmed-mean", "beta": 0.25}, {"name": "dp-fedavg", "clip_norm": 0.05, "noise_multiplier": 0.5}])
def test_every_aggregator_matches_grpc_bit_for_bit(aggregator, tmp_path):
    """3 devices, all 3 a round, so the robust aggregators' order statistics have something to do."""
    run = method_run("lora", server={"devices_per_round": 3}, aggregator=aggregator)
    _assert_bit_identical(run, "lora", tmp_path)
    if aggregator["name"] == "dp-fedavg":
        eps = [r["epsilon"] for r in _records(tmp_path / "sim")]
        assert 0 < eps[0] < eps[1]  # privacy spent grows every round


def _assert_bit_identical(run, name, tmp_path):
    grpc_run(run, tmp_path / "grpc")
    simulate(run, tmp_path / "sim", progress=False)
    a, b = load_state(tmp_path / "grpc"), load_state(tmp_path / "sim")
    assert a.round == b.round == 2 and a.finished and b.finished
    assert a.stage == b.stage and a.stage_start == b.stage_start
    if name in ("slora", "flora"):
        assert a.stage.name == "LORA" and a.stage_start == 2
    assert set(a.params) == set(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.opt_state:
        np.testing.assert_array_equal(a.opt_state[k], b.opt_state[k], err_msg=k)
    ra, rb = _records(tmp_path / "grpc"), _records(tmp_path / "sim")
    assert [r["stage"] for r in ra] == [r["stage"] for r in rb]
    for x, y in zip(ra, rb):
        assert sorted(d["device_id"] for d in x["devices"]) == sorted(d["device_id"] for d in y["devices"])
        # every device reports its process's peak memory (the simulator's and the one client's: this process),
        # but in a secure round, which sends nothing computed on the data but its masked vector
        peaks = {d["peak_rss_mb"] > 100 for d in x["devices"] + y["devices"] if d["status"] == "completed"}
        assert peaks <= {not run.secure.enabled}, peaks  # (a causal LM's row 0, the base's scores, has none)
        assert (x["bytes_down"], x["bytes_up"]) == (y["bytes_down"], y["bytes_up"]), x["round"]
        assert x["accuracy"] == y["accuracy"] and x["epsilon"] == y["epsilon"]


@pytest.mark.parametrize("client_tier", [None, 0])
def test_tiers_over_grpc_every_payload_holds_its_devices_density(client_tier, tmp_path):
    """Saved downloads and uploads of a real gRPC run: device d's hold exactly ceil(density x N) entries at
    its tier's densities, the server's assignment (d mod 3) or, when the client says --tier 0, tier 0."""
    import math

    from edgelora import codec

    run = method_run("flasc-tiers", server={"rounds": 1, "devices_per_round": 3, "min_registered": 3,
                                            "save_updates": True})
    grpc_run(run, tmp_path / "run", tier=client_tier)
    n = sum(v.size for v in load_state(tmp_path / "run").params.values())
    saved = tmp_path / "run" / "updates" / "round_0001"
    nnz = lambda path: sum(len(x.indices) for x in codec.decode_bundle(path.read_bytes()).values())
    for d in range(3):
        tier = d % 3 if client_tier is None else client_tier
        scale = 4 ** (2 - tier)
        assert nnz(saved / f"device_{d}.elb") == math.ceil(0.4 / scale * n), d
        down = saved / ("download.elb" if client_tier is not None else f"download_{d}.elb")
        assert nnz(down) == math.ceil(0.5 / scale * n), d


def test_a_tier_the_run_does_not_plan_for_is_refused_at_registration(tmp_path):
    from edgelora.configtools import ConfigError
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.server.app import run_server

    run = method_run("flasc-tiers", server={"rounds": 1})
    with run_server(run, tmp_path / "run") as (coord, port):
        client = EdgeClient(ClientOptions(server=f"127.0.0.1:{port}", device_ids=["0"], progress=False,
                                          give_up_s=10.0, tier=3))
        try:
            with pytest.raises(ConfigError, match=r"device 0: the server refused it: device 0 gives tier 3, but "
                                                  r"this run plans for 3 tier\(s\): 0..2 \(method.tiers\)"):
                client.run()
        finally:
            client.close()
        assert "0" not in coord.registry


def test_simulated_links_deadline_policy_fits_every_upload_into_its_budget(tmp_path):
    """Emulated uplinks of 1 and 8 Mbit/s (devices 0, 2 and 1): with measured rates, round 2 plans each device
    from its round-1 upload, so every upload takes about the budget (transfer_fraction x deadline / 2) however
    slow its link: the 8 Mbit/s device sends about 8x the bytes of a 1 Mbit/s one."""
    run = method_run("flasc-bandwidth", server={"devices_per_round": 3, "simulated_uplink_mbps": [1.0, 8.0],
                                                "simulated_downlink_mbps": [50.0], "round_deadline_s": 80.0})
    import dataclasses
    m = run.method  # measured rates; rank 32, so that 8 Mbit/s still needs a top-k (~35 k entries)
    run = run.replace(method=dataclasses.replace(m, link_rates="measured",
                                                 lora=dataclasses.replace(m.lora, rank=32, alpha=32.0)))
    simulate(run, tmp_path, progress=False)
    budget = run.method.transfer_fraction * 80.0 / 2
    second = {d["device_id"]: d for d in _records(tmp_path)[1]["devices"]}
    for d in second.values():
        assert d["status"] == "completed" and 0.75 * budget < d["upload_s"] < 1.1 * budget, d
    assert 6 < second["1"]["bytes_up"] / second["0"]["bytes_up"] < 10


def test_simulator_resume_continues_exactly_across_the_slora_switch(tmp_path):
    run = method_run("slora")
    simulate(run, tmp_path / "straight", progress=False)
    one = run.replace(server=type(run.server)(**{**run.server.__dict__, "rounds": 1}))
    simulate(one, tmp_path / "resumed", progress=False)
    mid = load_state(tmp_path / "resumed")
    assert mid.round == 1 and mid.stage.name == "LORA"  # the switch is in the saved state
    simulate(run, tmp_path / "resumed", resume=True, progress=False)
    a, b = load_state(tmp_path / "straight"), load_state(tmp_path / "resumed")
    assert a.round == b.round == 2
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    recs = _records(tmp_path / "resumed")
    assert [r["stage"] for r in recs] == ["sparse", "lora"]
    # the switch round reports Stage 1's model too (before priming replaced it); other rounds do not
    assert 0 <= recs[0]["accuracy_before_switch"] <= 1 and recs[0]["loss_before_switch"] > 0
    assert recs[1]["accuracy_before_switch"] is None


def _flasc_resumed(tmp_path, run, straight_dir, resumed_dir, at=1):
    """A FLASC run with error feedback straight, and stopped after round `at` then resumed: the same run."""
    simulate(run, straight_dir, progress=False)
    part = run.replace(server=type(run.server)(**{**run.server.__dict__, "rounds": at}))
    simulate(part, resumed_dir, progress=False)
    # one file a device that has a residual, of the round it last changed in (here: every device trained)
    files = sorted(p.name for p in (resumed_dir / "residuals").iterdir())
    assert files and all(f.endswith(f".{at:06d}.elb") for f in files)
    simulate(run, resumed_dir, resume=True, progress=False)
    a, b = load_state(straight_dir), load_state(resumed_dir)
    assert a.round == b.round == run.server.rounds
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert [r["bytes_up"] for r in _records(straight_dir)] == [r["bytes_up"] for r in _records(resumed_dir)]


def test_a_resumed_simulation_keeps_the_devices_error_feedback_residuals(tmp_path):
    """The devices' residuals are checkpointed with the state (RUN_DIR/residuals/DEVICE.N.elb): a FLASC run with
    error feedback stopped and resumed (or a sweep run extended) ends where the straight run ends. Without them
    the resumed run's uploads differ from the next round on."""
    run = method_run("flasc", server={"rounds": 3})  # error_feedback = true
    _flasc_resumed(tmp_path, run, tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("name", [n for n in METHOD_CONFIGS if n != "flasc-int4"])  # flasc.toml carries int4
def test_cli_simulates_every_example(name, tmp_path, monkeypatch):
    from edgelora.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = main(["simulate", "--config", str(REPO / "examples" / f"{name}.toml"), "--model", "tiny-bert",
               "--rounds", "2", "--devices", "6", "--per-round", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    recs = _records(out)
    assert [r["round"] for r in recs] == [1, 2] and all(r["completed"] == 3 for r in recs)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in recs)
    assert load_state(out).finished


def test_tensorboard_logs_every_round_beside_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    simulate(load_config(tiny_raw()), out, progress=False, tensorboard=True)
    recs = _records(out)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"accuracy", "loss/test", "loss/train", "MB/down", "MB/up", "seconds/round", "seconds/train"} <= tags
    acc = [(e.step, e.value) for e in events.Scalars("accuracy")]
    assert acc == [(r["round"], pytest.approx(r["accuracy"])) for r in recs] and len(acc) == 2
    assert [e.value for e in events.Scalars("MB/up")] == [pytest.approx(r["bytes_up"] / 1e6) for r in recs]


def test_residual_files_are_written_per_changed_device_and_survive_a_crash_at_any_point(tmp_path):
    """Only a round's accepted devices write their residual; a device's older file goes once the round's state
    has landed; a file past the saved state (a round that never landed) is ignored and removed on resume."""
    from types import SimpleNamespace as NS

    from edgelora.simulation.simulator import SimulatedDevices

    class Runner:
        def __init__(self):
            self.held = {}

        def residuals(self, devices=None):
            return {d: self.held[d] for d in (devices or self.held) if d in self.held}

        def restore(self, residuals):
            self.held = dict(residuals)

    run = method_run("flasc")
    runner = Runner()
    devices = SimulatedDevices(run, tmp_path, runner)
    r1 = NS(done=frozenset({"0", "1"}))
    runner.held = {"0": {"w": np.full(3, 1.0, np.float32)}, "1": {"w": np.full(3, 2.0, np.float32)}}
    devices.checkpoint(None, r1, NS(round=1))
    devices.round_closed(NS(state=NS(round=0)), r1, NS(round=1))
    runner.held["1"] = {"w": np.full(3, 5.0, np.float32)}  # round 2: only device 1 trains
    r2 = NS(done=frozenset({"1"}))
    devices.checkpoint(None, r2, NS(round=2))
    # a crash here, before round 2's state landed: the resume at round 1 sees round 1's residuals
    names = sorted(p.name for p in (tmp_path / "residuals").iterdir())
    assert names == ["0.000001.elb", "1.000001.elb", "1.000002.elb"]
    fresh = Runner()
    SimulatedDevices(run, tmp_path, fresh).load_residuals(1)
    assert fresh.held["1"]["w"].tolist() == [2.0] * 3 and fresh.held["0"]["w"].tolist() == [1.0] * 3
    assert sorted(p.name for p in (tmp_path / "residuals").iterdir()) == ["0.000001.elb", "1.000001.elb"]
    # the same round again, landing this time: device 1's round-1 file is superseded, device 0's stays
    devices.checkpoint(None, r2, NS(round=2))
    devices.round_closed(NS(state=NS(round=1)), r2, NS(round=2))
    assert sorted(p.name for p in (tmp_path / "residuals").iterdir()) == ["0.000001.elb", "1.000002.elb"]
    fresh = Runner()
    SimulatedDevices(run, tmp_path, fresh).load_residuals(2)
    assert fresh.held["1"]["w"].tolist() == [5.0] * 3 and fresh.held["0"]["w"].tolist() == [1.0] * 3
