"""The Ray backend (edgelora.simulation.ray_devices): a simulation whose devices train in Ray actors ends bit for bit
where the sequential simulator ends (LoRA, SLoRA across its switch, FLASC with error feedback and resumed, secure
aggregation; over-selection), and so where gRPC ends, since test_simulate holds the sequential simulator to gRPC
on the same configs; a killed worker costs its devices one round and nothing else; a sweep's runs as Ray tasks
end where the sequential sweep's end."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from edgelora.config import SimulateConfig, load_config
from edgelora.server.checkpoint import load_state
from edgelora.simulation.simulator import Simulator, simulate

from .conftest import tiny_raw
from .test_secure_rounds import AGGREGATE_TOPK, SECURE
from .test_simulate import method_run

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one local Ray at a time


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (RayDevices joins it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """CPU GEMMs split their reductions by thread, so a training at 1 thread and at 2 differ in the last bits
    (SLoRA's sparse stage: ~5e-7): runs are bit-identical at equal torch threads per training, and the actors
    here train at 1 (device_cpus = 1), so the in-process runs do too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _on_ray(run, workers=2):
    return run.replace(simulate=SimulateConfig(backend="ray", workers=workers, device_cpus=1.0))


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a_dir, b_dir):
    a, b = load_state(a_dir), load_state(b_dir)
    assert (a.round, a.stage, a.stage_start, a.finished) == (b.round, b.stage, b.stage_start, b.finished)
    assert set(a.params) == set(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    for k in a.opt_state:
        np.testing.assert_array_equal(a.opt_state[k], b.opt_state[k], err_msg=k)
    for x, y in zip(_rows(a_dir), _rows(b_dir), strict=True):
        assert [(d["device_id"], d["status"]) for d in x["devices"]] == [(d["device_id"], d["status"]) for d in y["devices"]]
        assert (x["bytes_down"], x["bytes_up"], x["accuracy"]) == (y["bytes_down"], y["bytes_up"], y["accuracy"])


# Each case is test_simulate's config (method_run, 2 rounds), whose sequential run that module holds to a gRPC run
# bit for bit: a Ray run equal to the sequential one is equal to gRPC's, and only the Ray leg runs here.
CASES = {
    "lora": ("lora", {}),
    "slora-across-the-switch": ("slora", {}),  # stage1_rounds = 1: round 2 is LoRA from the SVD start
    # 3 sampled, the round closes at the 2nd accepted update: the 3rd trained on Ray, and is late (gRPC's
    # over-selection, which takes the first K to arrive, is test_server_grpc's)
    "over-selection": ("lora", {"devices_per_round": 2, "over_selection": 0.5, "min_registered": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_ray_run_ends_bit_identical_to_the_sequential_simulator(case, tmp_path, local_ray, one_thread):
    name, server = CASES[case]
    run = method_run(name, server=server)
    simulate(run, tmp_path / "seq", progress=False)
    simulate(_on_ray(run), tmp_path / "ray", progress=False)
    _assert_same(tmp_path / "seq", tmp_path / "ray")
    if case == "over-selection":
        statuses = [sorted(d["status"] for d in r["devices"]) for r in _rows(tmp_path / "ray")]
        assert statuses == [["completed", "completed", "late"]] * 2


def test_a_flasc_run_with_error_feedback_on_ray_keeps_each_device_on_its_actor_and_resumes_exactly(
        tmp_path, local_ray, one_thread):
    """FLASC with error feedback (test_simulate's config, 3 rounds): each device trains on the actor that holds
    its residual, always; the run ends where the sequential simulator ends, bit for bit; and a Ray run stopped
    after round 1 and resumed gives the actors their devices' residuals back and ends there too."""
    run = method_run("flasc", server={"rounds": 3})  # error_feedback = true
    simulate(run, tmp_path / "seq", progress=False)
    sim = Simulator(_on_ray(run), tmp_path / "ray", progress=False)
    seen: dict[str, set[int]] = {}
    try:
        while not sim.state.finished:
            sim.run_one_round()
            for d, a in sim.runner.placed.items():
                seen.setdefault(d, set()).add(a)
    finally:
        sim.runner.close()
    assert seen and all(len(a) == 1 for a in seen.values()), seen
    assert sim.runner.home == {d: next(iter(a)) for d, a in seen.items()}
    _assert_same(tmp_path / "seq", tmp_path / "ray")
    part = run.replace(server=type(run.server)(**{**run.server.__dict__, "rounds": 1}))
    simulate(_on_ray(part), tmp_path / "resumed", progress=False)
    assert all(f.name.endswith(".000001.elb") for f in (tmp_path / "resumed" / "residuals").iterdir())
    simulate(_on_ray(run), tmp_path / "resumed", resume=True, progress=False)
    _assert_same(tmp_path / "seq", tmp_path / "resumed")


def test_a_secure_flasc_run_on_ray_ends_bit_identical_to_the_sequential_simulator(tmp_path, local_ray, one_thread):
    """Secure aggregation on Ray: 4 devices a round, 2 + 2 on the two actors, each device's keys made on the
    actor that then trains it (placed before the key phases). Every device completes both rounds, both sums
    are unmasked, and the run ends where the sequential simulator's ends, bit for bit. FLASC (error feedback
    on) takes its coordinates from the last aggregate, which the coordinator sends with each task."""
    run = method_run("flasc", server={"rounds": 2, "devices_per_round": 4, "min_registered": 4},
                     data={"num_devices": 4}, secure={**SECURE, **AGGREGATE_TOPK})
    simulate(run, tmp_path / "seq", progress=False)
    simulate(_on_ray(run), tmp_path / "ray", progress=False)
    _assert_same(tmp_path / "seq", tmp_path / "ray")
    rows = _rows(tmp_path / "ray")
    assert [r["aggregated"] for r in rows] == [True, True]
    assert [sorted((d["device_id"], d["status"]) for d in r["devices"]) for r in rows] == \
        [[(d, "completed") for d in "0123"]] * 2


def test_a_secure_round_abandoned_and_drawn_again_on_ray_places_its_new_devices(tmp_path, local_ray, one_thread,
                                                                                 monkeypatch):
    """Secure LoRA on Ray, 4 of 5 devices a round. Round 1's first try is abandoned at the close of its advertise
    phase (the coordinator is made to abort it once); the try again keeps the round's number but draws other
    devices. On Ray those devices' keys must be made on the actors that will train them, as for any round: the
    run completes both rounds, every device of each unmasked, and ends where the sequential simulator ends, bit
    for bit."""
    from edgelora.server.secagg import RoundAborted, SecAggServer

    close_advertise, tries = SecAggServer.close_advertise, []

    def first_try_aborts(self):
        tries.append(self.setup().round)
        if len(tries) in (1, 4):  # the first try of round 1 in each of the two runs (tries: 1, 1, 2 each)
            self.phase = "done"
            raise RoundAborted(f"round {self.setup().round}: the test abandons its first try")
        close_advertise(self)

    monkeypatch.setattr(SecAggServer, "close_advertise", first_try_aborts)
    run = method_run("lora", server={"rounds": 2, "devices_per_round": 4, "min_registered": 4},
                     data={"num_devices": 5}, secure=SECURE)
    simulate(run, tmp_path / "seq", progress=False)
    simulate(_on_ray(run), tmp_path / "ray", progress=False)
    assert tries == [1, 1, 2] * 2
    _assert_same(tmp_path / "seq", tmp_path / "ray")
    abandoned = json.loads((tmp_path / "ray" / "abandoned.jsonl").read_text())
    rows = _rows(tmp_path / "ray")
    first, again = {d["device_id"] for d in abandoned["devices"]}, {d["device_id"] for d in rows[0]["devices"]}
    assert rows[0]["round"] == abandoned["round"] == 1 and again - first, (first, again)
    assert [r["aggregated"] for r in rows] == [True, True]
    assert all(d["status"] == "completed" for r in rows for d in r["devices"]) and len(rows[1]["devices"]) == 4


def test_a_round_spreads_evenly_over_the_actors_and_a_device_with_state_stays_on_its_actor():
    from edgelora.simulation.ray_devices import place

    # sampled order, each to the least loaded actor: 4 devices on 2 actors are 2 + 2, whatever their ids
    assert place(["5", "7", "9", "11"], {}, 2) == {"5": 0, "7": 1, "9": 0, "11": 1}
    assert place(["3", "1"], {}, 3) == {"3": 0, "1": 1}
    # a device whose actor holds its state goes there, and the others fill around it
    assert place(["5", "7", "9", "11"], {"7": 0, "11": 0}, 2) == {"5": 1, "7": 0, "9": 1, "11": 0}
    assert place(["5", "7", "9"], {"7": 1}, 2) == {"5": 0, "7": 1, "9": 0}
    # by examples (LPT): 100 + 10 against 60 + 50, where counting devices gave a + c = 150 against b + d = 70
    assert place(["a", "b", "c", "d"], {}, 2, {"a": 100, "b": 60, "c": 50, "d": 10}) == \
        {"a": 0, "b": 1, "c": 1, "d": 0}
    assert place(["a", "b", "c"], {"c": 0}, 2, {"a": 5, "b": 5, "c": 30}) == {"a": 1, "b": 1, "c": 0}


def test_a_killed_worker_drops_its_devices_for_one_round_and_the_run_goes_on(tmp_path, local_ray):
    """Worker 1 is killed between rounds 1 and 2: in round 2 the devices placed on it (two of the four, the
    round spread evenly) are dropped with the reason, the round aggregates the others (no update lost or
    counted twice), a new actor takes over and round 3 is whole again."""
    raw = tiny_raw(server={"rounds": 3, "devices_per_round": 4, "min_devices": 1},
                   data={"num_devices": 4, "max_examples_per_device": 16, "test_max_examples": 16})
    raw["train"]["precision"] = "fp32"
    run = _on_ray(load_config(raw))
    sim = Simulator(run, tmp_path / "run", progress=False)
    sim.run_one_round()
    os.kill(sim.runner.actor_pids()[1], signal.SIGKILL)
    before = sim.state.params
    sim.run_one_round()
    row = _rows(tmp_path / "run")[-1]
    status = {d["device_id"]: (d["status"], d["error"]) for d in row["devices"]}
    on_1 = sorted(d for d, a in sim.runner.placed.items() if a == 1)
    assert len(on_1) == 2 and sorted(sim.runner.placed) == ["0", "1", "2", "3"]
    for d in status:
        if d in on_1:
            assert status[d][0] == "dropped" and "Ray worker died" in status[d][1], d
        else:
            assert status[d] == ("completed", ""), d
    assert row["completed"] == 2 and row["aggregated"] and sim.state.round == 2
    assert any(not np.array_equal(before[k], sim.state.params[k]) for k in before)
    sim.run_rounds()
    assert [r["completed"] for r in _rows(tmp_path / "run")] == [4, 2, 4] and sim.state.finished


def test_a_sweep_on_ray_runs_its_grid_as_tasks_and_ends_where_the_sequential_sweep_ends(tmp_path, local_ray,
                                                                                          one_thread):
    """Every run of the grid (federated and centralized) as a Ray task of 1 CPU: the same run folders, rows,
    bytes and final weights as the sequential sweep; run again, every run is already done."""
    from edgelora.experiments.sweep import load_sweep, run_sweep

    from .test_sweep import write_sweep

    sweep = load_sweep(write_sweep(tmp_path / "cfg", rounds=2))
    seq = run_sweep(sweep, tmp_path / "seq", progress=False)
    on_ray = run_sweep(sweep, tmp_path / "ray", progress=False, backend="ray", run_cpus=1.0)
    assert set(seq.values()) == set(on_ray.values()) == {"finished"} and set(seq) == set(on_ray)
    for name in seq:
        a, b = tmp_path / "seq" / "runs" / name, tmp_path / "ray" / "runs" / name
        ra, rb = _rows(a), _rows(b)
        assert [(r["round"], r["bytes_up"], r["bytes_down"], r["accuracy"], r["loss"]) for r in ra] == \
            [(r["round"], r["bytes_up"], r["bytes_down"], r["accuracy"], r["loss"]) for r in rb], name
        if (a / "state").exists():
            _assert_same(a, b)
    assert set(run_sweep(sweep, tmp_path / "ray", progress=False, backend="ray").values()) == {"skipped"}
