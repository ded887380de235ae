"""A method is a handful of server-side decisions with no I/O (Flower's Strategy): which structure devices
train, what goes down, how devices upload, and what happens between stages. The device is a generic
executor of those decisions (edgelora.edge_client.trainer), so a new method never touches the transport."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgelora import codec

from ..configtools import field
from ..models import ModelHost, trainable_state
from ..state import ServerState
from ..tasks import DeviceInfo, Stage, Structure, StructureKind, Task, TrainSpec, UploadFormat, UploadRule

if TYPE_CHECKING:  # config loads method configs (load_config), so methods never import config
    from ..schema import RunConfig


@dataclass(frozen=True)
class Instruction:
    """A method's decision for one device and round (Flower's FitIns): the task it trains, and how much of
    the server's weights go down (FLASC's download density; 1 = all). Devices given equal instructions share
    one encoded download."""
    task: Task
    download_density: float = 1.0
    tier: int | None = None          # the device's tier, where the method plans by tier (FLASC)

    def describe(self) -> str:
        tier = f"tier {self.tier}, " if self.tier is not None else ""
        return f"{tier}download density {self.download_density:g}, upload density {self.task.upload.density:g}"


@dataclass
class MethodConfig:
    name: str = field("lora", "the method (see `edgelora methods`)")
    default_value_type: ClassVar[str] = "float32"  # server.value_type when a run leaves it empty

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
    def configure(self, state: ServerState, device: DeviceInfo) -> Instruction:
        """What `device` trains in the round after `state` (by default the same for every device)."""
        # own data: devices score the model they receive on their held-out part every eval_every rounds
        evaluate = self.run.data.mode == "own" and state.round % self.run.server.eval_every == 0
        return Instruction(Task(round=state.round + 1, stage=state.stage, method=self.name,
                                structure=self.structure(state), train=self.train_spec(state),
                                upload=self.upload_rule(state), deadline_s=self.run.server.round_deadline_s,
                                evaluate=evaluate))

    def tiers(self) -> int:
        """How many device tiers this method plans for (a device may name one in 0..tiers-1)."""
        return 1

    def initial_stage(self) -> Stage:
        return Stage.DENSE

    def structure(self, state: ServerState) -> Structure:
        raise NotImplementedError

    def stage_rounds(self, state: ServerState) -> tuple[int, int]:
        """(first, last) round of the stage `state` is in: the span a learning-rate schedule runs over."""
        return 1, self.run.server.rounds

    def stage_lr(self, state: ServerState) -> float:
        """The device learning rate at the start of the current stage."""
        return self.run.train.lr

    def round_lr(self, state: ServerState) -> float:
        """The device learning rate of the round after `state` (train.lr_schedule)."""
        lr = self.stage_lr(state)
        if self.run.train.lr_schedule == "cosine":
            first, last = self.stage_rounds(state)
            progress = (state.round + 1 - first) / max(1, last - first + 1)  # 0 in the first round
            lr *= 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        return lr

    def train_spec(self, state: ServerState) -> TrainSpec:
        t = self.run.train
        return TrainSpec(local_epochs=t.local_epochs, batch_size=t.batch_size, lr=self.round_lr(state),
                         optimizer=t.optimizer,
                         momentum=t.momentum, weight_decay=t.weight_decay, max_steps=t.max_steps,
                         precision=t.precision, gradient_checkpointing=t.gradient_checkpointing,
                         micro_batch_size=t.micro_batch_size, loss_chunk_tokens=t.loss_chunk_tokens,
                         # only a LoRA structure leaves its base frozen; the others train it in fp32
                         base=t.base if self.structure(state).kind == StructureKind.LORA else "fp32",
                         seed=self.run.server.seed * 100_003 + state.round + 1)

    def upload_rule(self, state: ServerState) -> UploadRule:
        return self.upload(UploadFormat.DENSE)

    def download_value_type(self) -> str:
        return self.run.server.download_value_type or self.run.server.value_type

    def upload(self, fmt: UploadFormat, **rule) -> UploadRule:
        """An upload rule of format `fmt` in the run's value type and rounding."""
        server = self.run.server
        return UploadRule(format=fmt, value_type=server.value_type, rounding=server.rounding, **rule)

    def download(self, state: ServerState, ins: Instruction) -> dict[str, codec.Tensor]:
        """What a device given `ins` receives: by default the global trainable weights."""
        return {n: codec.Dense(v) for n, v in state.params.items()}

    # -- state ----------------------------------------------------------------------------------------------
    def served_params(self, state: ServerState) -> dict[str, np.ndarray]:
        """The weights the run is scored and saved with: what a device would receive (the global weights
        themselves, except where the download is lossy, as FLASC's top-k is)."""
        return state.params

    def initial_structure(self) -> Structure:
        """What devices train in the run's first round (sent in the run spec, so they build it up front)."""
        return self.structure(_probe(self.initial_stage()))

    def init_params(self, host: ModelHost, stage: Stage) -> dict[str, np.ndarray]:
        return trainable_state(host.build(self.structure(_probe(stage))))

    def after_round(self, state: ServerState, host: ModelHost, aggregated: bool) -> ServerState:
        """Called after each counted round (aggregated False when its aggregate was not finite: weights unchanged)."""
        return state


def _probe(stage: Stage) -> ServerState:
    return ServerState(round=0, stage=stage, stage_start=1, params={})
