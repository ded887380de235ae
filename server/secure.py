"""A secure round's coordinator side, beside its Round (server.engine): the SecAgg+ phases (server.secagg's
SecAggServer), the ring and the coordinates every upload of the round uses, and the unmasked sum, which is the
round's accumulator (`count`, `mean()`) for the aggregator, as RunningMean is for a plain round (fedjax's
aggregators: a secure sum is an aggregator, not a special case in the loop).

The round driver (server.driver) runs the phases: advertise -> share -> upload (the round's tasks) -> unmask;
each phase prompts the devices that may still answer (`prompt_for`), takes their answers (`answer`) and is
closed (`close_phase`) when all answered, its deadline passed or nobody is left. No thread here: the driver's
lock is held around every call.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.secagg import coordinates as coords
from edgelora.secagg import messages as sa
from edgelora.secagg.ring import decode_sum

from .secagg import RoundAborted, SecAggServer

log = logging.getLogger("edgelora.server")

ADVERTISE, SHARE, UPLOAD, UNMASK, DONE = "advertise", "share", "upload", "unmask", "done"
KEY_PHASES = (ADVERTISE, SHARE)


class SecureRound:
    def __init__(self, setup: sa.Setup, upload, sets: coords.CoordinateSets, shapes: dict[str, tuple[int, ...]]):
        self.protocol = SecAggServer(setup)
        self.setup = setup
        self.upload = upload            # tasks.SecureUpload: what every device of the round was told
        self.sets = sets
        self.shapes = shapes
        self.count = 0                  # devices in the unmasked sum (0 until it is unmasked, or if it cannot be)
        self.weight = 0.0               # their summed weight
        self.aborted = ""               # why the round could not yield a sum
        self._mean: dict[str, np.ndarray] | None = None
        self._deadline = 0.0
        self._clock: Callable[[], float] = time.monotonic

    # -- phases ------------------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.protocol.phase

    def open_phase(self, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """The phase under way closes deadline_s from now on `clock` (the upload phase keeps the round's own)."""
        self._clock = clock
        self._deadline = clock() + deadline_s

    def time_left(self) -> float:
        return max(0.0, self._deadline - self._clock())

    def waiting(self) -> frozenset[str]:
        """Devices the phase under way still waits for."""
        return self.protocol.expected() - self.protocol.answered()

    def prompt_for(self, device_id: str) -> "sa.Setup | sa.PeerKeys | sa.UnmaskRequest | None":
        """What the device is to answer now (None: nothing, in this phase)."""
        if device_id not in self.waiting():
            return None
        phase = self.phase
        if phase == ADVERTISE:
            return self.protocol.setup()
        if phase == SHARE:
            return self.protocol.peers_for(device_id)
        if phase == UNMASK:
            return self.protocol.unmask_request()
        return None

    def answer(self, device_id: str, msg: "sa.Advertise | sa.ShareOut | sa.UnmaskReply") -> None:
        """A device's answer to its prompt, or UpdateRejected naming what was wrong."""
        if msg.device != device_id:
            raise UpdateRejected(Refusal.INVALID, f"device {device_id} sent a message signed as {msg.device!r}")
        expected = {ADVERTISE: sa.Advertise, SHARE: sa.ShareOut, UNMASK: sa.UnmaskReply}.get(self.phase)
        if expected is None or not isinstance(msg, expected):
            raise UpdateRejected(Refusal.PRECONDITION, f"round {self.setup.round} is in its {self.phase} phase; "
                                                       f"a {type(msg).__name__} does not belong to it")
        if isinstance(msg, sa.Advertise):
            self.protocol.advertise(msg)
        elif isinstance(msg, sa.ShareOut):
            self.protocol.share(msg)
        else:
            self.protocol.unmask(msg)

    def close_phase(self) -> None:
        """End the phase under way: those who did not answer are dropped from the protocol (RoundAborted when
        too few are left). Closing the unmask phase unmasks the sum."""
        phase = self.phase
        if phase == ADVERTISE:
            self.protocol.close_advertise()
        elif phase == SHARE:
            self.protocol.close_share()
        elif phase == UPLOAD:
            self.protocol.close_uploads()
        elif phase == UNMASK:
            self._unmask()

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.count = 0

    def masking_input_for(self, device_id: str) -> sa.MaskingInput:
        return self.protocol.masking_input_for(device_id)

    def may_upload(self, device_id: str) -> bool:
        """The device's keys and shares went through: it may be given its task and upload."""
        return self.phase == UPLOAD and device_id in self.protocol.shared

    # -- the accumulator -------------------------------------------------------------------------------------
    def add(self, device_id: str, vector: np.ndarray) -> None:
        self.protocol.add_masked(device_id, vector)

    def _unmask(self) -> None:
        total = self.protocol.result()
        survivors = len(self.protocol.survivors)
        sums, weight = decode_sum(total, self.upload.ring, survivors=survivors)  # unweighted: weight = survivors
        if weight <= 0:
            raise RoundAborted("the unmasked example counts sum to 0")
        self._mean = coords.scatter(sums / weight, self.sets, self.shapes)
        self.count, self.weight = survivors, weight

    def mean(self) -> dict[str, np.ndarray]:
        if self._mean is None:
            raise ValueError(f"round {self.setup.round}: no unmasked sum ({self.aborted or 'not unmasked yet'})")
        return self._mean
