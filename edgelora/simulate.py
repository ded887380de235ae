"""The in-process simulator: the server's RoundEngine and the device's DeviceTrainer in one process, many
virtual devices, no sockets. Every payload still travels as codec bytes inside the same protobuf messages the
gRPC servicer streams (serialised and parsed back), so bytes are counted exactly as on the wire: the sum of
ByteSize() over a task's TaskChunk messages down, over an upload's UpdateChunk messages up.

Same seeds -> the same device sampling (edgelora.sampling), the same tasks and, aggregated in the same
order, the same global weights as a gRPC run. The run folder is the gRPC server's (RunFolder, state/ after
every round), so `--resume` continues from the last completed round.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from .config import RunConfig
from .configtools import ConfigError
from .device import DeviceHost, DeviceTrainer, DownloadError
from .engine import DevicePlan, UpdateRejected
from .protos import edgelora_pb2 as pb
from .protos import serde
from .rounds import ServerRun
from .state import ServerState
from .tasks import DeviceInfo, PhaseTimes, Task, Update

log = logging.getLogger("edgelora.simulate")


class Simulator(ServerRun):
    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                 torch_device: str = "cpu") -> None:
        if run.data.mode == "own":
            raise ConfigError("simulate runs partitions of one dataset (data.mode = partitions); data.mode = own "
                              "is for real devices, each with its own file (edgelora client --data PATH)")
        super().__init__(run, run_dir, resume)
        self.folder.sequential_devices = True
        run = self.run
        if self.state.finished and self.state.round < run.server.rounds:  # --rounds extends a finished run
            self.state = self.state.replace(finished=False)
        self.devices = [str(i) for i in range(run.data.num_devices)]  # every virtual device is always live
        self.device_host = DeviceHost(run.model, torch_device)  # where the virtual devices train
        self.trainers: dict[str, DeviceTrainer] = {}  # created on first use; keeps FLASC error-feedback residuals
        self.progress = progress

    def trainer(self, device_id: str) -> DeviceTrainer:
        if device_id not in self.trainers:
            self.trainers[device_id] = DeviceTrainer(device_id, self.device_host, self.run.data)
        return self.trainers[device_id]

    # -- the wire, without sockets ---------------------------------------------------------------------------
    def send_task(self, task: Task, plan: DevicePlan) -> tuple[Task, bytes, int]:
        """What FetchTask streams: header + payload chunks; returns what the device parses and the bytes."""
        header = serde.task_to_proto(task, len(plan.payload))
        wire, task, parts = 0, None, []
        for msg in serde.chunks(header, pb.TaskChunk, plan.payload, self.run.server.chunk_bytes):
            wire += msg.ByteSize()
            got = pb.TaskChunk.FromString(msg.SerializeToString())
            if got.WhichOneof("part") == "header":
                task = serde.task_from_proto(got.header)
            else:
                parts.append(got.data)
        return task, b"".join(parts), wire

    def send_update(self, update: Update) -> tuple[bytes, int, int, PhaseTimes, str]:
        """What SubmitUpdate receives: header + payload chunks (as EdgeClient.submit builds them)."""
        header = serde.update_header_to_proto(update)
        wire, parts, h = 0, [], None
        for msg in serde.chunks(header, pb.UpdateChunk, update.payload, self.run.server.chunk_bytes):
            wire += msg.ByteSize()
            got = pb.UpdateChunk.FromString(msg.SerializeToString())
            if got.WhichOneof("part") == "header":
                h = got.header
            else:
                parts.append(got.data)
        return b"".join(parts), wire, h.num_examples, serde.times_from_proto(h.times), h.task_id

    # -- emulated links ---------------------------------------------------------------------------------------
    @staticmethod
    def _rate(rates: list[float], device_id: str) -> float:
        return float(rates[int(device_id) % len(rates)]) * 1e6 if rates else 0.0

    def _link_seconds(self, rates: list[float], device_id: str, nbytes: int) -> float | None:
        bps = self._rate(rates, device_id)
        return 8.0 * nbytes / bps if bps else None

    def declared_device(self, device_id: str) -> DeviceInfo:
        """A simulated device declares its emulated links, as a throttled client does at Register."""
        cfg = self.run.server
        return DeviceInfo(device_id, declared_uplink_bps=self._rate(cfg.simulated_uplink_mbps, device_id),
                          declared_downlink_bps=self._rate(cfg.simulated_downlink_mbps, device_id))

    # -- rounds ---------------------------------------------------------------------------------------------
    def run_rounds(self) -> ServerState:
        from tqdm.auto import tqdm

        cfg = self.run.server
        bar = tqdm(total=cfg.rounds, initial=self.state.round, desc=f"simulate {self.run.method.name}",
                   unit="round", disable=not self.progress, leave=False)
        if self.progress:  # the round table goes above the bar, not onto its line
            self.folder.echo = bar.write
        while not self.state.finished:
            self.run_one_round()
            bar.update(1)
        bar.close()
        return self.state

    def run_one_round(self) -> None:
        rnd = self.open_round(self.devices)
        for d in rnd.sampled:  # aggregated in sampled (numeric id) order, as one client hosting them all uploads
            if rnd.full:  # over-selection: K updates arrived; the rest of the sample is late
                break
            r = rnd.record.devices[d]
            r.task_sent_at = time.time() - rnd.record.started_at
            t0 = time.perf_counter()
            task, payload, r.bytes_down = self.send_task(rnd.hand_out(d), rnd.plans[d])
            down_s = self._link_seconds(self.run.server.simulated_downlink_mbps, d, r.bytes_down)
            try:
                update = self.trainer(d).run(task, payload, time.perf_counter() - t0 if down_s is None else down_s)
            except DownloadError as e:
                r.status, r.error = "dropped", str(e)
                continue
            body, bytes_up, num_examples, times, task_id = self.send_update(update)
            up_s = self._link_seconds(self.run.server.simulated_uplink_mbps, d, bytes_up)
            if up_s is not None:  # what the server's clock would read behind that uplink
                times = dataclasses.replace(times, upload_s=up_s)
            try:
                rnd.check_task_id(d, task_id)
                delta = rnd.check(d, body, num_examples)
            except UpdateRejected as e:
                rnd.reject(d, e.message, bytes_up)
                continue
            rnd.accept(d, delta, num_examples, update.train_loss, times, bytes_up)
            self.trainer(d).accepted()
        self.state = self.close_round(rnd)


def simulate(run: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = False) -> ServerState:
    sim = Simulator(run, Path(run_dir), resume=resume, progress=progress)
    if tensorboard:
        sim.folder.log_to_tensorboard()
    return sim.run_rounds()
