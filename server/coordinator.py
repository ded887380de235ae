"""The round state machine. One driver thread runs rounds; gRPC handler threads call in to fetch tasks and
submit updates. All shared state sits behind one condition variable."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.aggregation import RunningMean
from edgelora.config import RunConfig
from edgelora.device import is_device_id
from edgelora.engine import RoundPlan, UpdateRejected, stage_name
from edgelora.models import fingerprint_model, fingerprint_tokenizer
from edgelora.rounds import ServerRun
from edgelora.runlog import DeviceRecord, RoundRecord
from edgelora.sampling import sample_devices
from edgelora.state import ServerState
from edgelora.tasks import PhaseTimes

from .registry import DeviceRegistry

log = logging.getLogger("edgelora.server")

# A device may fetch its round's task again (it reconnected, or its upload was refused), but not forever:
# one that keeps failing would otherwise retrain in a loop until the deadline.
MAX_TASKS_PER_ROUND = 3


@dataclass
class ActiveRound:
    plan: RoundPlan
    sampled: list[str]
    record: RoundRecord
    agg: RunningMean = field(default_factory=RunningMean)
    in_flight: set[str] = field(default_factory=set)   # uploads being received right now
    done: set[str] = field(default_factory=set)        # accepted uploads
    open: bool = True
    deadline: float = 0.0                              # time.monotonic() at which the round closes
    handed_out: dict[str, int] = field(default_factory=dict)  # tasks given per device (retries after refusals)


class Coordinator(ServerRun):
    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False) -> None:
        super().__init__(run, run_dir, resume)
        self.registry = DeviceRegistry(self.run.server.device_timeout_s)
        self.model_fingerprint = fingerprint_model(self.base)
        self.tokenizer_fingerprint = fingerprint_tokenizer(self.tokenizer)
        self.round: ActiveRound | None = None
        self.cond = threading.Condition()
        self._decoding = threading.BoundedSemaphore(2)
        self.stopping = False
        self.data_errors: dict[str, str] = {}  # devices that told Register they cannot load their data

    # -- called from gRPC handlers ------------------------------------------------------------------------
    def register(self, device_id: str, hardware: str, versions: dict[str, str], model_fp: str, tok_fp: str,
                 data_error: str = "") -> None:
        if not is_device_id(device_id) or int(device_id) >= self.run.data.num_devices:
            raise UpdateRejected("invalid", f"device id {device_id!r} is not a partition index in "
                                            f"0..{self.run.data.num_devices - 1}")
        if data_error:  # it will never train: logged, never sampled, and nobody waits for it
            log.error("device %s cannot load its data, and will not train: %s", device_id, data_error)
            with self.cond:
                self.data_errors[device_id] = data_error
                self.cond.notify_all()
            return
        if model_fp != self.model_fingerprint:
            raise UpdateRejected("precondition", f"base model fingerprint differs: device {model_fp[:12]}, server "
                                                 f"{self.model_fingerprint[:12]} (other weights or head seed)")
        if tok_fp != self.tokenizer_fingerprint:
            raise UpdateRejected("precondition", f"tokenizer fingerprint differs: device {tok_fp[:12]}, server "
                                                 f"{self.tokenizer_fingerprint[:12]}")
        if self.registry.register(device_id, hardware, versions):
            log.info("device %s registered (%s)", device_id, hardware)
        with self.cond:
            self.cond.notify_all()

    def heartbeat(self, device_id: str) -> ServerState:
        self._known(device_id)
        return self.state

    def next_task(self, device_id: str, wait_s: float) -> tuple[str, ActiveRound | None]:
        """('train', round) | ('wait', None) | ('stop', None), holding the call up to wait_s."""
        self._known(device_id)
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self.cond:
            while True:
                if self.state.finished:
                    return "stop", None
                if self.stopping:  # unfinished: devices back off and reconnect to a resumed server
                    raise UpdateRejected("unavailable", "the coordinator is shutting down; retry later")
                r = self.round
                if r is not None and r.open and device_id in r.sampled and device_id not in r.done \
                        and device_id not in r.in_flight and r.handed_out.get(device_id, 0) < MAX_TASKS_PER_ROUND:
                    r.handed_out[device_id] = r.handed_out.get(device_id, 0) + 1
                    rec = r.record.devices[device_id]
                    rec.task_sent_at = time.time() - r.record.started_at
                    return "train", r
                left = deadline - time.monotonic()
                if left <= 0:
                    return "wait", None
                self.cond.wait(left)

    def count_download(self, r: ActiveRound, device_id: str, nbytes: int) -> None:
        with self.cond:
            r.record.devices[device_id].bytes_down += nbytes

    def begin_upload(self, device_id: str, round_id: int) -> ActiveRound:
        self._known(device_id)
        with self.cond:
            r = self.round
            if r is None or not r.open or r.plan.task.round != round_id:
                current = r.plan.task.round if r is not None and r.open else "none"
                raise UpdateRejected("precondition", f"update for round {round_id}, but the open round is {current}")
            if device_id not in r.sampled:
                raise UpdateRejected("precondition", f"device {device_id} was not sampled in round {round_id}")
            if device_id in r.done:
                raise UpdateRejected("exists", f"device {device_id} already uploaded for round {round_id}")
            if device_id in r.in_flight:
                raise UpdateRejected("exists", f"device {device_id} has an upload for round {round_id} in progress")
            r.in_flight.add(device_id)
            return r

    def finish_upload(self, r: ActiveRound, device_id: str, payload: bytes | None, num_examples: int,
                      train_loss: float, times: PhaseTimes, wire_bytes: int, error: str = "") -> None:
        """Validate and aggregate an upload (payload None: the stream failed). Raises UpdateRejected."""
        try:
            if payload is None:
                raise UpdateRejected("invalid", error or "upload failed")
            self.engine.check_examples(device_id, num_examples)
            with self._decoding:  # a few decodes at a time: memory stays bounded however many devices upload
                delta = self.engine.decode_update(r.plan, payload)
        except UpdateRejected as e:
            with self.cond:
                r.in_flight.discard(device_id)
                rec = r.record.devices[device_id]
                rec.status, rec.error = "rejected", e.message
                rec.bytes_up += wire_bytes
            raise
        with self.cond:
            r.in_flight.discard(device_id)
            if not r.open:
                raise UpdateRejected("precondition", f"round {r.plan.task.round} closed before the upload finished")
            r.agg.add(delta, self.engine.weight(num_examples))
            r.done.add(device_id)
            rec = r.record.devices[device_id]
            rec.status, rec.error = "completed", ""
            rec.num_examples, rec.train_loss, rec.bytes_up = num_examples, train_loss, rec.bytes_up + wire_bytes
            rec.download_s, rec.train_s, rec.encode_s, rec.upload_s = (times.download_s, times.train_s,
                                                                        times.encode_s, times.upload_s)
            rec.upload_done_at = time.time() - r.record.started_at
            if self.run.server.save_updates:
                self._save_update(r.plan.task.round, device_id, payload, num_examples)
            self.cond.notify_all()

    # -- the driver ------------------------------------------------------------------------------------------
    def run_rounds(self) -> ServerState:
        cfg = self.run.server
        if self.state.finished:  # resumed after the last round: make sure the final model is on disk
            if not any((self.folder.path / d).exists() for d in ("adapter", "model")):
                self.folder.save_final_model(self.engine.model_for(self.state))
            return self.state
        self._wait_for_devices(cfg.registered_needed)
        while not self.state.finished and not self.stopping:
            self._run_one_round()
        with self.cond:
            self.cond.notify_all()
        return self.state

    def _wait_for_devices(self, needed: int) -> None:
        deadline = time.monotonic() + self.run.server.registration_timeout_s
        with self.cond:
            while len(self.registry.live()) < needed and not self.stopping:
                able = self.run.data.num_devices - len(self.data_errors)
                if able < needed:  # waiting longer cannot help
                    bad = ", ".join(f"{d} ({e})" for d, e in sorted(self.data_errors.items()))
                    raise TimeoutError(f"{needed} devices are needed, but only {able} of data.num_devices = "
                                       f"{self.run.data.num_devices} can train: devices {bad} cannot load their data")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {len(self.registry.live())} of {needed} devices registered within "
                                       f"server.registration_timeout_s = {self.run.server.registration_timeout_s}")
                self.cond.wait(min(left, 1.0))

    def _sample(self) -> tuple[list[str], dict]:
        return sample_devices(self.registry.live(), self.state.rng, self.run.server.devices_per_round)

    def _run_one_round(self) -> None:
        cfg = self.run.server
        self._wait_for_devices(cfg.min_devices)
        sampled, rng_state = self._sample()
        plan = self.engine.plan(self.state)
        rec = RoundRecord(round=plan.task.round, stage=stage_name(self.state.stage),
                          devices={d: DeviceRecord(d) for d in sampled})
        if cfg.save_updates:  # the weights this round starts from, as sent: lets anyone re-check the FedAvg
            d = self.folder.path / "updates" / f"round_{plan.task.round:04d}"
            shutil.rmtree(d, ignore_errors=True)  # a round re-run after a crash starts clean
            d.mkdir(parents=True)
            (d / "download.elb").write_bytes(plan.payload)
        deadline = time.monotonic() + cfg.round_deadline_s
        with self.cond:
            self.round = ActiveRound(plan, sampled, rec, deadline=deadline)
            self.cond.notify_all()
        log.info("round %d: sampled %s", plan.task.round, sampled)
        with self.cond:
            r = self.round
            while len(r.done) < len(sampled) and time.monotonic() < deadline and not self.stopping:
                self.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            r.open = False
            for d in sampled:
                if d not in r.done and r.record.devices[d].status == "sampled":
                    r.record.devices[d].status = "dropped"
            self.cond.notify_all()
        if self.stopping:  # interrupted mid-round: keep the last saved state, the round re-runs on resume
            log.warning("round %d interrupted; it re-runs on --resume", plan.task.round)
            return
        if len(r.done) < cfg.min_devices:
            log.warning("round %d abandoned: %d of %d devices reported (min_devices = %d)", plan.task.round,
                        len(r.done), len(sampled), cfg.min_devices)
        new_state = self.close_round(r.agg, rng_state, rec)
        if new_state.finished:
            log.info("saved the final model in %s", self.folder.path)
        with self.cond:
            self.state = new_state
            self.cond.notify_all()

    # -- helpers ---------------------------------------------------------------------------------------------
    def _known(self, device_id: str) -> None:
        if not self.registry.touch(device_id):
            raise UpdateRejected("unknown", f"device {device_id!r} is not registered")

    def _save_update(self, round_id: int, device_id: str, payload: bytes, num_examples: int) -> None:
        d = self.folder.path / "updates" / f"round_{round_id:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"device_{device_id}.elb").write_bytes(payload)
        (d / f"device_{device_id}.examples").write_text(str(num_examples))

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
