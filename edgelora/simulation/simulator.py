"""The simulator: the round driver (server.driver) over virtual devices that train in this process
(sequential.SequentialDevices) or in Ray actors (ray_devices.RayDevices), no sockets. Every payload still travels as
codec bytes beside the same protobuf headers the gRPC servicer streams, and bytes are counted exactly as on
the wire: the sum of ByteSize() over a task's TaskChunk messages down, over an upload's UpdateChunk messages up.

Same seeds -> the same device sampling (edgelora.server.sampling), the same tasks and, aggregated in the same
order, the same global weights as a gRPC run. The run folder is the gRPC server's (RunFolder, state/ after
every round), so `--resume` continues from the last completed round.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgelora.configtools import ConfigError
from edgelora.edge_client.throttle import mbit_to_bytes_s
from edgelora.protos import serde
from edgelora.protos.refusals import UpdateRejected
from edgelora.schema import RunConfig
from edgelora.server.checkpoint import groups_from_bytes, groups_to_bytes
from edgelora.server.driver import RoundDriver
from edgelora.server.engine import Round
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo

from .sequential import Job, SequentialDevices

log = logging.getLogger("edgelora.simulate")


RESIDUALS = "residuals"  # RUN_DIR/residuals/DEVICE.NNNNNN.elb: a device's error-feedback residual after round N
# (state.groups_to_bytes of {DEVICE: its residual}), written only for the devices whose residual that round changed


class SimulatedDevices:
    """Virtual devices for the round driver (server.driver.Devices): every one of data.num_devices is always
    live, declares its emulated links, and trains through `runner` (sequential or Ray)."""

    def __init__(self, run: RunConfig, folder_path: Path, runner=None) -> None:
        self.run = run
        self.runner = runner
        self.folder_path = folder_path
        self.ids = [str(i) for i in range(run.data.num_devices)]
        # The round whose devices the runner placed before its key phases: the Round itself, not its number (an
        # abandoned round runs again under the same number, with devices drawn afresh, to be placed afresh).
        self._placed: Round | None = None

    def live(self) -> list[str]:
        return self.ids

    def declared(self, device_id: str) -> DeviceInfo:
        """A simulated device declares its emulated links, as a throttled client does at Register."""
        cfg = self.run.server
        return DeviceInfo(device_id, declared_uplink_bps=_mbps(cfg.simulated_uplink_mbps, device_id) * 1e6,
                          declared_downlink_bps=_mbps(cfg.simulated_downlink_mbps, device_id) * 1e6)

    def wait_for(self, driver: RoundDriver, needed: int, before_first_round: bool) -> None:
        pass  # always there

    def _link_seconds(self, rates: list[float], device_id: str, nbytes: int) -> float | None:
        """What moving nbytes takes on the device's emulated link: the rate a real client's LinkThrottle
        paces to (edge_client.throttle), computed instead of waited for. None: the link is not emulated."""
        mbps = _mbps(rates, device_id)
        return nbytes / mbit_to_bytes_s(mbps) if mbps else None

    def _jobs(self, driver: RoundDriver, rnd: Round) -> Iterator[Job]:
        """Every sampled device fetches its task when the round opens, as over gRPC (an over-selected device
        that turns out late has downloaded too); the runner then takes them in sampled order until the round
        has its K updates."""
        cfg, jobs = self.run.server, []
        for d in rnd.sampled:
            t0 = time.perf_counter()
            payload = rnd.plans[d].payload
            header, nbytes = serde.task_over_the_wire(driver.hand_out(rnd, d), len(payload), cfg.chunk_bytes)
            driver.downloaded(rnd, d, nbytes, finished=True)
            down_s = self._link_seconds(cfg.simulated_downlink_mbps, d, nbytes)
            jobs.append((d, header, payload, time.perf_counter() - t0 if down_s is None else down_s))
        for job in jobs:
            if rnd.full:  # over-selection: K updates arrived; the rest of the sample is late
                return
            yield job

    def exchange(self, driver: RoundDriver, rnd: Round) -> None:
        """A secure round's key phase: each device it waits for, in sampled order, gets its prompt as FetchTask
        carries it and answers as its RPC would (bytes counted as on the wire)."""
        if self._placed is not rnd:  # Ray: the devices' keys live on the actors that will train them
            self.runner.place_round(rnd.sampled, self._work(driver, rnd))
            self._placed = rnd
        for d in rnd.sampled:
            prompt = driver.prompt(rnd, d)
            if prompt is None:
                continue
            header, down = serde.prompt_over_the_wire(rnd.number, prompt)
            answer = self.runner.secagg(d, header)
            if isinstance(answer, Exception):  # it refused: it drops out of the round's protocol
                log.warning("device %s refused round %d's %s phase: %s", d, rnd.number, rnd.secure.phase, answer)
                continue
            msg, up = serde.answer_from_bytes(prompt, answer)
            try:
                driver.answer(d, rnd.number, msg, wire_up=up, wire_down=down)
            except UpdateRejected as e:
                log.warning("device %s: round %d's %s phase refused its answer: %s", d, rnd.number,
                            rnd.secure.phase, e.message)

    def _work(self, driver: RoundDriver, rnd: Round) -> dict[str, float]:
        sizes = driver.engine.partition_sizes
        return {d: float(sizes[int(d)]) for d in rnd.sampled}

    def collect(self, driver: RoundDriver, rnd: Round) -> None:
        """The round's devices train; their updates are accepted in sampled (numeric id) order, as one client
        hosting them all uploads: the order, and so the aggregate, is the same whichever runner trained them."""
        chunk = self.run.server.chunk_bytes
        for d, result in self.runner.train(self._jobs(driver, rnd), self._work(driver, rnd)):
            if rnd.full:
                break
            if isinstance(result, Exception):  # it could not decode its download, or its worker died
                driver.drop(rnd, d, str(result))
                continue
            header, payload = result
            update, bytes_up = serde.update_over_the_wire(header, payload, chunk)
            times = update.times  # upload_s stays 0 (the header leaves it out: the server measures it) unless:
            up_s = self._link_seconds(self.run.server.simulated_uplink_mbps, d, bytes_up)
            if up_s is not None:  # what the server's clock would read behind that uplink
                times = dataclasses.replace(times, upload_s=up_s)
            try:
                driver.begin_upload(d, rnd.number, update.task_id, len(payload))
            except UpdateRejected:  # refused before any byte is taken: no record, as over gRPC
                continue
            try:
                driver.finish_upload(rnd, d, payload, update.num_examples, update.train_loss, times, bytes_up,
                                     evaluation=(update.eval_examples, update.eval_loss, update.eval_accuracy),
                                     peak_rss_mb=update.peak_rss_mb)
            except UpdateRejected:
                continue
            self.runner.accepted(d)

    # -- devices' error-feedback state, checkpointed with the server's so that a resumed run is exact ----------
    # A round's accepted devices write their residual before the round's state lands (checkpoint), and their
    # older files go only after it has (round_closed): a crash anywhere leaves, for every device, its file of
    # the newest round <= the saved state's. Files past the saved state's round are a round that never landed.
    def _residual_files(self) -> dict[str, dict[int, Path]]:
        out: dict[str, dict[int, Path]] = {}
        for f in (self.folder_path / RESIDUALS).glob("*.elb"):
            device, _, n = f.stem.rpartition(".")
            if device and n.isdigit():
                out.setdefault(device, {})[int(n)] = f
        return out

    def checkpoint(self, driver: RoundDriver, rnd: Round, state: ServerState) -> None:
        residuals = self.runner.residuals(sorted(rnd.done, key=int))
        if not residuals:
            return
        d = self.folder_path / RESIDUALS
        d.mkdir(exist_ok=True)
        for device, residual in residuals.items():
            tmp = d / f"{device}.tmp"
            tmp.write_bytes(groups_to_bytes({device: residual}))
            tmp.rename(d / f"{device}.{state.round:06d}.elb")

    def round_closed(self, driver: RoundDriver, rnd: Round, state: ServerState) -> None:
        if state.round <= driver.state.round:  # abandoned: nothing was written, nothing is superseded
            return
        for device, files in self._residual_files().items():
            if state.round in files:
                for n, f in files.items():
                    if n < state.round:
                        f.unlink()
        for legacy in (self.folder_path / RESIDUALS).glob("round_*.elb"):  # the one-file-a-round layout
            legacy.unlink()

    def load_residuals(self, round_id: int) -> None:
        """The residuals as they were after round `round_id` (the saved state's)."""
        legacy = self.folder_path / RESIDUALS / f"round_{round_id:04d}.elb"
        residuals = groups_from_bytes(legacy.read_bytes()) if legacy.exists() else {}
        for device, files in self._residual_files().items():
            for n in [n for n in files if n > round_id]:
                files.pop(n).unlink()
            if files:
                residuals[device] = groups_from_bytes(files[max(files)].read_bytes())[device]
        if residuals:
            self.runner.restore(residuals)

    def close(self) -> None:
        self.runner.close()


def _mbps(rates: list[float], device_id: str) -> float:
    """server.simulated_*_mbps: device i gets rates[i mod len] (0: not emulated)."""
    return float(rates[int(device_id) % len(rates)]) if rates else 0.0


class Simulator(RoundDriver):
    """The round driver over SimulatedDevices."""

    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                 torch_device: str = "cpu") -> None:
        if run.data.mode == "own":
            raise ConfigError("simulate runs partitions of one dataset (data.mode = partitions); data.mode = own "
                              "is for real devices, each with its own file (edgelora client --data PATH)")
        super().__init__(run, run_dir, SimulatedDevices(run, Path(run_dir)), resume)
        # How the devices train, here or in Ray actors: started after the server's model (its initial weights
        # come from the torch RNG the base model seeds) and on the run as the server resolved it (num_labels).
        self.devices.runner = make_runner(self.run, torch_device)
        self.folder.sequential_devices = True
        if self.state.finished and self.state.round < self.run.server.rounds:  # --rounds extends a finished run
            self.state = self.state.replace(finished=False)
        self.progress = progress
        if resume:
            self.devices.load_residuals(self.state.round)

    @property
    def runner(self):
        return self.devices.runner

    def run_rounds(self, stop: Callable[[], bool] = lambda: False, on_round: Callable[[], None] | None = None
                   ) -> ServerState:
        """Rounds until the run is finished or `stop()` says so (checked between rounds), under a progress bar."""
        from tqdm.auto import tqdm

        bar = tqdm(total=self.run.server.rounds, initial=self.state.round, desc=f"simulate {self.run.method.name}",
                   unit="round", disable=not self.progress, leave=False)
        if self.progress:  # the round table goes above the bar, not onto its line
            self.folder.echo = bar.write

        def each_round() -> None:
            bar.update(1)
            if on_round is not None:
                on_round()

        try:
            return super().run_rounds(stop, each_round)
        finally:
            bar.close()


def make_runner(run: RunConfig, torch_device: str = "cpu"):
    """The simulation's device runner for simulate.backend."""
    if run.simulate.backend == "ray":
        from .ray_devices import RayDevices

        return RayDevices(run, torch_device)
    return SequentialDevices(run, torch_device)


def simulate(run: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
             tensorboard: bool = False) -> ServerState:
    sim = Simulator(run, Path(run_dir), resume=resume, progress=progress)
    if tensorboard:
        sim.folder.log_to_tensorboard()
    return sim.run_rounds()
