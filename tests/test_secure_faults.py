"""Secure aggregation's faults with real processes and real SIGKILLs: five `edgelora client` processes, one
killed after its shares went out, another after its masked upload; and below the threshold, a round that
cannot unmask is abandoned without one share revealed."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

import numpy as np
import pytest

from edgelora.config import load_config
from edgelora.launch import Client, Launcher
from edgelora.protos import serde
from edgelora.protos.edgelora_pb2 import TaskHeader
from edgelora.secagg import messages as sa
from edgelora.secagg import ring
from edgelora.server.checkpoint import load_state
from edgelora.server.coordinator import Coordinator
from edgelora.server.run import ServerRun
from edgelora.server.secagg import SecAggServer
from edgelora.simulation.sequential import SequentialDevices
from edgelora.simulation.simulator import simulate
from edgelora.state import RoundsAbandoned

from .conftest import tiny_raw

pytestmark = pytest.mark.slow

# Stands in for `python -m edgelora.cli ...` in the client processes: the real CLI, with SecAggDevice.mask
# instrumented to write each device's vector before masking to $DUMP/DEVICE.ROUND.npy (what the test checks the
# unmasked sum against; nothing of it reaches the coordinator).
DUMPING_PYTHON = """#!{python}
import os, runpy, sys
import numpy as np
from edgelora.edge_client.secagg import SecAggDevice
mask = SecAggDevice.mask
def dumping_mask(self, vector, inp):
    np.save(os.path.join(os.environ["DUMP"], f"{{self.device}}.{{self.setup.round}}.npy"), vector)
    return mask(self, vector, inp)
SecAggDevice.mask = dumping_mask
sys.argv = ["edgelora", *sys.argv[3:]]
runpy.run_module("edgelora.cli", run_name="__main__")
"""


def _secure_raw(**server):
    raw = tiny_raw(server={"rounds": 1, "devices_per_round": 5, "min_registered": 5, "heartbeat_s": 0.5,
                           "device_timeout_s": 3.0, "round_deadline_s": 120.0, **server},
                   data={"num_devices": 5, "max_examples_per_device": 16, "test_max_examples": 16},
                   secure={"enabled": True, "clip": 0.05, "threshold": 0.25, "phase_deadline_s": 60.0})
    raw["train"]["precision"] = "fp32"
    return raw


def test_sigkill_after_sharing_and_after_uploading_the_round_unmasks_the_survivors_sum(tmp_path, monkeypatch):
    """5 devices, k = 4 (everyone), t = 2. Device 3 is SIGKILLed the moment its shares are accepted, device 4
    the moment its masked upload is: the round closes with the sum of 0, 1, 2 and 4, equal bit for bit to the
    sum of their vectors as they computed them (dumped before masking), device 3's masks removed through its
    key shares and device 4's self mask through its seed's."""
    from edgelora.server.app import run_server

    dump = tmp_path / "dump"
    dump.mkdir()
    python = tmp_path / "python"
    python.write_text(DUMPING_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    pids: dict[str, int] = {}
    sums = []
    answer, finish_upload, result = Coordinator.answer, Coordinator.finish_upload, SecAggServer.result

    def killing_answer(self, device_id, round_id, msg, wire_up=0, wire_down=0):
        answer(self, device_id, round_id, msg, wire_up, wire_down)
        if device_id == "3" and isinstance(msg, sa.ShareOut):
            os.kill(pids["3"], signal.SIGKILL)

    def killing_finish(self, r, device_id, *args, **kwargs):
        finish_upload(self, r, device_id, *args, **kwargs)
        if device_id == "4":
            os.kill(pids["4"], signal.SIGKILL)

    def recording_result(self):
        total = result(self)
        sums.append((self.setup().bits, sorted(self.survivors), sorted(self.dropped), total.copy()))
        return total

    monkeypatch.setattr(Coordinator, "answer", killing_answer)
    monkeypatch.setattr(Coordinator, "finish_upload", killing_finish)
    monkeypatch.setattr(SecAggServer, "result", recording_result)
    run = load_config(_secure_raw())
    with run_server(run, tmp_path / "run") as (coord, port), \
            Launcher(tmp_path / "run", python=str(python), env={"DUMP": str(dump), "OMP_NUM_THREADS": "1"}) as fleet:
        procs = fleet.start_clients([Client(device_id=str(d), log=tmp_path / f"client_{d}.log",
                                            args=["--insecure", "--quiet", "--give-up-s", "30"]) for d in range(5)],
                                    addr=f"127.0.0.1:{port}")
        pids.update({str(d): p.pid for d, p in enumerate(procs)})
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        driver.join(timeout=240)
        assert not driver.is_alive(), "the round did not finish"
        codes = fleet.wait_clients(60)
    assert codes[3] == codes[4] == -signal.SIGKILL and codes[:3] == [0, 0, 0], codes
    (bits, survivors, dropped, total), = sums
    assert survivors == ["0", "1", "2", "4"] and dropped == ["3"]
    vectors = {p.name.split(".")[0]: np.load(p) for p in dump.glob("*.1.npy")}
    assert sorted(vectors) == ["0", "1", "2", "4"]  # 3 died before it masked anything
    clear = ring.reduce(sum(vectors[d].astype(np.uint64) for d in survivors).astype(total.dtype), bits)
    np.testing.assert_array_equal(total, clear)
    state = load_state(tmp_path / "run")
    assert state.round == 1 and state.finished
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    status = {d["device_id"]: d["status"] for d in rec["devices"]}
    assert rec["aggregated"] and status == {"0": "completed", "1": "completed", "2": "completed",
                                            "3": "dropped", "4": "completed"}


def test_below_the_threshold_the_round_is_abandoned_and_no_share_is_revealed(tmp_path, monkeypatch):
    """3 devices, t = 2: devices 1 and 2 vanish after sharing their keys (their training fails), so one masked
    upload arrives, fewer than t. The round is abandoned, the weights stay as they were, and no device is ever
    asked for a share (a share of a survivor's seed would unmask device 0's lone upload)."""
    run_job = SequentialDevices.run_job
    unmask_prompts = []
    secagg = SequentialDevices.secagg

    def dying(self, device_id, *args):
        return RuntimeError("device went away") if device_id in ("1", "2") else run_job(self, device_id, *args)

    def counting(self, device_id, prompt):
        if isinstance(serde.prompt_from_proto(TaskHeader.FromString(prompt)), sa.UnmaskRequest):
            unmask_prompts.append(device_id)
        return secagg(self, device_id, prompt)

    monkeypatch.setattr(SequentialDevices, "run_job", dying)
    monkeypatch.setattr(SequentialDevices, "secagg", counting)
    raw = _secure_raw(devices_per_round=3, min_registered=3, max_abandoned_rounds=1)
    raw["data"]["num_devices"] = 3
    raw["secure"]["threshold"] = 0.5
    run = load_config(raw)
    with pytest.raises(RoundsAbandoned):
        simulate(run, tmp_path, progress=False)
    start = ServerRun(run, tmp_path / "fresh").state.params  # the run's initial weights
    state = load_state(tmp_path)
    assert state.round == 0
    for k in start:
        np.testing.assert_array_equal(state.params[k], start[k], err_msg=k)
    assert unmask_prompts == []
    abandoned = [json.loads(l) for l in (tmp_path / "abandoned.jsonl").read_text().splitlines()]
    assert len(abandoned) == 1 and not abandoned[0]["aggregated"]
