"""Virtual devices trained in this process, one after another: the simulator's default runner, and what each
Ray actor runs inside (ray_devices.DeviceActor)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from edgelora.edge_client.secagg import ProtocolViolation
from edgelora.edge_client.sessions import SecureSessions
from edgelora.edge_client.trainer import DeviceHost, DeviceTrainer, DownloadError
from edgelora.protos import serde
from edgelora.schema import RunConfig

# A device's job: (device id, its task header as FetchTask sends it, its download payload, download seconds).
Job = tuple[str, bytes, bytes, float]
# What a device hands back: (its update header as SubmitUpdate sends it, its payload), or why it could not.
Result = tuple[bytes, bytes] | Exception


class SequentialDevices:
    """Runs each virtual device in this process, one after another, when its turn comes: a device past the
    round's K-th accepted update (over-selection) never trains."""

    def __init__(self, run: RunConfig, torch_device: str = "cpu") -> None:
        self.run = run
        self.host = DeviceHost(run.model, torch_device)  # where the virtual devices train
        self.trainers: dict[str, DeviceTrainer] = {}  # created on first use; keeps FLASC error-feedback residuals
        self.sessions = SecureSessions()  # each device's secure-aggregation keys for the round under way

    def trainer(self, device_id: str) -> DeviceTrainer:
        if device_id not in self.trainers:
            self.trainers[device_id] = DeviceTrainer(device_id, self.host, self.run.data)
        return self.trainers[device_id]

    def run_job(self, device_id: str, header: bytes, payload: bytes, download_s: float) -> Result:
        """One device's round, from the bytes it downloads to the bytes it uploads."""
        task = serde.task_from_bytes(header)
        try:
            update = self.trainer(device_id).run(task, payload, download_s,
                                                 secure=self.sessions.for_task(device_id, task))
        except (DownloadError, ProtocolViolation) as e:
            return e
        return serde.update_header_to_bytes(update), update.payload

    def secagg(self, device_id: str, prompt: bytes) -> bytes | Exception:
        """A secure round's key-phase prompt (a TaskHeader of kind SECAGG, as FetchTask sends it) -> the bytes
        of the device's answer, as its RPC carries them, or why an honest device refused."""
        try:
            return self.sessions.answer_bytes(device_id, prompt)
        except ProtocolViolation as e:
            return e

    def train(self, jobs: Iterable[Job], work: dict[str, float] | None = None) -> Iterator[tuple[str, Result]]:
        """Each job's result, in the jobs' order (`work`, each device's examples, is for runners that spread
        jobs over workers)."""
        for job in jobs:
            yield job[0], self.run_job(*job)

    def place_round(self, devices: list[str], work: dict[str, float] | None = None) -> None:
        pass  # every device is here

    def accepted(self, device_id: str) -> None:
        self.trainer(device_id).accepted()

    def residuals(self, devices: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The error-feedback residual of each of `devices` (None: every device) that has one."""
        ids = self.trainers if devices is None else [d for d in devices if d in self.trainers]
        return {d: self.trainers[d].residual for d in ids if self.trainers[d].residual}

    def restore(self, residuals: dict[str, dict[str, np.ndarray]]) -> None:
        for d, r in residuals.items():
            self.trainer(d).residual = r

    def close(self) -> None:
        pass
