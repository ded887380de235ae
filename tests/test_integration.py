"""Real processes: a server and two clients on localhost with tiny-bert."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edgelora import codec
from edgelora.launch import Client, Launcher, gone_after
from edgelora.server.checkpoint import load_state

from .conftest import cli, tiny_raw

pytestmark = pytest.mark.slow




@contextmanager
def launch(tmp_path: Path, raw: dict, port: int = 0) -> Iterator[Launcher]:
    """A server (plaintext, -v) for the run config `raw` in tmp_path/run, listening, its log tmp_path/server.log;
    every process the block starts is gone after it."""
    with Launcher(tmp_path / "run", verbose=True) as fleet:
        fleet.start_server(raw, port=port, args=["--insecure"], log=tmp_path / "server.log", timeout_s=120)
        yield fleet


def device(tmp_path: Path, name: str, *args: str, many: bool = False) -> Client:
    """A plaintext client process for device `name` (or, many=True, the devices of a range such as 0-1)."""
    return Client(**{"device_ids" if many else "device_id": name}, log=tmp_path / f"client_{name}.log",
                  args=["--insecure", "--quiet", "--give-up-s", "60", *args])


def run_own_data_devices(tmp_path: Path, fleet: Launcher, files: dict[str, Path]) -> None:
    """data.mode = own: a client process per named device, each with --data of its own file; waits for the
    server's run to finish and every client to exit cleanly."""
    fleet.start_clients(device(tmp_path, n, "--data", str(f)) for n, f in files.items())
    assert fleet.wait_server(300, clients_gone_s=gone_after({})) == 0, fleet.server_log_tail()
    assert fleet.wait_clients(60) == [0] * len(files)


def _dense(path: Path) -> dict[str, np.ndarray]:
    return {n: codec.to_dense(n, t) for n, t in codec.decode_bundle(path.read_bytes()).items()}


def test_two_clients_two_rounds_global_weights_are_the_weighted_mean(tmp_path):
    rng = np.random.default_rng(0)
    words = ["goal", "match", "vote", "senate", "cpu", "kernel", "bake", "recipe"]
    rows = [{"text": " ".join(rng.choice(words[2 * (i % 4):2 * (i % 4) + 2], 6)), "label": i % 4} for i in range(81)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_raw(server={"rounds": 2, "save_updates": True, "plots": True},
                   data={"dataset": "jsonl", "path": str(tmp_path / "d.jsonl"), "partition": "iid",
                         "max_examples_per_device": 0, "test_fraction": 0.25, "num_devices": 2},
                   train={"batch_size": 8})
    with launch(tmp_path, raw) as fleet:
        fleet.start_clients([device(tmp_path, "0"), device(tmp_path, "1")])
        assert fleet.wait_server(240, clients_gone_s=gone_after(raw)) == 0, fleet.server_log_tail()
        assert fleet.wait_clients(60) == [0, 0]
    run_dir = fleet.run_dir
    for log in ("server.log", "client_0.log", "client_1.log"):  # both built LoRA models, so imported bitsandbytes
        assert "kernels-community" not in (tmp_path / log).read_text(), log

    final = load_state(run_dir)
    assert final.round == 2 and final.finished
    weights = None
    for rnd in (1, 2):
        d = run_dir / "updates" / f"round_{rnd:04d}"
        start = _dense(d / "download.elb")
        if weights is not None:  # the round began from the previous round's aggregate
            for k in start:
                np.testing.assert_allclose(start[k], weights[k], atol=1e-6)
        n = {p.stem.split("_")[1]: int(p.read_text()) for p in d.glob("device_*.examples")}
        assert sorted(n) == ["0", "1"] and n["0"] != n["1"], "unequal example counts make the weighting visible"
        deltas = {dev: _dense(d / f"device_{dev}.elb") for dev in n}
        total = sum(n.values())
        # FedAvg of weights == start + example-weighted mean of the deltas, computed here from wire bytes
        weights = {k: start[k] + sum(n[dev] * deltas[dev][k].astype(np.float64) for dev in n) / total for k in start}
    for k, v in final.params.items():
        np.testing.assert_allclose(v, weights[k], rtol=0, atol=1e-6)

    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert r["sampled"] == 2 and r["completed"] == 2 and r["accuracy"] is not None
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["seconds"] > 0
        assert {d["device_id"] for d in r["devices"]} == {"0", "1"}
        # bytes up are the serialized protobuf messages: at least the codec payload the server kept
        for d in r["devices"]:
            size = (run_dir / "updates" / f"round_{r['round']:04d}" / f"device_{d['device_id']}.elb").stat().st_size
            assert size <= d["bytes_up"] <= size + 1024
    assert (run_dir / "accuracy.png").stat().st_size > 0
    from peft import PeftModel

    from edgelora.models import load_base_model

    model = PeftModel.from_pretrained(load_base_model("tiny-bert", 4, 0), str(run_dir / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # the class names, where Hugging Face pipelines look for them and in the run folder
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(str(run_dir / "adapter"))
    assert saved.id2label == {0: "0", 1: "1", 2: "2", 3: "3"} and saved.label2id["3"] == 3
    assert json.loads((run_dir / "labels.json").read_text()) == ["0", "1", "2", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_killed_mid_run_resumes_and_clients_reconnect(tmp_path):
    port = _free_port()
    raw = tiny_raw(server={"rounds": 3, "port": port})
    with launch(tmp_path, raw, port=port) as fleet:
        fleet.start_clients([device(tmp_path, "0-1", many=True)])  # both devices in one process
        metrics = fleet.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not metrics.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        fleet.server.kill()  # a crash, not a clean stop
        fleet.server.wait()
        fleet.start_server(resume=True, port=port, args=["--insecure"], log=tmp_path / "server2.log", timeout_s=120)
        assert fleet.wait_server(240, clients_gone_s=gone_after(raw)) == 0, fleet.server_log_tail()
        assert fleet.wait_clients(60) == [0]
    run_dir = fleet.run_dir
    rounds = [json.loads(l)["round"] for l in metrics.read_text().splitlines()]
    assert rounds == [1, 2, 3]  # a row whose state never landed is dropped and its round re-run
    assert load_state(run_dir).finished
    recs = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert all(r["completed"] == 2 for r in recs if r["round"] == 3)


def test_a_device_that_cannot_load_its_data_tells_the_server_which_stops_waiting(tmp_path):
    rows = [{"text": f"word{i % 4} text", "label": i % 4} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    raw = tiny_raw(server={"rounds": 1, "registration_timeout_s": 300.0},
                   data={"dataset": "jsonl", "path": str(data), "partition": "iid", "num_devices": 2})
    with launch(tmp_path, raw) as fleet:
        data.unlink()  # the server has read it; the device, started now, cannot
        client = subprocess.run(cli("client", "--insecure", "--server", fleet.addr, "--device-id", "0", "--quiet",
                                    "--give-up-s", "30"), capture_output=True, text=True, timeout=120)
        assert client.returncode == 2 and "Traceback" not in client.stderr, client.stderr
        assert "cannot load their data (the server was told)" in client.stderr and str(data) in client.stderr
        # 2 devices are needed, device 0 never can be one: the server stops now, not after the 300 s timeout
        assert fleet.wait_server(60) == 2
    log = (tmp_path / "server.log").read_text()
    assert "device 0 cannot load its data" in log and "only 1 of data.num_devices = 2 can train" in log


def test_own_data_deployment_three_named_devices_train_on_their_own_files(tmp_path):
    """data.mode = own: a server and 3 client processes named alpha, bravo, charlie, each with --data cut from
    AG News at test time (deploy/examples/own-data/make_data.py); 2 rounds; weights from the counts the
    devices report; every round carries the devices' federated evaluation and the server's test accuracy.
    A device whose file has a label the run does not know refuses to start, naming it."""
    import tomllib

    from .conftest import REPO

    example = REPO / "deploy" / "examples" / "own-data"
    subprocess.run([*cli()[:1], str(example / "make_data.py"), "--out", str(tmp_path), "--per-device", "60",
                    "--test", "80"], check=True, capture_output=True, cwd=REPO)
    raw = tomllib.loads((example / "run.toml").read_text())
    raw["server"].update(rounds=2, port=0, registration_timeout_s=300.0)
    raw["model"].update(name="tiny-bert", max_seq_len=32)
    raw["data"]["test_path"] = str(tmp_path / "test.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nsome words,1\nother words,9\n")
    names = ("alpha", "bravo", "charlie")
    with launch(tmp_path, raw) as fleet:
        refused = subprocess.run(cli("client", "--insecure", "--server", fleet.addr, "--device-id", "delta",
                                     "--data", str(bad), "--quiet", "--give-up-s", "30"),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "device delta" in refused.stderr and "label(s) [9]" in refused.stderr
        run_own_data_devices(tmp_path, fleet, {n: tmp_path / f"device_{n}.csv" for n in names})
    run_dir = fleet.run_dir
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["completed"] == 3 for r in rows)
    for r in rows:
        assert sorted(d["device_id"] for d in r["devices"]) == list(names)
        assert [d["num_examples"] for d in r["devices"]] == [48, 48, 48]  # 60 rows, 20 % held out
        assert r["fed_examples"] == 36 and 0 <= r["fed_accuracy"] <= 1 and r["fed_loss"] > 0
        assert r["accuracy"] is not None  # the server's optional test split
    assert "device alpha registered" in (tmp_path / "server.log").read_text()
