"""The one round driver: every run's rounds go through `RoundDriver.run_one_round`, whatever reaches the
devices. Flower's `Server.fit_round` over `ClientProxy`s, fedjax's `for_each_client`, written once here.

A round: wait for devices -> open (sample and plan; server_run) -> hand out -> collect, each upload checked
and then accepted or rejected (`begin_upload`, `finish_upload`) -> close -> finish (aggregate, step the method,
score) or abandon -> checkpoint. Only the collect step depends on how devices are reached, and that is the
one thing a `Devices` implementation supplies:

- `server.coordinator.GrpcDevices`: real devices pull their task and push their upload through the gRPC
  servicer (grpc.aio; its calls into the driver run on two small thread pools); the driver thread waits until
  the round is full, past its deadline, or every device it waits for is offline.
- `edgelora.simulation.simulator.SimulatedDevices`: virtual devices train in this process (`SequentialDevices`) or in Ray
  actors (`RayDevices`), and their updates come back through the same `begin_upload` / `finish_upload`.

Every change to a round happens under `cond` (an RLock's condition): the driver thread and the gRPC
servicer's pool threads call in concurrently. A protocol that needs more phases in a round (key exchange,
unmasking) adds them here, once.

Imports: the shared core (edgelora.*) and this package's own modules; never grpc, never edge_client.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgelora.config import RunConfig
from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, PhaseTimes, Task

from .engine import Round
from .run import ServerRun
from .secagg import RoundAborted
from .secure import SecureRound

log = logging.getLogger("edgelora.server")


class Devices(Protocol):
    """How a round reaches its devices: the only part of a round that differs between gRPC, in-process and
    Ray runs."""

    def live(self) -> list[str]:
        """The devices that can be sampled now."""

    def declared(self, device_id: str) -> DeviceInfo:
        """What the device says of itself (tier, links), for planning its task."""

    def wait_for(self, driver: "RoundDriver", needed: int, before_first_round: bool) -> None:
        """Hold until `needed` devices are live (or the driver stops); may raise TimeoutError."""

    def collect(self, driver: "RoundDriver", rnd: Round) -> None:
        """Let the round's devices fetch their tasks and deliver, each upload through driver.begin_upload and
        driver.finish_upload; return when the round should close (full, out of time, or nobody left)."""

    def exchange(self, driver: "RoundDriver", rnd: Round) -> None:
        """A secure round's key phase is open: let the devices it waits for fetch their prompt (driver.prompt)
        and answer (driver.answer); return when none is left to wait for, the phase's deadline passed, or
        every device it waits for is gone."""

    def checkpoint(self, driver: "RoundDriver", rnd: Round, state: ServerState) -> None:
        """The round counted and its state is about to be saved: save what the devices carry between rounds
        that a resume needs (a simulation's error-feedback residuals)."""

    def round_closed(self, driver: "RoundDriver", rnd: Round, state: ServerState) -> None:
        """After the round's outcome is saved (metrics; dropping device checkpoints it superseded)."""

    def close(self) -> None:
        """The run is over or stopped: release what reaches the devices."""


class RoundDriver(ServerRun):
    """Runs a run's rounds over `devices`. The gRPC coordinator and the simulator are this driver with their
    own Devices; neither decides a round's progress itself."""

    def __init__(self, run: RunConfig, run_dir: Path, devices: Devices, resume: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.devices = devices
        self.clock = clock  # deadlines: tests inject one that they move by hand
        super().__init__(run, run_dir, resume)
        self.cond = threading.Condition(threading.RLock())
        # Called (lock held) when a round opens or closes, the state changes or the driver stops: what wakes the
        # servicer's long-polling devices (not every registration or upload: thousands of waiters). Each only
        # schedules its work, never blocks.
        self.task_listeners: list[Callable[[], None]] = []
        self._decoding = threading.BoundedSemaphore(2)
        self.round: Round | None = None
        self.stopping = False

    def declared_device(self, device_id: str) -> DeviceInfo:
        return self.devices.declared(device_id)

    # -- rounds ---------------------------------------------------------------------------------------------
    def run_rounds(self, stop: Callable[[], bool] = lambda: False,
                   on_round: Callable[[], None] | None = None) -> ServerState:
        """Rounds until the run is finished, the driver is stopped, or `stop()` says so (between rounds)."""
        try:
            if self.state.finished:  # resumed after the last round: make sure the final model is on disk
                if not any((self.folder.path / d).exists() for d in ("adapter", "model")):
                    self.folder.save_final_model(self.engine.model_for(self.state))
                return self.state
            self.devices.wait_for(self, self.run.server.registered_needed, True)
            while not self.state.finished and not self.stopping and not stop():
                self.run_one_round()
                if on_round is not None:
                    on_round()
            with self.cond:
                self.notify_all()
            return self.state
        finally:
            self.folder.close()
            self.devices.close()

    def run_one_round(self) -> None:
        cfg = self.run.server
        self.devices.wait_for(self, cfg.min_devices, False)
        rnd = self.open_round(self.devices.live())
        if cfg.save_updates:
            self._save_downloads(rnd)
        with self.cond:
            self.round = rnd
            self.notify_all()
        log.info("round %d: sampled %s", rnd.number, rnd.sampled)
        secure = rnd.secure
        # A secure round: keys are advertised and shares relayed before any task goes out; the uploads are
        # masked; once they close, the survivors' shares unmask their sum (or the round is abandoned).
        keyed = secure is None or (self._secure_phase(rnd, secure) and self._secure_phase(rnd, secure))
        if keyed and not self.stopping:
            self.devices.collect(self, rnd)
        with self.cond:
            rnd.close()
            self.notify_all()
        if self.stopping:  # interrupted mid-round: keep the last saved state, the round re-runs on resume
            log.warning("round %d interrupted; it re-runs on --resume", rnd.number)
            return
        if secure is not None and keyed and self._close_secure_phase(secure):
            self._secure_phase(rnd, secure)  # unmask
        new_state = self.close_round(rnd, lambda s: self.devices.checkpoint(self, rnd, s))
        self.devices.round_closed(self, rnd, new_state)
        if new_state.finished:
            log.info("saved the final model in %s", self.folder.path)
        with self.cond:
            self.state = new_state
            self.notify_all()

    # -- a secure round's key phases ----------------------------------------------------------------------------
    def _secure_phase(self, rnd: Round, secure: SecureRound) -> bool:
        """Run the phase the protocol is in (advertise, share or unmask) to its end; False: the round cannot
        yield a sum any more (too few devices got through), and is abandoned."""
        with self.cond:
            secure.open_phase(self.run.secure.phase_deadline_s, self.clock)
            self.notify_all()
        log.info("round %d: secure aggregation, %s phase", rnd.number, secure.phase)
        self.devices.exchange(self, rnd)
        return self._close_secure_phase(secure)

    def _close_secure_phase(self, secure: SecureRound) -> bool:
        with self.cond:
            try:
                secure.close_phase()
                return True
            except RoundAborted as e:
                log.warning("round %d abandoned by secure aggregation: %s", secure.setup.round, e)
                secure.abort(str(e))
                return False
            finally:
                self.notify_all()

    def prompt(self, rnd: Round, device_id: str):
        """What the device is to answer in the round's key phase now (None: nothing)."""
        with self.cond:
            return rnd.secure.prompt_for(device_id) if rnd.secure is not None else None

    def answer(self, device_id: str, round_id: int, msg, wire_up: int = 0, wire_down: int = 0) -> None:
        """A device's answer to a key-phase prompt (UpdateRejected when it does not belong to the phase under
        way or fails its checks). wire_up / wire_down: the bytes the prompt and the answer took."""
        with self.cond:
            r = self.round
            if r is None or r.secure is None or r.number != round_id:
                current = r.number if r is not None and r.secure is not None else "none"
                raise UpdateRejected(Refusal.PRECONDITION, f"a key message for round {round_id}, but the secure "
                                                           f"round under way is {current}")
            try:
                r.exchanged(device_id, wire_up, wire_down)
                r.secure.answer(device_id, msg)
            finally:
                self.cond.notify_all()

    # -- what devices do in a round, whoever carries it -------------------------------------------------------
    def hand_out(self, rnd: Round, device_id: str) -> Task:
        with self.cond:
            return rnd.hand_out(device_id)

    def downloaded(self, rnd: Round, device_id: str, nbytes: int, finished: bool = False) -> None:
        with self.cond:
            rnd.downloaded(device_id, nbytes, finished)

    def drop(self, rnd: Round, device_id: str, error: str) -> None:
        with self.cond:
            rnd.drop(device_id, error)
            self.cond.notify_all()

    def begin_upload(self, device_id: str, round_id: int, task_id: str, payload_bytes: int = 0,
                     offset: int = 0) -> tuple[Round, bytearray]:
        """Open an upload: (the round, the buffer its payload goes into), or UpdateRejected. offset > 0 resumes
        a broken-off upload of the same task from that byte, into the buffer the round kept."""
        with self.cond:
            r = self.round
            if r is None or r.number != round_id or (not r.open and r.state_of(device_id) is None):
                current = r.number if r is not None and r.open else "none"
                raise UpdateRejected(Refusal.PRECONDITION, f"update for round {round_id}, but the open round is {current}")
            return r, r.begin_upload(device_id, task_id, payload_bytes, offset)

    def finish_upload(self, r: Round, device_id: str, payload: bytes | None, num_examples: int,
                      train_loss: float, times: PhaseTimes, wire_bytes: int, error: str = "",
                      evaluation: tuple[int, float, float] = (0, 0.0, 0.0), peak_rss_mb: float = 0.0) -> None:
        """Check an upload against the device's plan, then accept it into the aggregate or reject it (payload
        None: the stream failed, `error` says how). Raises UpdateRejected when it is not accepted."""
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
                r.accept(device_id, delta, num_examples, train_loss, times, wire_bytes, evaluation, peak_rss_mb)
            finally:
                self.cond.notify_all()
            if self.run.server.save_updates:
                self._save_update(r.number, device_id, payload, num_examples)

    def keep_partial(self, r: Round, device_id: str, task_id: str, buf: bytearray, got: int, wire_bytes: int) -> None:
        """An upload broke off after `got` bytes: keep them until the round closes, for a resume."""
        with self.cond:
            r.upload_broke(device_id, task_id, buf, got, wire_bytes)
            self.cond.notify_all()

    # -- control ----------------------------------------------------------------------------------------------
    def notify_all(self) -> None:
        """Wake everything that waits on the driver, long-polling devices included (lock held)."""
        self.cond.notify_all()
        for listener in self.task_listeners:
            listener()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.notify_all()

    # -- server.save_updates: the round's downloads and every accepted upload, as sent ------------------------
    def _updates_dir(self, round_id: int) -> Path:
        return self.folder.path / "updates" / f"round_{round_id:04d}"

    def _save_downloads(self, rnd: Round) -> None:
        """The weights this round starts from, as sent: lets anyone re-check the FedAvg."""
        d = self._updates_dir(rnd.number)
        shutil.rmtree(d, ignore_errors=True)  # a round re-run after a crash starts clean
        d.mkdir(parents=True)
        if len({p.payload for p in rnd.plans.values()}) == 1:  # every device got the same download
            (d / "download.elb").write_bytes(next(iter(rnd.plans.values())).payload)
        else:
            for device_id, plan in rnd.plans.items():
                (d / f"download_{device_id}.elb").write_bytes(plan.payload)

    def _save_update(self, round_id: int, device_id: str, payload: bytes, num_examples: int) -> None:
        d = self._updates_dir(round_id)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"device_{device_id}.elb").write_bytes(payload)
        (d / f"device_{device_id}.examples").write_text(str(num_examples))
