"""FLASC (Kuo et al. 2024): dense local LoRA training, sparse communication in both directions.

Download: global top-k by magnitude of the server's LoRA weights (all trainable tensors flattened together,
as in the reference code) at download_density; the device starts from those values, zeros elsewhere.
Upload: global top-k of the device's delta at upload_density. Densities may decay:
d_t = d * decay ** (t // decay_every), t = rounds completed. The one top-k is edgelora.sparsity.global_topk.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..configtools import check, field
from ..sparsity import global_topk
from ..tasks import UploadFormat, UploadRule
from .baselines import Lora, LoraConfig, LoraMethodConfig


@dataclass
class FlascConfig(LoraMethodConfig):
    name: str = field("flasc", "FLASC: LoRA with sparse (top-k) download and upload")
    download_density: float = field(0.25, "fraction of the server's LoRA entries sent down (global top-k by magnitude)")
    upload_density: float = field(0.25, "fraction of the device delta's entries sent up (global top-k by magnitude)")
    density_decay: float = field(1.0, "multiply both densities by this every decay_every rounds (1 = constant)")
    decay_every: int = field(1, "rounds between density decays")
    error_feedback: bool = field(False, "devices keep what top-k did not send and add it to their next delta")
    lora: LoraConfig = field(LoraConfig(rank=16, alpha=16.0, dropout=0.1), "LoRA hyperparameters (FLASC: r = 16, alpha 16, dropout 0.1)")

    def validate(self) -> None:
        check(0 < self.download_density <= 1, "method.download_density", "must be in (0, 1]")
        check(0 < self.upload_density <= 1, "method.upload_density", "must be in (0, 1]")
        check(0 < self.density_decay <= 1, "method.density_decay", "must be in (0, 1]")
        check(self.decay_every >= 1, "method.decay_every", "must be >= 1")


class Flasc(Lora):
    name = "flasc"
    summary = "FLASC: dense local LoRA; global top-k download and upload at separate densities (optional decay, error feedback)"
    Config = FlascConfig

    def density(self, base: float, state) -> float:
        return base * self.cfg.density_decay ** (state.round // self.cfg.decay_every)

    def upload_rule(self, state):
        return UploadRule(format=UploadFormat.TOPK, density=self.density(self.cfg.upload_density, state),
                          error_feedback=self.cfg.error_feedback, value_type=self.run.server.value_type)

    def download(self, state):
        return dict(global_topk(state.params, self.density(self.cfg.download_density, state)))
