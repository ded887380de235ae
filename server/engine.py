"""One round's logic, with no transport: plan each device's task, validate and decode uploads against that
device's own plan, aggregate, step the method. The gRPC coordinator (server/) and the in-process simulator
drive the same Round; they only move bytes."""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import secrets
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from edgelora import codec, memory
from edgelora.data import partition_sizes
from edgelora.methods import Instruction, Method, ModelHost
from edgelora.models import is_masked, load_trainable_state
from edgelora.config import secure_threshold
from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.records import DeviceRecord, RoundRecord
from edgelora.schema import RunConfig
from edgelora.secagg import coordinates as coords
from edgelora.secagg import dp
from edgelora.secagg import messages as sa
from edgelora.secagg.ring import plan_ring, ring_length
from edgelora.sparsity import topk_count
from edgelora.state import ServerState
from edgelora.tasks import Coordinates, DeviceInfo, PhaseTimes, SecureUpload, Stage, Task, UploadFormat

from .aggregation import Delta, FlatSparse, Layout, check_coordinates, global_norm, make_aggregator
from .secure import SecureRound

log = logging.getLogger("edgelora.server")


# A device may fetch its round's task again (it reconnected, or its upload was refused), but not forever:
# one that keeps failing would otherwise retrain in a loop until the deadline.
MAX_TASKS_PER_ROUND = 3


class DeviceState(enum.Enum):
    """A sampled device's progress through one round (Round owns it; every change is a Round method).

    SAMPLED -> TASKED (hand_out; again after a refusal or a broken-off upload, up to MAX_TASKS_PER_ROUND)
    TASKED -> UPLOADING (begin_upload) -> ACCEPTED | REJECTED | BROKEN_OFF (a resume: UPLOADING again)
    SAMPLED | TASKED -> DROPPED (drop: e.g. its download could not be decoded)
    when the round closes, every device short of ACCEPTED or REJECTED -> LATE (the round had its K updates
    without it) or DROPPED."""
    SAMPLED = "sampled"
    TASKED = "tasked"
    UPLOADING = "uploading"
    BROKEN_OFF = "broken_off"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DROPPED = "dropped"
    LATE = "late"


_S = DeviceState
_MOVES: dict[DeviceState, frozenset[DeviceState]] = {
    _S.SAMPLED: frozenset({_S.TASKED, _S.DROPPED, _S.LATE}),
    _S.TASKED: frozenset({_S.TASKED, _S.UPLOADING, _S.DROPPED, _S.LATE}),
    _S.UPLOADING: frozenset({_S.ACCEPTED, _S.REJECTED, _S.BROKEN_OFF}),
    _S.BROKEN_OFF: frozenset({_S.TASKED, _S.UPLOADING, _S.DROPPED, _S.LATE}),
    _S.REJECTED: frozenset({_S.TASKED, _S.UPLOADING}),
    _S.ACCEPTED: frozenset(), _S.DROPPED: frozenset(), _S.LATE: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A driver asked a Round for a move its lifecycle does not allow (a bug in the driver, not a device)."""


OVER_BUDGET = " (over budget)"  # the mark of a plan that does not fit the device's declared memory


@dataclass(frozen=True)
class DevicePlan:
    """One device's round: its instruction, the encoded download, and what its upload must look like."""
    instruction: Instruction
    payload: bytes                       # codec bytes of the download (shared by devices with equal instructions)
    shapes: dict[str, tuple[int, ...]]   # the trainable tensors every upload must carry
    masked: frozenset[str]               # tensors that travel as Masked under an UploadFormat.MASKED rule

    @property
    def task(self) -> Task:
        return self.instruction.task

    @cached_property
    def entries(self) -> int:
        """N: trainable entries over every tensor (what top-k densities and the decode bound count)."""
        return sum(math.prod(s) for s in self.shapes.values())

    @cached_property
    def layout(self) -> Layout:
        """The tensors laid end to end in plan order: a top-k upload's FlatSparse is over this."""
        return Layout.of(self.shapes)


class Round:
    """One round from sampling to aggregation, with no transport and no threads: the one owner of every
    sampled device's progress (DeviceState) and of the round's record. The coordinator (under its lock), the
    in-process simulator and any other driver only call its methods; none writes its fields. Plans are made
    when the round opens, one per distinct instruction, so every device's download is ready before any asks."""

    def __init__(self, engine: "RoundEngine", state: ServerState, sampled: list[str], rng_state: dict,
                 devices: dict[str, DeviceInfo]) -> None:
        self.engine = engine
        self.state = state                   # the state the round starts from
        self.number = state.round + 1
        self.sampled = sampled
        # Over-selection: the round closes at the K-th accepted upload, however many devices were sampled.
        self.target = min(engine.run.server.devices_per_round, len(sampled))
        self.rng_state = rng_state           # the sampler's state after this round's draw
        self.record = RoundRecord(round=self.number, stage=stage_name(state.stage),
                                  devices={d: DeviceRecord(d) for d in sampled})
        self._state = {d: DeviceState.SAMPLED for d in sampled}
        # the devices in each state, kept with _state by _move: `done` and `full` are asked on every upload
        # and long poll, and a scan of the whole sample each time made a round's cost grow as K squared
        self._in_state: dict[DeviceState, set[str]] = {s: set() for s in DeviceState}
        self._in_state[DeviceState.SAMPLED].update(sampled)
        self._handed_out: dict[str, int] = {}
        self._task_ids: dict[str, set[str]] = {}  # issued per device, until its update is accepted
        self._partial: dict[str, tuple[str, bytearray, int]] = {}  # broken-off uploads: (task id, buffer, bytes held)
        self._open = True
        self._deadline = 0.0                 # the clock's reading at which the round closes (0: no clock)
        self._clock = time.monotonic
        by_instruction: dict[Instruction, DevicePlan] = {}
        self.plans: dict[str, DevicePlan] = {}
        for d in sampled:
            ins = engine.method.configure(state, devices[d])
            if engine.run.secure.enabled:  # every device of the round uploads at the same coordinates
                ins = engine.with_secure_upload(state, ins, len(sampled))
            if ins not in by_instruction:
                by_instruction[ins] = engine.plan(state, ins)
            # fitted to the memory the device declared: only its train spec changes, its download is the same
            fitted = engine.fit_memory(ins.task, devices[d], state)
            plan = by_instruction[ins]
            if fitted.spec != ins.task.train:
                plan = dataclasses.replace(plan, instruction=dataclasses.replace(
                    ins, task=dataclasses.replace(ins.task, train=fitted.spec)))
            self.plans[d] = plan
            rec = self.record.devices[d]
            rec.memory_mb, rec.plan, rec.predicted_mb = devices[d].memory_mb, fitted.plan, round(fitted.predicted_mb, 1)
        # A secure round's accumulator is its SecureRound: masked uploads are summed in the ring, and only the
        # sum is unmasked (the driver runs its key phases around the uploads).
        self.secure: SecureRound | None = (engine.secure_round(self.number, sampled, by_instruction)
                                           if engine.run.secure.enabled else None)
        self.agg = self.secure if self.secure is not None else engine.aggregator.start()

    # -- what drivers read ------------------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return self._open

    @property
    def full(self) -> bool:
        """K updates have been accepted: nothing more is needed (the rest of an over-selected sample is late)."""
        return len(self._in_state[_S.ACCEPTED]) >= self.target

    @property
    def done(self) -> frozenset[str]:
        """Devices whose update was accepted."""
        return frozenset(self._in_state[_S.ACCEPTED])

    @property
    def uploading(self) -> frozenset[str]:
        return frozenset(self._in_state[DeviceState.UPLOADING])

    @property
    def deadline(self) -> float:
        return self._deadline

    def state_of(self, device_id: str) -> DeviceState | None:
        """None: not sampled in this round."""
        return self._state.get(device_id)

    def can_hand_out(self, device_id: str) -> bool:
        """The device may be given its task now: the round wants it, it has no update in or under way, and it
        has not used up its MAX_TASKS_PER_ROUND."""
        s = self._state.get(device_id)
        return (self._open and not self.full and s is not None and _S.TASKED in _MOVES[s]
                and self._handed_out.get(device_id, 0) < MAX_TASKS_PER_ROUND
                and (self.secure is None or self.secure.may_upload(device_id)))

    def time_left(self) -> float:
        return max(0.0, self._deadline - self._clock())

    def held_bytes(self, device_id: str, task_id: str) -> int:
        """Payload bytes held of the device's broken-off upload for this task (0: none)."""
        held = self._partial.get(device_id) if self._open else None
        return held[2] if held is not None and held[0] == task_id else 0

    def _now(self) -> float:
        return time.time() - self.record.started_at

    def _move(self, device_id: str, to: DeviceState) -> None:
        s = self._state.get(device_id)
        if s is None:
            raise IllegalTransition(f"round {self.number}: device {device_id} was not sampled")
        if to not in _MOVES[s]:
            raise IllegalTransition(f"round {self.number}: device {device_id} cannot go from {s.value} to {to.value}")
        self._state[device_id] = to
        self._in_state[s].discard(device_id)
        self._in_state[to].add(device_id)

    # -- transitions -----------------------------------------------------------------------------------------
    def start_clock(self, deadline_s: float, clock=time.monotonic) -> None:
        """The round closes deadline_s from now on `clock`; every task handed out says how much of that is left."""
        self._clock = clock
        self._deadline = clock() + deadline_s

    def hand_out(self, device_id: str) -> Task:
        """The device's task, under a fresh single-use id its upload must carry (replays are refused)."""
        if not self.can_hand_out(device_id):
            raise IllegalTransition(f"round {self.number}: device {device_id} may not be given a task now "
                                    f"({self._state.get(device_id)}, {self._handed_out.get(device_id, 0)} given)")
        self._move(device_id, _S.TASKED)
        tid = secrets.token_hex(8)
        self._task_ids.setdefault(device_id, set()).add(tid)
        self._handed_out[device_id] = self._handed_out.get(device_id, 0) + 1
        self.record.devices[device_id].task_sent_at = self._now()
        task = dataclasses.replace(self.plans[device_id].task, task_id=tid)
        if self.secure is not None:  # whom to mask toward, and the shares its neighbours sealed to it
            task = dataclasses.replace(task, masking=self.secure.masking_input_for(device_id))
        if self._deadline:  # what is left of the round, not its length
            task = dataclasses.replace(task, deadline_s=self.time_left())
        return task

    def downloaded(self, device_id: str, nbytes: int, finished: bool = False) -> None:
        """Wire bytes of the device's download went out (finished: its last chunk)."""
        rec = self.record.devices[device_id]
        rec.bytes_down += nbytes
        if finished:
            rec.download_done_at = self._now()

    def exchanged(self, device_id: str, wire_up: int, wire_down: int) -> None:
        """A secure round's key message went by: its bytes count as the device's (refused ones too)."""
        rec = self.record.devices.get(device_id)
        if rec is None:
            raise UpdateRejected(Refusal.PRECONDITION, f"device {device_id} was not sampled in round {self.number}")
        rec.bytes_up += wire_up
        rec.bytes_down += wire_down

    def drop(self, device_id: str, error: str) -> None:
        """The device cannot take part in this round (e.g. it could not decode its download)."""
        self._move(device_id, _S.DROPPED)
        rec = self.record.devices[device_id]
        rec.status, rec.error = "dropped", error

    def begin_upload(self, device_id: str, task_id: str, payload_bytes: int, offset: int = 0) -> bytearray:
        """Accept the start of an upload, or refuse it (UpdateRejected): the buffer its payload goes into.
        offset > 0 resumes a broken-off upload of the same task from that byte, into the buffer kept."""
        s = self._state.get(device_id)
        if s is None:
            raise UpdateRejected(Refusal.PRECONDITION, f"device {device_id} was not sampled in round {self.number}")
        if not self._open or self.full:
            raise UpdateRejected(Refusal.PRECONDITION, self.closed_reason())
        if s is _S.ACCEPTED:
            raise UpdateRejected(Refusal.EXISTS, f"device {device_id} already uploaded for round {self.number}")
        if s is _S.UPLOADING:
            raise UpdateRejected(Refusal.EXISTS, f"device {device_id} has an upload for round {self.number} in progress")
        self.check_task_id(device_id, task_id)
        if _S.UPLOADING not in _MOVES[s]:
            raise UpdateRejected(Refusal.PRECONDITION, f"device {device_id} is {s.value} in round {self.number}")
        held = self._partial.get(device_id)
        if offset:
            have = held[2] if held is not None and held[0] == task_id and len(held[1]) == payload_bytes else 0
            if have != offset:
                raise UpdateRejected(Refusal.PRECONDITION, f"resume at byte {offset}, but the server holds {have} "
                                                           f"bytes of this upload (ask UploadOffset)")
            buf = held[1]
        else:  # one buffer of the declared size, filled in place (calloc'd: a false claim costs nothing)
            buf = bytearray(payload_bytes)
            self.record.devices[device_id].upload_started_at = self._now()
        self._partial.pop(device_id, None)
        self._move(device_id, _S.UPLOADING)
        return buf

    def upload_broke(self, device_id: str, task_id: str, buf: bytearray, got: int, wire_bytes: int) -> None:
        """The upload broke off after `got` payload bytes: they are kept until the round closes, for a resume."""
        self._move(device_id, _S.BROKEN_OFF)
        if self._open:
            self._partial[device_id] = (task_id, buf, got)
        self.record.devices[device_id].bytes_up += wire_bytes

    def check_task_id(self, device_id: str, task_id: str) -> None:
        """An upload must answer a task handed to its device in this round whose update was not yet accepted
        (a replayed, another round's or another device's id is refused)."""
        if task_id not in self._task_ids.get(device_id, ()):
            raise UpdateRejected(Refusal.PRECONDITION, f"round {self.number}: the upload's task id {task_id[:16]!r} "
                                                       f"was not handed to device {device_id} in this round, or its "
                                                       f"update was accepted already")

    def check(self, device_id: str, payload: bytes, num_examples: int) -> Delta:
        """The delta of an upload, in the form it travelled (RoundEngine.decode_update), checked against this
        device's own plan, or UpdateRejected. Only reads: a driver may run it outside its lock. A secure round's
        upload is its masked ring vector (its example count travels inside it)."""
        if self.secure is not None:
            try:
                return codec.decode_ring(payload, bits=self.secure.setup.bits, count=self.secure.setup.length)
            except codec.CodecError as e:
                raise UpdateRejected(Refusal.INVALID, f"masked upload: {e}") from None
        self.engine.check_examples(device_id, num_examples)
        return self.engine.decode_update(self.plans[device_id], payload)

    def accept(self, device_id: str, delta: Delta, num_examples: int, train_loss: float,
               times: PhaseTimes, wire_bytes: int, evaluation: tuple[int, float, float] = (0, 0.0, 0.0),
               peak_rss_mb: float = 0.0) -> None:
        """Aggregate a checked upload. If the round closed or filled while it was checked, the upload is
        rejected instead (UpdateRejected). `evaluation`: (examples, loss, accuracy) of the device's federated
        evaluation, if it ran one; `peak_rss_mb`: the memory the device reports."""
        if not self._open or self.full:
            self.reject(device_id, self.closed_reason(), wire_bytes)
            raise UpdateRejected(Refusal.PRECONDITION, self.closed_reason())
        if self.secure is not None:  # masked: no norm to see; refused (UpdateRejected) before it counts
            self.secure.add(device_id, delta)
            norm = float("nan")
        else:
            aggregator = self.engine.aggregator
            norm = global_norm(delta)  # recorded, and what clipping scales by
            self.agg.add(aggregator.clip(delta, norm),
                         aggregator.weight(self.engine.counted_examples(device_id, num_examples)))
        self._move(device_id, _S.ACCEPTED)
        self._task_ids.pop(device_id, None)  # every id it was given is spent
        rec = self.record.devices[device_id]
        rec.status, rec.error = "completed", ""
        rec.num_examples, rec.train_loss, rec.bytes_up = num_examples, train_loss, rec.bytes_up + wire_bytes
        rec.download_s, rec.train_s, rec.encode_s, rec.upload_s = (times.download_s, times.train_s,
                                                                    times.encode_s, times.upload_s)
        rec.upload_done_at = self._now()
        rec.update_norm = norm
        rec.eval_examples, rec.eval_loss, rec.eval_accuracy = evaluation
        rec.peak_rss_mb = peak_rss_mb

    def reject(self, device_id: str, message: str, wire_bytes: int) -> None:
        """The device's upload was refused (it may fetch its task again)."""
        self._move(device_id, _S.REJECTED)
        rec = self.record.devices[device_id]
        rec.status, rec.error = "rejected", message
        rec.bytes_up += wire_bytes

    def closed_reason(self) -> str:
        if self.full and self.target < len(self.sampled):
            return f"round {self.number} closed: its {self.target} updates have arrived (over-selection)"
        return f"round {self.number} has closed (deadline passed, or every device it waited for went offline)"

    def close(self) -> None:
        """No more uploads. A sampled device that never delivered is `late` when the round had its K updates
        without it (over-selection), `dropped` otherwise; a refused one stays `rejected`. (An upload still
        being received is refused when it ends: accept() sees the round closed.)"""
        if not self._open:
            return
        self._open = False
        end = _S.LATE if self.full else _S.DROPPED
        for d in self.sampled:
            if end in _MOVES[self._state[d]]:  # never delivered; an upload under way is refused at its end
                self._move(d, end)
                self.record.devices[d].status = end.value
        self._partial.clear()

    def measured_devices(self) -> dict:
        """ServerState.devices after this round: link rates and bytes per sent entry of every device that
        delivered, measured on this round's transfers (upload: the server's clock, first to last chunk;
        download: the device's report), merged over what earlier rounds measured."""
        out = {d: dict(v) for d, v in self.state.devices.items()}
        for d in self.done:
            rec, plan = self.record.devices[d], self.plans[d]
            info = out.setdefault(d, {})
            if rec.upload_s > 0 and rec.bytes_up > 0:
                info["uplink_bps"] = 8.0 * rec.bytes_up / rec.upload_s
            if rec.download_s > 0 and rec.bytes_down > 0:
                info["downlink_bps"] = 8.0 * rec.bytes_down / rec.download_s
            if plan.task.upload.format == UploadFormat.TOPK and rec.bytes_up:
                info["up_bytes_per_entry"] = rec.bytes_up / max(1, topk_count(plan.entries, plan.task.upload.density))
            if plan.instruction.download_density < 1 and rec.bytes_down:
                info["down_bytes_per_entry"] = rec.bytes_down / max(1, topk_count(plan.entries,
                                                                                  plan.instruction.download_density))
        return out


class RoundEngine:
    def __init__(self, run: RunConfig, method: Method, host: ModelHost) -> None:
        self.run = run
        self.method = method
        self.host = host
        self.aggregator = make_aggregator(run)
        self.dp: DpRound | None = None  # distributed DP's parameters, as the last secure round planned them
        self._secure_upload: tuple[tuple, SecureUpload] | None = None  # the round's, made once for all its devices
        self._footprints: dict = {}  # edgelora.memory.Footprint per structure

    @cached_property
    def partition_sizes(self) -> list[int]:
        return partition_sizes(self.run.data, self.run.model.task)

    def check_examples(self, device_id: str, num_examples: int) -> None:
        """Partitions: FedAvg weights come from the partition the config assigns, never from what a device
        claims. Own data: a device must have trained on something (the count is capped when weighted)."""
        if self.run.data.mode == "own":
            if num_examples < 1:
                raise UpdateRejected(Refusal.INVALID, f"num_examples {num_examples}: an update must come from >= 1 example")
            return
        expected = self.partition_sizes[int(device_id)]
        if num_examples != expected:
            raise UpdateRejected(Refusal.INVALID, f"num_examples {num_examples} != {expected}, the size of device "
                                            f"{device_id}'s partition")

    def counted_examples(self, device_id: str, num_examples: int) -> int:
        """The example count FedAvg weighs an accepted update by: own data caps what a device reports at
        server.max_examples_per_device (and says so)."""
        cap = self.run.server.max_examples_per_device
        if self.run.data.mode == "own" and num_examples > cap:
            log.warning("device %s reports %d examples; weighted at server.max_examples_per_device = %d",
                        device_id, num_examples, cap)
            return cap
        return num_examples

    def init_state(self, rng_state: dict) -> ServerState:
        stage = self.method.initial_stage()
        params = self.method.init_params(self.host, stage)
        return ServerState(round=0, stage=stage, stage_start=1, params=params, rng=rng_state)

    def open_round(self, state: ServerState, sampled: list[str], rng_state: dict,
                   devices: dict[str, DeviceInfo]) -> Round:
        return Round(self, state, sampled, rng_state, devices)

    def footprint(self, structure, state: ServerState) -> memory.Footprint:
        """What the memory model needs of `structure` (trained from `state`'s params) on this run's model, read
        from the server's base once (nothing built: Register's handlers call this beside the round)."""
        if structure not in self._footprints:
            trainable = sum(int(np.size(v)) for v in state.params.values())
            self._footprints[structure] = memory.Footprint.of(self.host.base, structure, trainable,
                                                              self.run.model.task == "causal-lm")
        return self._footprints[structure]

    def fit_memory(self, task: Task, device: DeviceInfo, state: ServerState) -> memory.Fit:
        """The task's train spec fitted to the memory the device declared (edgelora.memory.fit). A device that
        registered under a plan that fit, and that no plan fits now (another stage's structure), gets the
        smallest plan there is, marked as over its budget."""
        if device.memory_mb <= 0:
            return memory.Fit(task.train, "", 0.0, False)
        declared = memory.Declared(device.memory_mb, device.resident_mb)
        fp = self.footprint(task.structure, state)
        fitted = memory.fit(task.train, fp, self.run.model.max_seq_len, declared)
        if fitted is None:
            fitted = memory.frugal(task.train, fp, self.run.model.max_seq_len, declared)
            fitted = dataclasses.replace(fitted, plan=fitted.plan + OVER_BUDGET)
        return fitted

    def plan(self, state: ServerState, ins: Instruction) -> DevicePlan:
        task = ins.task
        payload = codec.encode_bundle(self.method.download(state, ins), value_type=self.method.download_value_type())
        shapes = {n: tuple(v.shape) for n, v in state.params.items()}
        masked = frozenset(n for n in shapes if is_masked(n, task.structure)) \
            if task.upload.format == UploadFormat.MASKED else frozenset()
        return DevicePlan(ins, payload, shapes, masked)

    # -- secure aggregation ------------------------------------------------------------------------------------
    def with_secure_upload(self, state: ServerState, ins: Instruction, sampled: int) -> Instruction:
        """The instruction with its upload made secure: the same coordinates for the whole round (the mask for
        masked uploads, every entry for dense ones, secure.coordinates for top-k), fixed point in a ring sized
        for `sampled` devices. Made once a round (every device of it gets the same; choosing aggregate-topk's
        set reads every trainable entry)."""
        rule = ins.task.upload
        key = (state.round, rule, sampled)
        if self._secure_upload is None or self._secure_upload[0] != key:
            self._secure_upload = key, self._make_secure_upload(state, ins, sampled)
        task = dataclasses.replace(ins.task, upload=dataclasses.replace(rule, secure=self._secure_upload[1]))
        return dataclasses.replace(ins, task=task)

    def _make_secure_upload(self, state: ServerState, ins: Instruction, sampled: int) -> SecureUpload:
        cfg, rule = self.run.secure, ins.task.upload
        # Weighted FedAvg: devices weigh min(examples, cap) / cap. Under distributed DP every device weighs 1:
        # a summed count would be released without noise.
        cap = 0
        if getattr(self.run.aggregator, "weighted", False) and cfg.noise_multiplier == 0:
            cap = max(self.partition_sizes) if self.run.data.mode == "partitions" else self.run.server.max_examples_per_device
        seed = int(np.random.SeedSequence([self.run.server.seed, state.round + 1]).generate_state(1, np.uint64)[0] >> 1)
        shapes = {n: tuple(v.shape) for n, v in state.params.items()}
        up = coords.secure_upload(rule, cfg.coordinates,
                                  plan_ring(sampled, cfg.value_bits, cfg.clip, weight_cap=cap, l2_clip=cfg.l2_clip),
                                  seed, shapes=shapes, last=state.last_update, explore=cfg.explore,
                                  weights=cfg.explore_weights)
        if cfg.noise_multiplier > 0:  # each device's share of the noise, sized for the fewest survivors
            masked = frozenset(n for n in shapes if is_masked(n, ins.task.structure))
            self.dp = DpRound(noise_multiplier=cfg.noise_multiplier, l2_clip=cfg.l2_clip, scale=up.ring.scale,
                              dimension=coords.count(up, shapes, ins.task.structure, masked),
                              min_survivors=max(secure_threshold(self.run, sampled)[1], self.run.server.min_devices),
                              devices=sampled)
            up = dataclasses.replace(up, ring=plan_ring(sampled, cfg.value_bits, cfg.clip, l2_clip=cfg.l2_clip,
                                                        noise_stddev=self.dp.stddev))
        return up

    def privacy_spent(self, rounds: int) -> float | None:
        """Epsilon after `rounds` rounds: distributed DP's (secure.noise_multiplier), else the aggregator's."""
        if self.dp is not None:
            return self.dp.epsilon(rounds, self.run.secure.dp_delta)
        return self.aggregator.privacy_spent(rounds)

    def secure_round(self, number: int, sampled: list[str], plans: dict[Instruction, DevicePlan]) -> SecureRound:
        """The round's protocol, once its one plan is made: the coordinate set S (derived as devices derive
        it), the ring vector's length, and the setup every device is prompted with."""
        if len(plans) != 1:
            raise ValueError(f"a secure round needs one plan for every device; this one has {len(plans)}")
        plan = next(iter(plans.values()))
        up, structure = plan.task.upload.secure, plan.task.structure
        download = None
        if up.coordinates is Coordinates.DOWNLOAD_TOPK:  # as devices decode it
            download = {n: codec.to_dense(n, t) for n, t in codec.decode_bundle(plan.payload).items()}
        masked = frozenset(n for n in plan.shapes if is_masked(n, structure))
        sets = coords.coordinate_sets(up, plan.shapes, structure, masked, download)
        k, t = secure_threshold(self.run, len(sampled))
        setup = sa.Setup(round=number, session=secrets.token_bytes(16), devices=tuple(sampled), neighbours=k,
                         threshold=t, graph_seed=up.seed ^ number, bits=up.ring.bits,
                         length=ring_length(coords.size(sets, plan.shapes), up.ring))
        return SecureRound(setup, up, sets, plan.shapes)

    def decode_update(self, plan: DevicePlan, payload: bytes) -> Delta:
        """Validate an upload against the round's plan and return its delta, or raise UpdateRejected. Each
        tensor keeps the size it travelled at (sent_form): a top-k or masked upload is never made dense here,
        so the server's work per upload grows with the entries sent, not with the model."""
        try:
            flat = codec.decode_flat(payload, max_elements=max(1, plan.entries))
        except codec.CodecError as e:
            raise UpdateRejected(Refusal.INVALID, f"payload: {e}") from None
        if (plan.task.upload.format == UploadFormat.TOPK and flat.all_sparse
                and flat.names == plan.layout.names and flat.shapes == plan.layout.shapes):
            return self._flat_topk(plan, flat)
        tensors = flat.tensors()
        missing = sorted(set(plan.shapes) - set(tensors))
        extra = sorted(set(tensors) - set(plan.shapes))
        if extra:
            raise UpdateRejected(Refusal.INVALID, f"unknown tensor name(s) {extra[:3]} (this round trains {len(plan.shapes)} tensors)")
        if missing:
            raise UpdateRejected(Refusal.INVALID, f"missing tensor(s) {missing[:3]}")
        rule = plan.task.upload
        total_nnz = 0
        delta = {}
        for name, t in tensors.items():
            shape = tuple(t.shape)
            if shape != plan.shapes[name]:
                raise UpdateRejected(Refusal.INVALID, f"tensor {name}: shape {shape} != expected {plan.shapes[name]}")
            expected_form = self._expected_form(plan, name)
            if not isinstance(t, expected_form):
                raise UpdateRejected(Refusal.INVALID, f"tensor {name}: sent as {type(t).__name__}, this round expects "
                                                f"{expected_form.__name__} ({rule.format.name} upload)")
            if isinstance(t, codec.Masked):
                s = plan.task.structure
                if t.seed != s.mask_seed or not math.isclose(t.density, s.mask_density, rel_tol=0, abs_tol=1e-12):
                    raise UpdateRejected(Refusal.INVALID, f"tensor {name}: mask (seed {t.seed}, density {t.density}) is "
                                                    f"not this round's (seed {s.mask_seed}, density {s.mask_density})")
            if isinstance(t, codec.Sparse):
                total_nnz += len(t.indices)
            try:
                delta[name] = sent_form(name, t)
            except (codec.CodecError, ValueError) as e:
                raise UpdateRejected(Refusal.INVALID, f"tensor {name}: {e}") from None
            values = t.values  # the entries sent: the peak over them is the dense tensor's (the rest are 0)
            self._check_peak(name, float(np.abs(values).max()) if np.size(values) else 0.0)
        if rule.format == UploadFormat.TOPK:
            self._check_topk_count(plan, total_nnz)
        return delta

    def _check_peak(self, name: str, peak: float) -> None:
        """UpdateRejected if a tensor's largest |delta| passes server.max_update_abs."""
        if peak > self.run.server.max_update_abs:
            raise UpdateRejected(Refusal.INVALID, f"tensor {name}: |delta| reaches {peak:.3g}, above "
                                                  f"server.max_update_abs = {self.run.server.max_update_abs:g}")

    @staticmethod
    def _check_topk_count(plan: DevicePlan, carried: int) -> None:
        """UpdateRejected if a top-k upload carries more entries than its plan's k."""
        k = topk_count(plan.entries, plan.task.upload.density)
        if carried > k:
            raise UpdateRejected(Refusal.INVALID, f"top-k upload carries {carried} entries; this device's plan "
                                                  f"({plan.instruction.describe()}) allows {k}")

    def _flat_topk(self, plan: DevicePlan, flat: codec.Flat) -> FlatSparse:
        """A top-k upload whose tensors are the plan's, in its order, all Sparse (what devices send): checked
        and handed on as one FlatSparse, each check one whole-array step (the codec has checked the indices)."""
        self._check_topk_count(plan, flat.values.size)
        values, cap = flat.values, self.run.server.max_update_abs
        if values.size and max(float(values.max()), -float(values.min())) > cap:  # (the codec refused NaN)
            magnitude = np.abs(values)
            at = int(np.argmax(magnitude > cap))  # the first tensor over the cap
            t = int(np.searchsorted(flat.starts, at, side="right")) - 1
            self._check_peak(flat.names[t], float(magnitude[flat.starts[t]:flat.starts[t + 1]].max()))
        try:
            return FlatSparse(plan.layout, flat.positions, flat.values)
        except ValueError as e:
            raise UpdateRejected(Refusal.INVALID, f"positions: {e}") from None

    @staticmethod
    def _expected_form(plan: DevicePlan, name: str) -> type:
        fmt = plan.task.upload.format
        if fmt == UploadFormat.TOPK:
            return codec.Sparse
        if fmt == UploadFormat.MASKED and name in plan.masked:
            return codec.Masked
        return codec.Dense

    def finish(self, state: ServerState, agg, rng_state: dict, devices: dict | None = None
               ) -> tuple[ServerState, ServerState | None]:
        """Aggregate what arrived and let the method step (an abandoned round never gets here: ServerRun).
        Returns the new state, and the aggregated state before a stage switch replaced it (SLoRA's priming),
        so the round can report the accuracy on both sides; None when no stage ended."""
        aggregated = False
        params, opt_state = state.params, state.opt_state
        if agg.count:
            params, opt_state = self.aggregator.finish(params, agg, opt_state, state.round + 1)
            aggregated = all(np.isfinite(v).all() for v in params.values())
            if not aggregated:  # never commit a broken model
                log.warning("round %d: the aggregate is not finite; weights left unchanged", state.round + 1)
                params, opt_state = state.params, state.opt_state
        new = state.replace(round=state.round + 1, params=params, opt_state=opt_state, rng=rng_state,
                            devices=state.devices if devices is None else devices)
        if aggregated and self._secure_upload is not None \
                and self._secure_upload[1].coordinates is Coordinates.AGGREGATE_TOPK:  # the round chose S from it
            new = new.replace(last_update={n: params[n] - state.params[n] for n in params if n in state.params})
        before = new
        new = self.method.after_round(new, self.host, aggregated)
        if new.stage != before.stage:  # other tensors train now: the last aggregate says nothing of them
            new = new.replace(last_update={})
        if new.round >= self.run.server.rounds:
            new = new.replace(finished=True)
        return new, (before if new.stage != before.stage else None)

    def model_for(self, state: ServerState, host: ModelHost | None = None, base: str = "fp32"):
        """The server's model holding the weights it serves (method.served_params), for evaluation and saving;
        on `host`'s base held as `base` where given (server.run's evaluation on the devices' base)."""
        model = (host or self.host).build(self.method.structure(state), base)
        load_trainable_state(model, self.method.served_params(state))
        return model


@dataclass(frozen=True)
class DpRound:
    """A secure round's distributed DP (edgelora.secagg.dp): every device adds discrete Gaussian noise of
    `stddev` integer units, so any min_survivors of them carry noise_multiplier x the L2 sensitivity."""
    noise_multiplier: float
    l2_clip: float
    scale: float
    dimension: int
    min_survivors: int
    devices: int

    @cached_property
    def stddev(self) -> float:
        return dp.device_noise_stddev(self.noise_multiplier, self.l2_clip, self.scale, self.dimension,
                                      self.min_survivors)

    def epsilon(self, rounds: int, delta: float) -> float:
        """After `rounds` rounds like this one (no amplification by sampling is claimed)."""
        return dp.epsilon(rounds, noise_stddev=self.stddev, l2_clip=self.l2_clip, scale=self.scale,
                          dimension=self.dimension, min_survivors=self.min_survivors, delta=delta,
                          devices=self.devices)


def sent_form(name: str, t: codec.Tensor) -> "np.ndarray | codec.Sparse":
    """A decoded upload tensor as the aggregator takes it, at the size it travelled: Dense -> its float32
    array; Sparse -> itself, its indices checked (check_coordinates); Masked -> its values at the mask's
    indices (mask_positions), as a Sparse. A sparse form that covers every entry becomes the plain array."""
    if isinstance(t, codec.Dense):
        return np.asarray(t.values, np.float32)
    shape, n = tuple(t.shape), math.prod(t.shape)
    values = np.asarray(t.values, np.float32).reshape(-1)
    if isinstance(t, codec.Masked):
        k = codec.mask_size(shape, t.density)
        if values.size != k:
            raise codec.CodecError(f"values: {values.size} values, the mask has {k}")
        if k == n:  # the whole tensor, in order: no mask to derive
            return values.reshape(shape)
        return codec.Sparse(shape, mask_positions(t.seed, name, shape, t.density), values)
    if not isinstance(t, codec.Sparse):
        raise codec.CodecError(f"unknown tensor form {type(t).__name__}")
    check_coordinates(t)
    if values.size == n:  # n strictly increasing indices in [0, n): every entry, in order
        return values.reshape(shape)
    return t


@lru_cache(maxsize=1024)
def mask_positions(seed: int, name: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """The mask's sorted flat indices (codec.mask_indices), derived once per (seed, name, shape, density):
    every device of a round, and every round of a stage, uploads values under the same mask, and deriving it
    hashes every entry of the tensor (the cost sparse aggregation is meant to avoid). Read-only, since the
    cache hands the same array to every upload."""
    positions = codec.mask_indices(seed, name, shape, density)
    positions.flags.writeable = False
    return positions


def stage_name(stage: Stage) -> str:
    return stage.name.lower()
