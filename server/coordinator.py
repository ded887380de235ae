"""The gRPC side of the round driver: devices register, long-poll for their task and stream their upload
through the grpc.aio servicer, whose pool threads (and event loop, for lock-free reads) call in here; the round
itself is `RoundDriver.run_one_round`, run by one driver thread, with `GrpcDevices` as the way it reaches
devices. All shared state sits behind the driver's condition."""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from edgelora.config import RunConfig
from edgelora.frozen_base import QUANTIZED, quantizer_version
from edgelora.models import fingerprint_model, fingerprint_tokenizer
from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, is_device_id, is_device_name

from .driver import RoundDriver
from .engine import OVER_BUDGET, DeviceState, Round
from .registry import Capacity, DeviceRegistry

log = logging.getLogger("edgelora.server")


class GrpcDevices:
    """Real devices over gRPC (driver.Devices): the registry of those that registered and heartbeat, those
    that cannot load their data, and those told the run is over."""

    def __init__(self, run: RunConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.run = run
        self.clock = clock
        self.registry = DeviceRegistry(run.server.device_timeout_s, clock)
        self.data_errors: dict[str, str] = {}  # devices that told Register they cannot load their data
        self.told_finished: set[str] = set()   # devices that heard the run is over (STOP task or heartbeat)
        self.metrics = None  # server.metrics.CoordinatorMetrics when --metrics-port serves them

    def live(self) -> list[str]:
        return self.registry.live()

    def declared(self, device_id: str) -> DeviceInfo:
        e = self.registry.entry(device_id)
        if e is None:
            return DeviceInfo(device_id)
        return DeviceInfo(device_id, tier=e.tier, declared_uplink_bps=e.uplink_mbps * 1e6,
                          declared_downlink_bps=e.downlink_mbps * 1e6, memory_mb=e.capacity.memory_mb,
                          resident_mb=e.capacity.resident_mb)

    def wait_for(self, driver: RoundDriver, needed: int, before_first_round: bool) -> None:
        """Hold until `needed` devices are live. Before round 1 that has server.registration_timeout_s; between
        rounds a coordinator keeps waiting (devices come back), saying how many are live of those registered."""
        deadline = self.clock() + self.run.server.registration_timeout_s
        said = None
        with driver.cond:
            while self.registry.live_count() < needed and not driver.stopping:
                able = self.run.data.num_devices - len(self.data_errors)
                if self.run.data.mode == "partitions" and able < needed:  # waiting longer cannot help
                    bad = ", ".join(f"{d} ({e})" for d, e in sorted(self.data_errors.items()))
                    raise TimeoutError(f"{needed} devices are needed, but only {able} of data.num_devices = "
                                       f"{self.run.data.num_devices} can train: devices {bad} cannot load their data")
                live, registered = self.registry.live_count(), len(self.registry)
                left = deadline - self.clock()
                if before_first_round and left <= 0:
                    raise TimeoutError(f"only {live} of {needed} devices live ({registered} registered) within "
                                       f"server.registration_timeout_s = {self.run.server.registration_timeout_s}")
                if not before_first_round and said != (live, registered):
                    log.warning("round %d waits: %d devices live of %d registered, %d needed (server.min_devices); "
                                "it goes on when they return", driver.state.round + 1, live, registered, needed)
                    said = (live, registered)
                driver.cond.wait(min(left, 1.0) if before_first_round else 1.0)

    def collect(self, driver: RoundDriver, rnd: Round) -> None:
        """The round's devices fetch and upload through the servicer; this thread waits for the round to fill, its
        deadline to pass, every device it still waits for to go offline, or the driver to stop."""
        with driver.cond:
            rnd.start_clock(self.run.server.round_deadline_s, self.clock)
            driver.notify_all()
            while not rnd.full and rnd.time_left() > 0 and not driver.stopping:
                if self._all_outstanding_offline(rnd):
                    done = rnd.done
                    log.warning("round %d: every device it still waits for (%s) is offline; closing it now",
                                rnd.number, ", ".join(d for d in rnd.sampled if d not in done))
                    break
                driver.cond.wait(min(1.0, rnd.time_left()))

    def exchange(self, driver: RoundDriver, rnd: Round) -> None:
        """A key phase: devices fetch their prompt and answer through the servicer; this thread waits until none
        is left to answer, the phase's deadline passes, every device it waits for is offline, or a stop."""
        secure = rnd.secure
        with driver.cond:
            while secure.waiting() and secure.time_left() > 0 and not driver.stopping:
                if not any(self.registry.is_live(d) for d in secure.waiting()):
                    log.warning("round %d: every device the %s phase waits for (%s) is offline; closing it now",
                                rnd.number, secure.phase, ", ".join(sorted(secure.waiting())))
                    break
                driver.cond.wait(min(1.0, secure.time_left()))

    def _all_outstanding_offline(self, rnd: Round) -> bool:
        """No upload under way and every sampled device without an accepted one has stopped heartbeating."""
        done = rnd.done  # (only the round's devices are looked up: listing every live one is O(registered))
        return not rnd.uploading and not any(self.registry.is_live(d) for d in rnd.sampled if d not in done)

    def checkpoint(self, driver: RoundDriver, rnd: Round, state: ServerState) -> None:
        pass  # a real device keeps its own state

    def round_closed(self, driver: RoundDriver, rnd: Round, state: ServerState) -> None:
        if self.metrics is not None and state.round > driver.state.round:
            self.metrics.round_closed(rnd.record, state)

    def close(self) -> None:
        pass


class Coordinator(RoundDriver):
    """The round driver over GrpcDevices, with what the servicer's handlers call."""

    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(run, run_dir, GrpcDevices(run, clock), resume, clock)
        self.model_fingerprint = fingerprint_model(self.base)
        self.tokenizer_fingerprint = fingerprint_tokenizer(self.tokenizer)
        self._last_told = float("-inf")  # the clock when a device was last told the run is over
        self._pace_draws = random.Random()  # jitter of retry-after and long-poll times (timing only, never a mask)
        self.polls_held = 0  # devices long-polling for a task now (the servicer's count, changed on its loop)

    @property
    def registry(self) -> DeviceRegistry:
        return self.devices.registry

    @property
    def data_errors(self) -> dict[str, str]:
        return self.devices.data_errors

    @property
    def told_finished(self) -> set[str]:
        return self.devices.told_finished

    @property
    def metrics(self):
        return self.devices.metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self.devices.metrics = value

    # -- called from gRPC handlers ------------------------------------------------------------------------
    def register(self, device_id: str, hardware: str, versions: dict[str, str], model_fp: str, tok_fp: str,
                 data_error: str = "", tier: int | None = None, links: tuple[float, float] = (0.0, 0.0),
                 capacity: Capacity = Capacity()) -> None:
        """`links`: the (uplink, downlink) Mbit/s the device declares (0 = says nothing); `capacity`: its memory
        and hardware. A device whose declared memory no plan fits is refused here, with the sizes, and so is
        never sampled."""
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
        if self.run.train.base in QUANTIZED:  # the quantized weights, so the updates, follow the quantizer's version
            mine, theirs = quantizer_version(), versions.get("bitsandbytes", "")
            if theirs != mine:
                raise UpdateRejected(Refusal.PRECONDITION, (
                    f"train.base = {self.run.train.base}: device {device_id} quantizes its base with bitsandbytes "
                    f"{theirs or '(not installed)'}, the server with {mine}; the same weights need the same version"))
        for name, v in (("memory_mb", capacity.memory_mb), ("resident_mb", capacity.resident_mb)):
            if not (math.isfinite(v) and v >= 0):
                raise UpdateRejected(Refusal.INVALID, f"device {device_id} declares {name} = {v}: must be >= 0 MB")
        if capacity.memory_mb > 0:
            self._check_memory(device_id, capacity)
        if self.registry.register(device_id, hardware, versions, tier, *links, capacity=capacity):
            log.info("device %s registered (%s%s%s)", device_id, hardware, "" if tier is None else f", tier {tier}",
                     f", {capacity.memory_mb:.0f} MB" if capacity.memory_mb else "")
        with self.cond:
            self.cond.notify_all()

    def _check_memory(self, device_id: str, capacity: Capacity) -> None:
        """Refuse a device that no memory plan of the current task fits (edgelora.memory)."""
        with self.cond:
            state = self.state
            task = self.engine.method.configure(state, DeviceInfo(device_id)).task
            fitted = self.engine.fit_memory(task, DeviceInfo(device_id, memory_mb=capacity.memory_mb,
                                                             resident_mb=capacity.resident_mb), state)
        if fitted.plan.endswith(OVER_BUDGET):
            raise UpdateRejected(Refusal.PRECONDITION, (
                f"device {device_id} declares {capacity.memory_mb:.0f} MB and holds {capacity.resident_mb:.0f} MB "
                f"already; the smallest plan for this run's {task.structure.kind.name} task at batch "
                f"{task.train.batch_size} x {self.run.model.max_seq_len} tokens ({fitted.plan.removesuffix(OVER_BUDGET)}) is "
                f"predicted to need {fitted.predicted_mb:.0f} MB"))

    def heartbeat(self, device_id: str) -> ServerState:
        self._known(device_id)
        state = self.state
        if state.finished:  # the reply says run_finished: the device stops
            with self.cond:
                self._told(device_id)
        return state

    def next_task(self, device_id: str) -> tuple[str, Round | None, object]:
        """What the device is to do now, without waiting: ('train', round, task) | ('secagg', round, prompt) |
        ('wait', None, retry_after_s) | ('stop', None, None). A secure round's key phases prompt the devices they
        wait for. retry_after_s is 0 (nothing yet: the servicer long-polls, asking again when a wake-up of the
        driver's task_listeners reaches this device, see may_have_tasks) except under pace steering
        (server.pace_s), where a device the open round does not wait for is told to ask again after pace()
        seconds."""
        self._known(device_id)
        with self.cond:
            if self.state.finished:
                self._told(device_id)
                return "stop", None, None
            if self.stopping:  # unfinished: devices back off and reconnect to a resumed server
                raise UpdateRejected(Refusal.UNAVAILABLE, "the coordinator is shutting down; retry later")
            r = self.round
            prompt = r.secure.prompt_for(device_id) if r is not None and r.secure is not None else None
            if prompt is not None:
                return "secagg", r, prompt
            if r is not None and r.can_hand_out(device_id):
                return "train", r, r.hand_out(device_id)
            if self.run.server.pace_s and not self._wanted(device_id):
                return "wait", None, self.pace()
            return "wait", None, 0.0

    def may_have_tasks(self) -> list[str] | None:
        """The devices for which next_task may answer anything but ('wait', None, 0.0) now: the round's sampled
        devices (a task, a key-phase prompt), or None for every device (the run is over or stopping, or pace
        steering answers idle devices). What a wake-up of the long polls needs to reach: O(sampled), not
        O(connected). Read without the driver's lock, on the servicer's event loop after the driver's wake-up:
        the read is at least as new as the change that woke it, so nothing is missed."""
        if self.run.server.pace_s or self.state.finished or self.stopping:
            return None
        r = self.round
        return [] if r is None else r.sampled

    def _wanted(self, device_id: str) -> bool:
        """The open round waits for this device (sampled, not yet done): it long-polls and heartbeats at
        server.heartbeat_s, pace steering or not."""
        r = self.round
        return r is not None and r.open and r.state_of(device_id) not in (None, DeviceState.ACCEPTED)

    def pace(self) -> float:
        """Pace steering: seconds an idle device waits before it asks again, server.pace_s jittered."""
        return self.jittered(self.run.server.pace_s)

    def jittered(self, seconds: float, low: float = 0.5, high: float = 1.5) -> float:
        """seconds x a uniform draw in [low, high): devices told at once come back spread out (the draws are
        timing only and move no result; no mask ever comes from them)."""
        return seconds * (low + (high - low) * self._pace_draws.random())

    def heartbeat_after(self, device_id: str) -> float:
        """The interval a heartbeat reply sets: 0 (keep server.heartbeat_s) without pace steering; under it,
        pace() for a device the open round does not wait for, server.heartbeat_s for one it does. Read without
        the driver's lock (a heartbeat never waits on a round): a stale answer is one interval, and a device the
        round starts waiting for long-polls already."""
        if not self.run.server.pace_s:
            return 0.0
        return self.run.server.heartbeat_s if self._wanted(device_id) else self.pace()

    def begin_upload(self, device_id: str, round_id: int, task_id: str, payload_bytes: int = 0,
                     offset: int = 0) -> tuple[Round, bytearray]:
        self._known(device_id)
        return super().begin_upload(device_id, round_id, task_id, payload_bytes, offset)

    def answer(self, device_id: str, round_id: int, msg, wire_up: int = 0, wire_down: int = 0) -> None:
        self._known(device_id)
        super().answer(device_id, round_id, msg, wire_up, wire_down)

    def upload_offset(self, device_id: str, round_id: int, task_id: str) -> int:
        """Payload bytes held of the device's broken-off upload for this task (0: none)."""
        self._known(device_id)
        with self.cond:
            r = self.round
            # The device may see its stream break before this server does: let the broken stream settle first.
            self.cond.wait_for(lambda: r is None or device_id not in r.uploading, timeout=30)
            return r.held_bytes(device_id, task_id) if r is not None and r.number == round_id else 0

    def say_goodbye(self, max_s: float, linger_s: float | None = None) -> list[str]:
        """After the last round: hold until every live device has heard the run is over (a STOP task or a
        heartbeat reply), at most max_s. A device that was in a backoff sleep or a long poll when the round
        closed hears it at its next heartbeat; leaving earlier strands it retrying an absent server until its
        --give-up-s. Returns the live devices that were not told.

        "Told" is when the answer was handed to gRPC, not when the device read it: a reply still in flight when
        the server stops is lost (seen once in the link-outage test, the device then retried for minutes). So
        once everyone is told the server stays `linger_s` (server.heartbeat_s) past the last telling: a device
        whose answer was lost asks again within its heartbeat period and is told again."""
        linger = self.run.server.heartbeat_s if linger_s is None else linger_s
        deadline = self.clock() + max_s
        with self.cond:
            while True:
                untold = [d for d in self.registry.live()
                          if d not in self.told_finished and d not in self.data_errors]
                left = deadline - self.clock()
                if untold and left > 0 and not self.stopping:
                    self.cond.wait(min(left, 0.5))
                    continue
                settle = self._last_told + linger - self.clock()
                if untold or self.stopping or left <= 0 or settle <= 0:
                    return untold
                self.cond.wait(min(left, settle))

    # -- helpers ---------------------------------------------------------------------------------------------
    def _known(self, device_id: str) -> None:
        if not self.registry.touch(device_id):
            raise UpdateRejected(Refusal.UNKNOWN, f"device {device_id!r} is not registered")

    def _told(self, device_id: str) -> None:
        """(lock held)"""
        self._last_told = self.clock()  # told again (a lost answer asked for once more) counts for the linger
        if device_id not in self.told_finished:
            self.told_finished.add(device_id)
            self.cond.notify_all()

