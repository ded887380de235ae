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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .config import RunConfig
from .configtools import ConfigError
from .device import DeviceHost, DeviceTrainer, DownloadError
from .engine import Round, UpdateRejected
from .protos import serde
from .server_run import ServerRun
from .state import ServerState, groups_from_bytes, groups_to_bytes
from .tasks import DeviceInfo, Task, Update

Job = tuple[str, Task, bytes, float]  # (device id, its task as parsed, its download payload, download seconds)

log = logging.getLogger("edgelora.simulate")


class SequentialDevices:
    """Runs each virtual device in this process, one after another, when its turn comes: a device past the
    round's K-th accepted update (over-selection) never trains."""

    def __init__(self, run: RunConfig, torch_device: str = "cpu") -> None:
        self.run = run
        self.host = DeviceHost(run.model, torch_device)  # where the virtual devices train
        self.trainers: dict[str, DeviceTrainer] = {}  # created on first use; keeps FLASC error-feedback residuals

    def trainer(self, device_id: str) -> DeviceTrainer:
        if device_id not in self.trainers:
            self.trainers[device_id] = DeviceTrainer(device_id, self.host, self.run.data)
        return self.trainers[device_id]

    def train(self, jobs: Iterable[Job]) -> Iterator[tuple[str, Update | Exception]]:
        """Each job's update (or why the device could not deliver one), in the jobs' order."""
        for d, task, payload, download_s in jobs:
            try:
                yield d, self.trainer(d).run(task, payload, download_s)
            except DownloadError as e:
                yield d, e

    def accepted(self, device_id: str) -> None:
        self.trainer(device_id).accepted()

    def residuals(self) -> dict[str, dict[str, np.ndarray]]:
        """Every device's error-feedback residual (devices without one left out)."""
        return {d: t.residual for d, t in self.trainers.items() if t.residual}

    def restore(self, residuals: dict[str, dict[str, np.ndarray]]) -> None:
        for d, r in residuals.items():
            self.trainer(d).residual = r

    def close(self) -> None:
        pass


RESIDUALS = "residuals"  # RUN_DIR/residuals/round_NNNN.elb: the devices' error-feedback state after that round
# (state.groups_to_bytes of DEVICE -> its residual: one codec bundle of dense tensors named DEVICE/TENSOR)


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
        self.runner = make_runner(run, torch_device)  # how the devices train: here, or in Ray actors
        self.progress = progress
        if resume:
            self._load_residuals()

    # -- devices' error-feedback state, checkpointed with the server's so that a resumed run is exact ----------
    def _residual_file(self, round_id: int) -> Path:
        return self.folder.path / RESIDUALS / f"round_{round_id:04d}.elb"

    def _save_residuals(self) -> None:
        residuals = self.runner.residuals()
        if not residuals:
            return
        d = self.folder.path / RESIDUALS
        d.mkdir(exist_ok=True)
        tmp, final = d / "tmp.elb", self._residual_file(self.state.round)
        tmp.write_bytes(groups_to_bytes(residuals))
        tmp.rename(final)
        for old in d.glob("round_*.elb"):
            if old != final:
                old.unlink()

    def _load_residuals(self) -> None:
        f = self._residual_file(self.state.round)
        if f.exists():
            self.runner.restore(groups_from_bytes(f.read_bytes()))
        elif any((self.folder.path / RESIDUALS).glob("round_*.elb")):
            log.warning("no device residuals saved for round %d (the run stopped between saving its state and "
                        "theirs): error feedback starts afresh", self.state.round)

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
    def run_rounds(self, stop: Callable[[], bool] = lambda: False, on_round: Callable[[], None] | None = None
                   ) -> ServerState:
        """Rounds until the run is finished or `stop()` says so (checked between rounds)."""
        from tqdm.auto import tqdm

        cfg = self.run.server
        bar = tqdm(total=cfg.rounds, initial=self.state.round, desc=f"simulate {self.run.method.name}",
                   unit="round", disable=not self.progress, leave=False)
        if self.progress:  # the round table goes above the bar, not onto its line
            self.folder.echo = bar.write
        try:
            while not self.state.finished and not stop():
                self.run_one_round()
                bar.update(1)
                if on_round is not None:
                    on_round()
        finally:
            bar.close()
            self.runner.close()
        return self.state

    def _jobs(self, rnd: Round) -> Iterator[Job]:
        """Every sampled device fetches its task when the round opens, as over gRPC (an over-selected device
        that turns out late has downloaded too); the runner then takes them in sampled order until the round
        has its K updates."""
        jobs = []
        for d in rnd.sampled:
            t0 = time.perf_counter()
            task, payload, nbytes = serde.task_through_the_wire(rnd.hand_out(d), rnd.plans[d].payload,
                                                                self.run.server.chunk_bytes)
            rnd.downloaded(d, nbytes, finished=True)
            down_s = self._link_seconds(self.run.server.simulated_downlink_mbps, d, nbytes)
            jobs.append((d, task, payload, time.perf_counter() - t0 if down_s is None else down_s))
        for job in jobs:
            if rnd.full:  # over-selection: K updates arrived; the rest of the sample is late
                return
            yield job

    def run_one_round(self) -> None:
        """One round, its updates accepted in sampled (numeric id) order, as one client hosting them all
        uploads: the order, and so the aggregate, is the same whichever runner trained them."""
        rnd = self.open_round(self.devices)
        for d, result in self.runner.train(self._jobs(rnd)):
            if rnd.full:
                break
            if isinstance(result, Exception):  # it could not decode its download, or its worker died
                rnd.drop(d, str(result))
                continue
            update, bytes_up = serde.update_through_the_wire(result, self.run.server.chunk_bytes)
            times = update.times  # upload_s stays 0 (the header leaves it out: the server measures it) unless:
            up_s = self._link_seconds(self.run.server.simulated_uplink_mbps, d, bytes_up)
            if up_s is not None:  # what the server's clock would read behind that uplink
                times = dataclasses.replace(times, upload_s=up_s)
            try:  # the coordinator's acceptance rules, in the same order
                rnd.begin_upload(d, update.task_id, len(update.payload))
            except UpdateRejected:  # refused before any byte is taken: no record, as over gRPC
                continue
            try:
                delta = rnd.check(d, update.payload, update.num_examples)
            except UpdateRejected as e:
                rnd.reject(d, e.message, bytes_up)
                continue
            rnd.accept(d, delta, update.num_examples, update.train_loss, times, bytes_up)
            self.runner.accepted(d)
        before = self.state.round
        self.state = self.close_round(rnd)
        if self.state.round > before:
            self._save_residuals()


def make_runner(run: RunConfig, torch_device: str = "cpu"):
    """The simulation's device runner for simulate.backend."""
    if run.simulate.backend == "ray":
        from .ray_backend import RayDevices

        return RayDevices(run, torch_device)
    return SequentialDevices(run, torch_device)


def simulate(run: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = False) -> ServerState:
    sim = Simulator(run, Path(run_dir), resume=resume, progress=progress)
    if tensorboard:
        sim.folder.log_to_tensorboard()
    return sim.run_rounds()
