"""edgelora sweep: the grid it plans, its refusals, and a sweep stopped by Ctrl-C (SIGINT) mid-run that,
run again, ends exactly where an uninterrupted sweep ends: same metrics, same bytes, same final weights.
Plus the centralized ceiling's example budget and the report's files."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgelora.configtools import ConfigError
from edgelora.experiments.sweep import load_sweep, rounds_done, run_sweep
from edgelora.server.checkpoint import load_state

from .conftest import REPO, TINY, cli, cli_ctrl_c_after_round, sigint_default, tiny_raw

SWEEP = """
[sweep]
name = "t"
base = "base.toml"
seeds = [0]
[sweep.set]
"server.rounds" = {rounds}
"train.precision" = "fp32"
[methods.lora]
"method.name" = "lora"
"method.lora" = {{ rank = 4, alpha = 8.0 }}
[methods.fft]
"method.name" = "fft"
"train.lr" = 1e-4
[methods.lora-central]
mode = "centralized"
"method.name" = "lora"
"method.lora" = {{ rank = 4, alpha = 8.0 }}
[partitions.iid]
"data.partition" = "iid"
[partitions.dir]
"data.partition" = "dirichlet"
"data.alpha" = 0.5
[[grid]]
methods = ["lora", "fft"]
partitions = ["iid"]
[[grid]]
methods = ["lora"]
partitions = ["dir"]
seeds = [0, 3]
"""


def write_sweep(folder: Path, rounds: int = 3, text: str = SWEEP) -> Path:
    import tomli_w

    base = {k: dict(v) for k, v in TINY.items()}
    base["data"] = {**base["data"], "num_devices": 4, "max_examples_per_device": 12, "test_max_examples": 16}
    base["server"] = {**base["server"], "devices_per_round": 2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(tomli_w.dumps(base))
    path = folder / "sweep.toml"
    path.write_text(text.format(rounds=rounds))
    return path


def test_grid_is_the_union_of_blocks_with_seeds_and_overrides(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    assert [r.name for r in sweep.runs] == ["lora-iid-s0", "fft-iid-s0", "lora-dir-s0", "lora-dir-s3"]
    run = {r.name: r for r in sweep.runs}["lora-dir-s3"].config()
    assert (run.server.seed, run.data.seed, run.model.head_seed) == (3, 3, 3)
    assert (run.data.partition, run.data.alpha, run.server.rounds) == ("dirichlet", 0.5, 3)
    assert run.method.name == "lora" and run.method.lora.rank == 4
    fft = {r.name: r for r in sweep.runs}["fft-iid-s0"].config()
    assert fft.method.name == "fft" and fft.train.lr == 1e-4  # the base's [method] table was replaced


def test_sweep_set_method_keys_reach_every_method_that_names_itself(tmp_path):
    """A [sweep.set] "method.lora" applies to every run, also where a method block sets "method.name" (which
    once wiped it silently: a secure sweep's FLASC ran at the default rank 16 instead of the rank 10 asked)."""
    text = SWEEP.replace('"train.precision" = "fp32"', '"train.precision" = "fp32"\n"method.lora" = {{ rank = 6, alpha = 6.0 }}')
    text = text.replace('[methods.fft]', '[methods.flasc]\n"method.name" = "flasc"\n[methods.fft]')
    text = text.replace('methods = ["lora", "fft"]', 'methods = ["lora", "flasc"]')
    runs = {r.name: r.config() for r in load_sweep(write_sweep(tmp_path, text=text)).runs}
    assert runs["flasc-iid-s0"].method.name == "flasc" and runs["flasc-iid-s0"].method.lora.rank == 6
    assert runs["lora-iid-s0"].method.lora.rank == 4  # a method block's own key still wins


@pytest.mark.parametrize("edit, message", [
    (('methods = ["lora"]\npartitions = ["dir"]', 'methods = ["lorax"]\npartitions = ["dir"]'), "grid[1].methods: 'lorax'"),
    (('"data.alpha" = 0.5', '"data.alpha" = -1.0'), "run lora-dir-s0: data.alpha: must be > 0"),
    (('base = "base.toml"', 'base = "nope.toml"'), "sweep.base:"),
    (('[partitions.iid]', '[partition.iid]'), "unknown section(s) ['partition']"),
    (('seeds = [0, 3]', 'seeds = [0, -3]'), "grid[1].seeds: -3"),
])
def test_bad_sweep_files_name_what_is_wrong(tmp_path, edit, message):
    path = write_sweep(tmp_path)
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert message in str(e.value)


def _final_params(out: Path, name: str) -> dict:
    return load_state(out / "runs" / name).params


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_same_results(tmp_path):
    path = write_sweep(tmp_path / "cfg", rounds=3)
    ref = tmp_path / "ref"
    assert set(run_sweep(load_sweep(path), ref, progress=False).values()) == {"finished"}

    out = tmp_path / "cut"
    proc = subprocess.run(cli_ctrl_c_after_round(1, "sweep", "--config", str(path), "--out", str(out), "--quiet"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=sigint_default, timeout=240)
    first = out / "runs" / "lora-iid-s0"
    assert proc.returncode == 130, proc.stdout
    assert "interrupted" in proc.stdout and "Traceback" not in proc.stdout
    assert rounds_done(first) == 1, "Ctrl-C came right after the first round"
    assert not (out / "runs" / "lora-dir-s3" / "metrics.jsonl").exists()

    status = run_sweep(load_sweep(path), out, progress=False)
    assert status["lora-iid-s0"] == "finished" and status["lora-dir-s3"] == "finished"
    assert set(run_sweep(load_sweep(path), out, progress=False).values()) == {"skipped"}

    for spec in load_sweep(path).runs:
        a, b = _records(ref, spec.name), _records(out, spec.name)
        assert [r["round"] for r in b] == [1, 2, 3], spec.name
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "train_loss"):
            assert [r[key] for r in a] == [r[key] for r in b], (spec.name, key)
        pa, pb = _final_params(ref, spec.name), _final_params(out, spec.name)
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{spec.name} {k}")


EXTEND = SWEEP[:SWEEP.index("[[grid]]")] + """[[grid]]
methods = ["lora", "lora-central"]
partitions = ["iid"]
"""


@pytest.mark.slow
def test_a_sweep_asking_for_more_rounds_extends_its_finished_runs_exactly(tmp_path):
    from edgelora.config import load_config

    ref = tmp_path / "ref"
    run_sweep(load_sweep(write_sweep(tmp_path / "four", rounds=4, text=EXTEND)), ref, progress=False)
    out = tmp_path / "out"
    assert set(run_sweep(load_sweep(write_sweep(tmp_path / "two", rounds=2, text=EXTEND)), out,
                         progress=False).values()) == {"finished"}
    assert set(run_sweep(load_sweep(write_sweep(tmp_path / "four", rounds=4, text=EXTEND)), out,
                         progress=False).values()) == {"finished"}
    for name in ("lora-iid-s0", "lora-central-iid-s0"):
        a, b = _records(ref, name), _records(out, name)
        assert [r["round"] for r in b] == [1, 2, 3, 4], name
        for key in ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down"):
            assert [r[key] for r in a] == [r[key] for r in b], (name, key)
        pa, pb = _final_params(ref, name), _final_params(out, name)
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{name} {k}")
        assert load_config(out / "runs" / name / "config.toml").server.rounds == 4, "config.toml says the new count"
    # the shorter sweep, run again, neither shortens nor rewrites them
    assert set(run_sweep(load_sweep(write_sweep(tmp_path / "two", rounds=2, text=EXTEND)), out,
                         progress=False).values()) == {"skipped"}
    assert load_config(out / "runs" / "lora-iid-s0" / "config.toml").server.rounds == 4
    # a screen (sweep --rounds 2 --only lora-iid-s0) of the four-round file, then the full sweep: the same runs
    four, screen = load_sweep(tmp_path / "four" / "sweep.toml"), tmp_path / "screen"
    assert run_sweep(four, screen, progress=False, max_rounds=2, only=["lora-iid-s0"]) == {"lora-iid-s0": "finished"}
    assert rounds_done(screen / "runs" / "lora-iid-s0") == 2 and not (screen / "runs" / "lora-central-iid-s0").exists()
    assert run_sweep(four, screen, progress=False) == {"lora-iid-s0": "finished", "lora-central-iid-s0": "finished"}
    for key in ("accuracy", "bytes_up"):
        assert [r[key] for r in _records(ref, "lora-iid-s0")] == [r[key] for r in _records(screen, "lora-iid-s0")]
    with pytest.raises(ConfigError, match="--only: \\['nope'\\] are not runs"):
        from edgelora.experiments.sweep import main_sweep

        main_sweep(str(tmp_path / "four" / "sweep.toml"), str(screen), None, progress=False, only=["nope"])


def _records(out: Path, name: str) -> list[dict]:
    from edgelora.runlog import read_records

    return read_records(out / "runs" / name / "metrics.jsonl")


@pytest.mark.slow
def test_max_minutes_stops_between_rounds_and_report_summarises_what_finished(tmp_path):
    path = write_sweep(tmp_path / "cfg", rounds=2)
    out = tmp_path / "out"
    status = run_sweep(load_sweep(path), out, max_minutes=1e-6, progress=False)
    assert set(status.values()) == {"stopped"} and not (out / "runs").exists()
    run_sweep(load_sweep(path), out, progress=False, only=["lora-iid-s0", "fft-iid-s0"])
    rc = subprocess.run(cli("sweep", "--report", str(out)), cwd=REPO, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["run"] for r in rows] == ["lora-iid-s0", "fft-iid-s0"]
    assert list(rows[0]) == ["run", "method", "partition", "seed", "rounds_done", "final_accuracy",
                             "best_accuracy", "bytes_up", "bytes_down", "seconds"]
    metrics = _records(out, "fft-iid-s0")
    assert int(rows[1]["bytes_up"]) == sum(r["bytes_up"] for r in metrics)
    assert float(rows[1]["final_accuracy"]) == pytest.approx(metrics[-1]["accuracy"], abs=5e-5)
    assert (out / "accuracy_rounds.png").stat().st_size > 0 and (out / "accuracy_bytes.png").stat().st_size > 0
    assert "| lora | iid |" in (out / "summary.md").read_text()


def test_a_changed_run_config_is_refused_not_mixed(tmp_path):
    path = write_sweep(tmp_path / "cfg", rounds=2)
    out = tmp_path / "out"
    run_sweep(load_sweep(path), out, max_minutes=1e-6, progress=False)
    folder = out / "runs" / "lora-iid-s0"
    folder.mkdir(parents=True)
    other = load_sweep(path).runs[0].config()
    from edgelora.data import with_num_labels

    (folder / "config.toml").write_text(with_num_labels(other.replace(
        train=other.train.__class__(**{**other.train.__dict__, "lr": 0.5}))).to_toml())
    with pytest.raises(ConfigError, match="lora-iid-s0: .* holds another config"):
        run_sweep(load_sweep(path), out, progress=False)


def test_centralized_trains_the_federated_runs_example_budget_on_the_union(tmp_path, tiny_config):
    from edgelora.data import device_examples
    from edgelora.experiments.centralized import examples_seen_budget, train_centralized, union_of_partitions

    run = tiny_config(server={"rounds": 3, "devices_per_round": 2}, train={"precision": "fp32"},
                      data={"num_devices": 4, "max_examples_per_device": 10, "test_max_examples": 16})
    union = union_of_partitions(run)
    assert len(union) == 40 and union.texts[:10] == device_examples(run.data, 0).texts
    assert examples_seen_budget(run, len(union)) == 3 * 2 * 10  # rounds x K x mean partition size
    recs = train_centralized(run, tmp_path / "c")
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert all(r["stage"] == "central" and r["bytes_up"] == 0 and r["accuracy"] is not None for r in recs)
    assert (tmp_path / "c" / "adapter" / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="centralized: method 'slora' changes structure"):
        train_centralized(tiny_config(method={"name": "slora"}), tmp_path / "s")


@pytest.mark.parametrize("method, train", [
    ({"name": "lora"}, {"optimizer": "adamw", "lr_schedule": "cosine"}),
    ({"name": "fft"}, {"optimizer": "sgd", "momentum": 0.9, "lr": 1e-3}),
    ({"name": "sft", "density": 0.05}, {"optimizer": "adamw"}),
])
def test_centralized_run_stopped_between_rounds_continues_to_the_same_results(tmp_path, method, train):
    from edgelora.config import load_config
    from edgelora.experiments.centralized import train_centralized
    from edgelora.runlog import read_records

    raw = tiny_raw(server={"rounds": 4, "devices_per_round": 2}, train={"precision": "fp32", **train},
                   data={"num_devices": 4, "max_examples_per_device": 10, "test_max_examples": 16})
    run = load_config({**raw, "method": method})  # the method's table as a whole
    ref = train_centralized(run, tmp_path / "ref")
    cut = tmp_path / "cut"
    first = train_centralized(run, cut, stop=lambda: rounds_done(cut) >= 2)
    assert [r["round"] for r in first] == [1, 2] and load_state(cut).round == 2
    assert not (cut / "adapter").exists() and not (cut / "model").exists(), "no final model before the last round"
    rest = train_centralized(run, cut, resume=True)
    assert [r["round"] for r in rest] == [1, 2, 3, 4] and read_records(cut / "metrics.jsonl") == rest
    for key in ("accuracy", "loss", "train_loss"):
        assert [r[key] for r in ref] == [r[key] for r in rest], key
    a, b = load_state(tmp_path / "ref"), load_state(cut)
    assert a.finished and b.finished and a.opt_state.keys() == b.opt_state.keys() and a.opt_state
    for group in ("params", "opt_state"):
        for k, v in getattr(a, group).items():
            np.testing.assert_array_equal(v, getattr(b, group)[k], err_msg=f"{group} {k}")


def test_centralized_state_for_another_budget_is_refused(tmp_path, tiny_config):
    from edgelora.experiments.centralized import train_centralized

    data = {"num_devices": 4, "max_examples_per_device": 10, "test_max_examples": 16}
    train_centralized(tiny_config(server={"rounds": 1, "devices_per_round": 2}, data=data), tmp_path)
    with pytest.raises(ConfigError, match=r"another budget or structure \(20 examples a round, now 10\)"):
        train_centralized(tiny_config(server={"rounds": 2, "devices_per_round": 1}, data=data), tmp_path,
                          resume=True)


def test_report_of_centralized_runs_only_draws_no_bytes_plot(tmp_path):
    from edgelora.experiments.report import plot_accuracy_bytes

    central = {"run": "c", "method": "c", "partition": "iid", "seed": 0, "mode": "centralized",
               "records": [{"round": 1, "accuracy": 0.5, "bytes_up": 0, "bytes_down": 0}]}
    assert plot_accuracy_bytes([central], tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()


def test_report_orders_partitions_as_the_sweep_file_does_not_as_runs_finished(tmp_path):
    from edgelora.experiments.report import gap_table, in_partition_order, report_settings

    (tmp_path / "sweep.toml").write_text('[partitions.iid]\n[partitions.dir1]\n[partitions."dir0.1"]\n'
                                         '[report]\nfft = "fft"\n')
    settings = report_settings(tmp_path)
    assert settings["partition_order"] == ["iid", "dir1", "dir0.1"] and settings["fft"] == "fft"
    run = lambda m, p, acc: {"method": m, "partition": p, "final_accuracy": acc}
    rows = [run("fft", p, a) for p, a in (("dir0.1", 0.1), ("iid", 0.5), ("dir1", 0.4))]
    rows += [run("lora", p, a) for p, a in (("dir0.1", 0.05), ("iid", 0.45), ("dir1", 0.3))]
    gaps = gap_table(in_partition_order(rows, settings["partition_order"]), "fft", ["lora"])["lora"]
    assert list(gaps) == ["iid", "dir1", "dir0.1"]
    assert [round(v, 4) for v in gaps.values()] == [0.05, 0.1, 0.05]


def test_report_pairs_each_federated_run_with_its_ceiling_and_reads_whole_test_scores(tmp_path):
    import json

    from edgelora.experiments.report import write_report

    def run(name, method, mode, seed, accs, table):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        method_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
        (folder / "config.toml").write_text(f"[server]\nrounds = {len(accs)}\n[method]\n{method_toml}\n")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(
            {"round": i + 1, "accuracy": a, "bytes_up": 10, "bytes_down": 20, "seconds": 1.0}) + "\n"
            for i, a in enumerate(accs)))
        return {"run": name, "method": method, "partition": "iid", "seed": seed, "mode": mode}

    lora, fft = {"name": "lora", "rank": 4}, {"name": "fft"}
    plan = [run("c0", "lora-central", "centralized", 0, [0.3, 0.4, 0.5], lora),
            run("c1", "lora-central", "centralized", 1, [0.3, 0.4, 0.6], lora),
            run("f0", "lora", "federated", 0, [0.2, 0.3, 0.45], lora),
            run("f1", "lora", "federated", 1, [0.2, 0.3, 0.45], lora),
            run("fft0", "fft", "federated", 0, [0.2, 0.3, 0.4], fft)]  # no fft ceiling: no pair
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    scores = [{"run": "c0", "rounds": 3, "accuracy": 0.5}, {"run": "c1", "rounds": 3, "accuracy": 0.4},
              {"run": "f0", "rounds": 3, "accuracy": 0.45}, {"run": "f1", "rounds": 3, "accuracy": 0.38},
              {"run": "fft0", "rounds": 2, "accuracy": 0.9}]  # fft0 scored at round 2: stale, not shown
    (tmp_path / "full-test.json").write_text(json.dumps(scores))
    write_report(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "| f0 | c0 | 0.4500 | 0.5000 | 90.0 % | 0.3167 | 0.4000 | 79.2 % | 0.4500 | 0.5000 | 90.0 % |" in md
    assert "| f1 | c1 | 0.4500 | 0.6000 | 75.0 % |" in md and "| 0.3800 | 0.4000 | 95.0 % |" in md
    # the mean over seeds: (0.45 + 0.38) / 2 = 0.415 against (0.5 + 0.4) / 2 = 0.45 on the whole test split
    assert "| lora iid, mean of 2 seeds | lora-central | 0.4500 | 0.5500 | 81.8 % |" in md
    assert "| 0.4150 | 0.4500 | 92.2 % |" in md
    assert "| fft0 | fft | iid | 0 | 3 | 0.4000 | 0.3000 | 0.4000 |  | 0.0 |" in md
    assert not any(line.startswith("| fft0 | c") for line in md.splitlines())


def test_report_of_causal_lm_runs_leads_with_perplexity_lower_is_better(tmp_path):
    import json

    from edgelora.experiments.report import write_report

    def run(name, method, ppls, bytes_per_round):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "config.toml").write_text(f'[server]\nrounds = {len(ppls) - 1}\n[model]\ntask = "causal-lm"\n'
                                            '[method]\nname = "lora"\n')
        (folder / "metrics.jsonl").write_text("".join(json.dumps(
            {"round": i, "perplexity": p, "accuracy": 1 / p, "bytes_up": bytes_per_round * (i > 0),
             "bytes_down": bytes_per_round * (i > 0), "seconds": 1.0}) + "\n" for i, p in enumerate(ppls)))
        return {"run": name, "method": method, "partition": "roles", "seed": 0, "mode": "federated"}

    plan = [run("a", "lora-lr1e-3", [300.0, 100.0, 90.0, 80.0], 1_000_000),   # last 3: 90
            run("b", "lora-lr1e-2", [300.0, 200.0, 150.0, 120.0], 1_000_000),  # last 3: 156.7
            run("f", "flasc", [300.0, 95.0, 85.0, 70.0], 100_000)]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "sweep.toml").write_text('[partitions.roles]\n[report]\nreference = "lora-lr1e-3"\n')
    written = {p.name for p in write_report(tmp_path)}
    assert {"perplexity_rounds.png", "perplexity_bytes.png", "accuracy_bytes.png"} <= written
    md = (tmp_path / "summary.md").read_text()
    assert "| a | lora-lr1e-3 | roles | 0 | 3 | 80.0000 | 90.0000 | 80.0000 |" in md  # best = the lowest
    assert "| lora | 1e-3: 90.0000 *, 1e-2: 156.6667 |" in md  # the lower perplexity is chosen
    # the reference reaches its own last-3 score (90) at round 2 (4 MB); flasc reaches 90 at round 2 (0.4 MB)
    assert "| f | 90.0000 | 0.4 | 10.0x | 70.0000 |" in md and "| a | 90.0000 | 4.0 | 1.0x | 80.0000 |" in md
    assert (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")[5:7] == ["final_perplexity",
                                                                                     "best_perplexity"]
