"""The server's whole state as one explicit value (fedjax's ServerState): what a method steps and the round
driver checkpoints (edgelora.server.checkpoint writes and reads it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .tasks import Stage

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ServerState:
    round: int                       # rounds completed (the next round is round + 1)
    stage: Stage
    stage_start: int                 # first round of the current stage
    params: Arrays                   # global trainable weights, by trainable-parameter name
    opt_state: Arrays = field(default_factory=dict)     # server optimizer (FedAdam m/v/step)
    method_state: Arrays = field(default_factory=dict)  # e.g. SLoRA's accumulated Stage-1 delta
    # The last round's aggregate (new weights - old), kept where secure rounds choose their coordinates from it
    # (secure.coordinates = aggregate-topk); empty otherwise and after a stage switch.
    last_update: Arrays = field(default_factory=dict)
    rng: dict = field(default_factory=dict)             # numpy bit-generator state of device sampling
    finished: bool = False
    # What the server has measured of each device (link rates, bytes per sent entry), by device id: a resumed
    # server plans bandwidth-aware densities as the uninterrupted one would.
    devices: dict = field(default_factory=dict)

    def replace(self, **kw) -> "ServerState":
        return dataclasses.replace(self, **kw)


class RoundsAbandoned(RuntimeError):
    """server.max_abandoned_rounds rounds in a row were abandoned: the run stops, its state saved."""
