"""`edgelora evaluate`: a run folder's model scored again on its held-out split. At the run's own cap it must
reproduce the accuracy the run recorded (the same weights on the same examples), for a simulator run and a
centralized one; a larger cap scores more examples; a folder that is not a run is one clear error."""
from __future__ import annotations

import json
import subprocess

import pytest

from edgelora.configtools import ConfigError
from edgelora.experiments.centralized import train_centralized
from edgelora.experiments.evaluate import evaluate_run
from edgelora.simulation.simulator import simulate

from .conftest import REPO, cli


@pytest.mark.parametrize("method", [{"name": "lora", "lora": {"rank": 4, "alpha": 8.0}},
                                    {"name": "slora", "density": 0.1, "stage1_rounds": 1,
                                     "lora": {"rank": 4, "alpha": 4.0}},
                                    {"name": "flasc", "download_density": 0.25, "upload_density": 0.25,
                                     "lora": {"rank": 4, "alpha": 4.0}}])
def test_simulated_run_reproduces_its_recorded_accuracy(tiny_config, tmp_path, method):
    run = tiny_config(train={"precision": "fp32"}, method=method)
    simulate(run, tmp_path, progress=False)
    recorded = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"]
    row = evaluate_run(tmp_path)
    assert row["rounds"] == 2 and row["examples"] == 32
    assert row["accuracy"] == pytest.approx(recorded, abs=1e-9) and row["recorded_accuracy"] == recorded
    more = evaluate_run(tmp_path, max_examples=64)
    assert more["examples"] == 64


def test_centralized_run_is_scored_from_its_saved_adapter(tiny_config, tmp_path):
    run = tiny_config(train={"precision": "auto"}, server={"rounds": 1})  # auto: resolved for the device
    recs = train_centralized(run, tmp_path)
    row = evaluate_run(tmp_path)
    assert row["rounds"] == 1 and row["accuracy"] == pytest.approx(recs[-1]["accuracy"], abs=1e-9)


def test_cli_evaluate_table_json_and_errors(tiny_config, tmp_path):
    run = tiny_config(train={"precision": "fp32"}, server={"rounds": 1})
    simulate(run, tmp_path / "run", progress=False)
    out = subprocess.run(cli("evaluate", str(tmp_path / "run"), "--max-examples", "40", "--json",
                             str(tmp_path / "rows.json"), "--quiet"), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["examples"] for r in rows] == [40] and "run " in out.stdout and " 40 " in out.stdout
    with pytest.raises(ConfigError, match="not a run folder"):
        evaluate_run(tmp_path)
    bad = subprocess.run(cli("evaluate", str(tmp_path)), cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr and "Traceback" not in bad.stderr
