"""Full fine-tuning and LoRA: the dense baselines every other method is measured against."""
from __future__ import annotations

from dataclasses import dataclass

from ..configtools import check, field
from ..tasks import LoraSpec, Structure, StructureKind
from .base import Method, MethodConfig


@dataclass
class LoraConfig:
    rank: int = field(8, "LoRA rank r")
    alpha: float = field(8.0, "lora_alpha; peft scales B A by alpha / r")
    dropout: float = field(0.0, "LoRA dropout")
    target_modules: list[str] = field([], "modules that get LoRA ([] = every dense layer of attention and feed-forward blocks)")
    modules_to_save: list[str] = field(["head"], "modules trained fully beside LoRA; \"head\" = the task's head (classification: the classifier; causal-lm: none)")
    rank_pattern: dict[str, int] = field({}, "per-module rank overrides, e.g. {\"pooler.dense\" = 18}")

    def validate(self) -> None:
        check(self.rank >= 1, "method.lora.rank", "must be >= 1")
        check(self.alpha > 0, "method.lora.alpha", "must be > 0")
        check(0 <= self.dropout < 1, "method.lora.dropout", "must be in [0, 1)")

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                        target_modules=tuple(self.target_modules), modules_to_save=tuple(self.modules_to_save),
                        rank_pattern=tuple(sorted(self.rank_pattern.items())))


@dataclass
class FullConfig(MethodConfig):
    name: str = field("fft", "full fine-tuning: every weight trains and travels dense")


class FullFineTuning(Method):
    name = "fft"
    summary = "full fine-tuning: every weight trains and travels dense (FedAvg baseline)"
    Config = FullConfig

    def structure(self, state):
        return Structure(kind=StructureKind.FULL)


@dataclass
class LoraMethodConfig(MethodConfig):
    name: str = field("lora", "federated LoRA (peft); the classifier trains fully")
    lora: LoraConfig = field(LoraConfig(), "LoRA hyperparameters")


class Lora(Method):
    name = "lora"
    summary = "federated LoRA (peft) on every dense attention/feed-forward layer; the classifier trains fully"
    Config = LoraMethodConfig

    def structure(self, state):
        return Structure(kind=StructureKind.LORA, lora=self.cfg.lora.spec())
