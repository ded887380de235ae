"""One round at a million registered devices, driven through the real round driver: where does the time go?

    python -m benchmarks.scale_round [--registered 1000000] [--sampled 1000] [--density 0.0625] [--json PATH]

`ScaleDevices` is a `server.driver.Devices` whose transport is simulated and whose registry is real: every
device is registered in a `server.registry.DeviceRegistry` (the gRPC coordinator's), and `live()` is the
registry's. A round of the real `RoundDriver` (server_run's open: sampling and planning; the engine's check
and accept; close: aggregate, step the method, score, metrics row, checkpoint) runs over them. Each sampled
device is handed its task as FetchTask would carry it (`serde.task_over_the_wire`) and delivers one of a few
canned FLASC top-k uploads of its plan's tensors (encoded once, before the clock starts: devices' training is
not what is measured) through `begin_upload` / `finish_upload`, as the servicer does.

The model is tiny-bert under FLASC (LoRA, top-k up at --density): small, so what the round costs per device
(bookkeeping, not arithmetic) shows; benchmarks.aggregation gives the arithmetic of one SmolLM2-sized upload.
Prints and writes one JSON record: `registered`, `sampled`, `register_s` (registering every device),
`live_s` (one registry.live(): the coordinator lists the live devices each round; this first one sorts the
registry), `live_again_s` (the next round's, nobody registered since: the kept order filtered), `open_s` (sampling and
planning), `hand_out_s` (every task header over the wire), `upload_s` (every begin_upload + finish_upload:
decode, check, add), `close_s` (the rest of the round: aggregate, method step, score, checkpoint),
`round_s`, `per_device_ms` (upload_s / sampled) and `peak_rss_mb`. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from edgelora import codec
from edgelora.config import load_config
from edgelora.protos import serde
from edgelora.server.driver import RoundDriver
from edgelora.server.registry import DeviceRegistry
from edgelora.sparsity import global_topk
from edgelora.tasks import DeviceInfo, PhaseTimes

CANNED = 4  # distinct uploads, cycled over the sampled devices


class ScaleDevices:
    """Every device registered in a real DeviceRegistry and live; transport simulated (driver.Devices)."""

    def __init__(self, registered: int, times: dict[str, float]) -> None:
        self.times = times
        self.registry = DeviceRegistry(timeout_s=3600.0)
        start = time.perf_counter()
        for i in range(registered):
            self.registry.register(str(i), "scale", {})
        times["register_s"] = time.perf_counter() - start

    def live(self) -> list[str]:
        start = time.perf_counter()
        out = self.registry.live()
        self.times["live_s"] = time.perf_counter() - start
        start = time.perf_counter()
        again = self.registry.live()  # the next round's, no device registered since: the order is kept
        self.times["live_again_s"] = time.perf_counter() - start
        assert again == out
        return out

    def declared(self, device_id: str) -> DeviceInfo:
        return DeviceInfo(device_id)

    def wait_for(self, driver, needed: int, before_first_round: bool) -> None:
        pass

    def collect(self, driver: RoundDriver, rnd) -> None:
        self.times["open_s"] = time.perf_counter() - self.times.pop("_opening")
        plan = rnd.plans[rnd.sampled[0]]
        rng = np.random.default_rng(0)
        uploads = [codec.encode_bundle(global_topk({n: rng.standard_normal(s).astype(np.float32) * 1e-3
                                                    for n, s in plan.shapes.items()}, plan.task.upload.density),
                                       value_type=plan.task.upload.value_type)
                   for _ in range(CANNED)]
        start = time.perf_counter()
        tasks = {}
        for d in rnd.sampled:
            payload = rnd.plans[d].payload
            task = driver.hand_out(rnd, d)
            _, nbytes = serde.task_over_the_wire(task, len(payload), driver.run.server.chunk_bytes)
            driver.downloaded(rnd, d, nbytes, finished=True)
            tasks[d] = task.task_id
        self.times["hand_out_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for i, d in enumerate(rnd.sampled):
            payload = uploads[i % CANNED]
            driver.begin_upload(d, rnd.number, tasks[d], len(payload))
            driver.finish_upload(rnd, d, payload, 4, 0.5, PhaseTimes(), len(payload))
        self.times["upload_s"] = time.perf_counter() - start
        if len(rnd.done) != len(rnd.sampled):
            raise RuntimeError(f"{len(rnd.sampled) - len(rnd.done)} canned uploads were not accepted")
        self.times["_closing"] = time.perf_counter()

    def exchange(self, driver, rnd) -> None:
        raise NotImplementedError("secure rounds are not simulated here")

    def checkpoint(self, driver, rnd, state) -> None:
        pass

    def round_closed(self, driver, rnd, state) -> None:
        pass

    def close(self) -> None:
        pass


def measure(registered: int, sampled: int, density: float) -> dict:
    times: dict[str, float] = {}
    devices = ScaleDevices(registered, times)
    run = load_config({
        "server": {"rounds": 1, "devices_per_round": sampled, "min_devices": 1, "min_registered": 1,
                   "plots": False, "samples": 0, "round_deadline_s": 3600.0},
        "model": {"name": "tiny-bert", "max_seq_len": 16},
        "method": {"name": "flasc", "download_density": 0.25, "upload_density": density},
        "data": {"mode": "own", "num_devices": registered, "label_names": ["a", "b"]}})
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        driver = RoundDriver(run, Path(tmp) / "run", devices)
        start = times["_opening"] = time.perf_counter()
        driver.run_one_round()
        end = time.perf_counter()
    times["close_s"] = end - times.pop("_closing")
    return {"registered": registered, "sampled": sampled, "density": density,
            **{k: round(v, 4) for k, v in times.items()}, "round_s": round(end - start, 3),
            "per_device_ms": round(1e3 * times["upload_s"] / sampled, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale_round", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registered", type=int, default=1_000_000)
    ap.add_argument("--sampled", type=int, default=1000)
    ap.add_argument("--density", type=float, default=1 / 16, help="FLASC's upload density")
    ap.add_argument("--json", help="write the record here")
    a = ap.parse_args(argv)
    rec = measure(a.registered, a.sampled, a.density)
    print(json.dumps(rec))
    if a.json:
        Path(a.json).write_text(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
