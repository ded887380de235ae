"""A method is a handful of server-side decisions with no I/O (Flower's Strategy): which structure devices
train, what goes down, how devices upload, and what happens between stages. The device is a generic
executor of those decisions (edgelora.device), so a new method never touches the transport."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import nn

from edgelora import codec

from ..config import RunConfig
from ..configtools import field
from ..models import build_model, trainable_state
from ..state import ServerState
from ..tasks import Stage, Structure, TrainSpec, UploadFormat, UploadRule


class ModelHost:
    """The server's copy of W0 and the structures built on it (for initial weights, priming and evaluation)."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self._built: tuple[Structure, nn.Module] | None = None

    def build(self, structure: Structure) -> nn.Module:
        if self._built is None or self._built[0] != structure:
            self._built = (structure, build_model(self.base, structure))
        return self._built[1]


@dataclass
class MethodConfig:
    name: str = field("lora", "the method (see `edgelora methods`)")

    def validate(self) -> None:
        pass


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig

    def __init__(self, cfg, run: RunConfig) -> None:
        self.cfg = cfg
        self.run = run

    # -- decisions ------------------------------------------------------------------------------------------
    def initial_stage(self) -> Stage:
        return Stage.DENSE

    def structure(self, state: ServerState) -> Structure:
        raise NotImplementedError

    def train_spec(self, state: ServerState) -> TrainSpec:
        t = self.run.train
        return TrainSpec(local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                         momentum=t.momentum, weight_decay=t.weight_decay, max_steps=t.max_steps,
                         precision=t.precision, seed=self.run.server.seed * 100_003 + state.round + 1)

    def upload_rule(self, state: ServerState) -> UploadRule:
        return UploadRule(format=UploadFormat.DENSE, value_type=self.run.server.value_type)

    def download(self, state: ServerState) -> dict[str, codec.Tensor]:
        """What every sampled device receives this round: by default the global trainable weights."""
        return {n: codec.Dense(v) for n, v in state.params.items()}

    # -- state ----------------------------------------------------------------------------------------------
    def init_params(self, host: ModelHost, stage: Stage) -> dict[str, np.ndarray]:
        return trainable_state(host.build(self.structure(_probe(stage))))

    def after_round(self, state: ServerState, host: ModelHost, mean_delta: dict[str, np.ndarray] | None
                    ) -> ServerState:
        """Called after each round's aggregation (mean_delta None when the round was abandoned)."""
        return state


def _probe(stage: Stage) -> ServerState:
    return ServerState(round=0, stage=stage, stage_start=1, params={})
