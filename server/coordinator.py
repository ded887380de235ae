"""The round state machine. One driver thread runs rounds; gRPC handler threads call in to fetch tasks and
submit updates. All shared state sits behind one condition variable."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from edgelora.config import RunConfig
from edgelora.device import is_device_id, is_device_name
from edgelora.engine import Refusal, Round, UpdateRejected
from edgelora.models import fingerprint_model, fingerprint_tokenizer
from edgelora.server_run import ServerRun
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, PhaseTimes, Task

from .registry import DeviceRegistry

log = logging.getLogger("edgelora.server")

class Coordinator(ServerRun):
    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False) -> None:
        super().__init__(run, run_dir, resume)
        self.registry = DeviceRegistry(self.run.server.device_timeout_s)
        self.model_fingerprint = fingerprint_model(self.base)
        self.tokenizer_fingerprint = fingerprint_tokenizer(self.tokenizer)
        self.round: Round | None = None
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        # Devices long-polling FetchTask wait on their own condition, woken only when a round opens or closes,
        # the state changes or the server stops: not by every registration or upload (thousands of waiters).
        self.task_ready = threading.Condition(lock)
        self._decoding = threading.BoundedSemaphore(2)
        self.stopping = False
        self.data_errors: dict[str, str] = {}  # devices that told Register they cannot load their data
        self.told_finished: set[str] = set()   # devices that heard the run is over (STOP task or heartbeat)
        self.metrics = None  # server.metrics.CoordinatorMetrics when --metrics-port serves them

    # -- called from gRPC handlers ------------------------------------------------------------------------
    def register(self, device_id: str, hardware: str, versions: dict[str, str], model_fp: str, tok_fp: str,
                 data_error: str = "", tier: int | None = None, links: tuple[float, float] = (0.0, 0.0)) -> None:
        """`links`: the (uplink, downlink) Mbit/s the device declares (0 = says nothing)."""
        if self.run.data.mode == "own":
            if not is_device_name(device_id):
                raise UpdateRejected(Refusal.INVALID, f"device id {device_id!r} is not a name of 1-64 letters, digits, "
                                                f"'.', '_' or '-'")
        elif not is_device_id(device_id) or int(device_id) >= self.run.data.num_devices:
            raise UpdateRejected(Refusal.INVALID, f"device id {device_id!r} is not a partition index in "
                                            f"0..{self.run.data.num_devices - 1}")
        if data_error:  # it will never train: logged, never sampled, and nobody waits for it
            log.error("device %s cannot load its data, and will not train: %s", device_id, data_error)
            with self.cond:
                self.data_errors[device_id] = data_error
                self.cond.notify_all()
            return
        if model_fp != self.model_fingerprint:
            raise UpdateRejected(Refusal.PRECONDITION, f"base model fingerprint differs: device {model_fp[:12]}, server "
                                                 f"{self.model_fingerprint[:12]} (other weights or head seed)")
        if tok_fp != self.tokenizer_fingerprint:
            raise UpdateRejected(Refusal.PRECONDITION, f"tokenizer fingerprint differs: device {tok_fp[:12]}, server "
                                                 f"{self.tokenizer_fingerprint[:12]}")
        tiers = self.engine.method.tiers()
        if tier is not None and not 0 <= tier < tiers:
            raise UpdateRejected(Refusal.INVALID, f"device {device_id} gives tier {tier}, but this run plans for "
                                            f"{tiers} tier(s): 0..{tiers - 1} (method.tiers)")
        if self.registry.register(device_id, hardware, versions, tier, *links):
            log.info("device %s registered (%s%s)", device_id, hardware, "" if tier is None else f", tier {tier}")
        with self.cond:
            self.cond.notify_all()

    def heartbeat(self, device_id: str) -> ServerState:
        self._known(device_id)
        state = self.state
        if state.finished:  # the reply says run_finished: the device stops
            with self.cond:
                self._told(device_id)
        return state

    def next_task(self, device_id: str, wait_s: float) -> tuple[str, Round | None, Task | None]:
        """('train', round, task) | ('wait', None, None) | ('stop', None, None), holding the call up to wait_s."""
        self._known(device_id)
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self.cond:
            while True:
                if self.state.finished:
                    self._told(device_id)
                    return "stop", None, None
                if self.stopping:  # unfinished: devices back off and reconnect to a resumed server
                    raise UpdateRejected(Refusal.UNAVAILABLE, "the coordinator is shutting down; retry later")
                r = self.round
                if r is not None and r.can_hand_out(device_id):
                    return "train", r, r.hand_out(device_id)
                left = deadline - time.monotonic()
                if left <= 0:
                    return "wait", None, None
                self.task_ready.wait(left)

    def count_download(self, r: Round, device_id: str, nbytes: int, finished: bool = False) -> None:
        with self.cond:
            r.downloaded(device_id, nbytes, finished)

    def begin_upload(self, device_id: str, round_id: int, task_id: str, payload_bytes: int = 0,
                     offset: int = 0) -> tuple[Round, bytearray]:
        """Open an upload: (the round, the buffer its payload goes into). offset > 0 resumes a broken-off
        upload of the same task from that byte, into the buffer the server kept."""
        self._known(device_id)
        with self.cond:
            r = self.round
            if r is None or r.number != round_id or (not r.open and r.state_of(device_id) is None):
                current = r.number if r is not None and r.open else "none"
                raise UpdateRejected(Refusal.PRECONDITION, f"update for round {round_id}, but the open round is {current}")
            return r, r.begin_upload(device_id, task_id, payload_bytes, offset)

    def finish_upload(self, r: Round, device_id: str, payload: bytes | None, num_examples: int,
                      train_loss: float, times: PhaseTimes, wire_bytes: int, error: str = "",
                      evaluation: tuple[int, float, float] = (0, 0.0, 0.0)) -> None:
        """Validate and aggregate an upload (payload None: the stream failed). Raises UpdateRejected."""
        try:
            if payload is None:
                raise UpdateRejected(Refusal.INVALID, error or "upload failed")
            with self._decoding:  # a few decodes at a time: memory stays bounded however many devices upload
                delta = r.check(device_id, payload, num_examples)
        except UpdateRejected as e:
            with self.cond:
                r.reject(device_id, e.message, wire_bytes)
                self.cond.notify_all()
            raise
        with self.cond:
            try:
                r.accept(device_id, delta, num_examples, train_loss, times, wire_bytes, evaluation)
            finally:
                self.cond.notify_all()
            if self.run.server.save_updates:
                self._save_update(r.number, device_id, payload, num_examples)

    def keep_partial(self, r: Round, device_id: str, task_id: str, buf: bytearray, got: int, wire_bytes: int) -> None:
        """An upload broke off after `got` bytes: keep them until the round closes, for a resume."""
        with self.cond:
            r.upload_broke(device_id, task_id, buf, got, wire_bytes)
            self.cond.notify_all()

    def upload_offset(self, device_id: str, round_id: int, task_id: str) -> int:
        """Payload bytes held of the device's broken-off upload for this task (0: none)."""
        self._known(device_id)
        with self.cond:
            r = self.round
            # The device may see its stream break before this server does: let the broken stream settle first.
            self.cond.wait_for(lambda: r is None or device_id not in r.uploading, timeout=30)
            return r.held_bytes(device_id, task_id) if r is not None and r.number == round_id else 0

    # -- the driver ------------------------------------------------------------------------------------------
    def run_rounds(self) -> ServerState:
        cfg = self.run.server
        if self.state.finished:  # resumed after the last round: make sure the final model is on disk
            if not any((self.folder.path / d).exists() for d in ("adapter", "model")):
                self.folder.save_final_model(self.engine.model_for(self.state))
            return self.state
        self._wait_for_devices(cfg.registered_needed, before_first_round=True)
        while not self.state.finished and not self.stopping:
            self._run_one_round()
        with self.cond:
            self._notify_all()
        return self.state

    def _wait_for_devices(self, needed: int, before_first_round: bool = False) -> None:
        """Hold until `needed` devices are live. Before round 1 that has server.registration_timeout_s; between
        rounds a coordinator keeps waiting (devices come back), saying how many are live of those registered."""
        deadline = time.monotonic() + self.run.server.registration_timeout_s
        said = None
        with self.cond:
            while len(self.registry.live()) < needed and not self.stopping:
                able = self.run.data.num_devices - len(self.data_errors)
                if self.run.data.mode == "partitions" and able < needed:  # waiting longer cannot help
                    bad = ", ".join(f"{d} ({e})" for d, e in sorted(self.data_errors.items()))
                    raise TimeoutError(f"{needed} devices are needed, but only {able} of data.num_devices = "
                                       f"{self.run.data.num_devices} can train: devices {bad} cannot load their data")
                live, registered = len(self.registry.live()), len(self.registry)
                left = deadline - time.monotonic()
                if before_first_round and left <= 0:
                    raise TimeoutError(f"only {live} of {needed} devices live ({registered} registered) within "
                                       f"server.registration_timeout_s = {self.run.server.registration_timeout_s}")
                if not before_first_round and said != (live, registered):
                    log.warning("round %d waits: %d devices live of %d registered, %d needed (server.min_devices); "
                                "it goes on when they return", self.state.round + 1, live, registered, needed)
                    said = (live, registered)
                self.cond.wait(min(left, 1.0) if before_first_round else 1.0)

    def say_goodbye(self, max_s: float) -> list[str]:
        """After the last round: hold until every live device has heard the run is over (a STOP task or a
        heartbeat reply), at most max_s. A device that was in a backoff sleep or a long poll when the round
        closed hears it at its next heartbeat; leaving earlier strands it retrying an absent server until its
        --give-up-s. Returns the live devices that were not told."""
        deadline = time.monotonic() + max_s
        with self.cond:
            while True:
                untold = [d for d in self.registry.live()
                          if d not in self.told_finished and d not in self.data_errors]
                left = deadline - time.monotonic()
                if not untold or left <= 0 or self.stopping:
                    return untold
                self.cond.wait(min(left, 0.5))

    def declared_device(self, device_id: str) -> DeviceInfo:
        e = self.registry.entry(device_id)
        if e is None:
            return DeviceInfo(device_id)
        return DeviceInfo(device_id, tier=e.tier, declared_uplink_bps=e.uplink_mbps * 1e6,
                          declared_downlink_bps=e.downlink_mbps * 1e6)

    def _run_one_round(self) -> None:
        cfg = self.run.server
        self._wait_for_devices(cfg.min_devices)
        r = self.open_round(self.registry.live())
        if cfg.save_updates:  # the weights this round starts from, as sent: lets anyone re-check the FedAvg
            d = self.folder.path / "updates" / f"round_{r.number:04d}"
            shutil.rmtree(d, ignore_errors=True)  # a round re-run after a crash starts clean
            d.mkdir(parents=True)
            if len({p.payload for p in r.plans.values()}) == 1:  # every device got the same download
                (d / "download.elb").write_bytes(next(iter(r.plans.values())).payload)
            else:
                for device_id, plan in r.plans.items():
                    (d / f"download_{device_id}.elb").write_bytes(plan.payload)
        with self.cond:
            r.start_clock(cfg.round_deadline_s)
            self.round = r
            self._notify_all()
        log.info("round %d: sampled %s", r.number, r.sampled)
        with self.cond:
            while not r.full and time.monotonic() < r.deadline and not self.stopping:
                if self._all_outstanding_offline(r):
                    log.warning("round %d: every device it still waits for (%s) is offline; closing it now",
                                r.number, ", ".join(d for d in r.sampled if d not in r.done))
                    break
                self.cond.wait(min(1.0, max(0.0, r.deadline - time.monotonic())))
            r.close()
            self._notify_all()
        if self.stopping:  # interrupted mid-round: keep the last saved state, the round re-runs on resume
            log.warning("round %d interrupted; it re-runs on --resume", r.number)
            return
        new_state = self.close_round(r)
        if self.metrics is not None and new_state.round > self.state.round:
            self.metrics.round_closed(r.record, new_state)
        if new_state.finished:
            log.info("saved the final model in %s", self.folder.path)
        with self.cond:
            self.state = new_state
            self._notify_all()

    # -- helpers ---------------------------------------------------------------------------------------------
    def _all_outstanding_offline(self, r: Round) -> bool:
        """No upload under way and every sampled device without an accepted one has stopped heartbeating."""
        live = set(self.registry.live())
        return not r.uploading and all(d in r.done or d not in live for d in r.sampled)

    def _known(self, device_id: str) -> None:
        if not self.registry.touch(device_id):
            raise UpdateRejected(Refusal.UNKNOWN, f"device {device_id!r} is not registered")

    def _save_update(self, round_id: int, device_id: str, payload: bytes, num_examples: int) -> None:
        d = self.folder.path / "updates" / f"round_{round_id:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"device_{device_id}.elb").write_bytes(payload)
        (d / f"device_{device_id}.examples").write_text(str(num_examples))

    def _told(self, device_id: str) -> None:
        """(lock held)"""
        if device_id not in self.told_finished:
            self.told_finished.add(device_id)
            self.cond.notify_all()

    def _notify_all(self) -> None:
        """Wake everything that waits on the coordinator, long-polling devices included (lock held)."""
        self.cond.notify_all()
        self.task_ready.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self._notify_all()
