"""FLASC (Kuo et al. 2024): dense local LoRA training, sparse communication in both directions.

Download: global top-k by magnitude of the server's LoRA weights (all trainable tensors flattened together,
as in the reference code) at download_density; the device starts from those values, zeros elsewhere.
Upload: global top-k of the device's delta at upload_density. Densities may decay:
d_t = d * decay ** (t // decay_every), t = rounds completed. The one top-k is edgelora.sparsity.global_topk.

Heterogeneous tiers (the reference code's train_sparse_lora_het.py): with `tiers = T`, a device of tier i
(0 = the slowest) gets both densities divided by 4^(T-i-1), so the top tier gets the configured ones; or
`tier_densities` lists [download, upload] per tier. A device's tier is its own (`edgelora client --tier`)
or, when it gives none, the server's assignment: partition index mod T, as the reference assigns them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..configtools import check, field
from ..sparsity import global_topk
from ..tasks import DeviceInfo, UploadFormat, UploadRule
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
    tiers: int = field(1, "device tiers (FLASC's heterogeneous setting): tier i of T gets both densities / 4^(T-i-1); 1 = every device alike")
    tier_densities: list[list[float]] = field([], "[download, upload] density per tier, tier 0 first; overrides the 4^(T-i-1) rule (its length sets tiers)")

    def validate(self) -> None:
        check(0 < self.download_density <= 1, "method.download_density", "must be in (0, 1]")
        check(0 < self.upload_density <= 1, "method.upload_density", "must be in (0, 1]")
        check(self.tiers >= 1, "method.tiers", "must be >= 1")
        if self.tier_densities:
            check(all(isinstance(t, (list, tuple)) and len(t) == 2 and all(0 < float(d) <= 1 for d in t)
                      for t in self.tier_densities), "method.tier_densities",
                  "must be a list of [download, upload] pairs, each density in (0, 1]")
            check(self.tiers in (1, len(self.tier_densities)), "method.tiers",
                  f"is {self.tiers} but tier_densities lists {len(self.tier_densities)} tiers")

    def tier_count(self) -> int:
        return len(self.tier_densities) or self.tiers

    def tier_scale(self, tier: int) -> tuple[float, float]:
        """(download, upload) density of `tier` before decay."""
        if self.tier_densities:
            down, up = self.tier_densities[tier]
            return float(down), float(up)
        f = 4.0 ** (self.tiers - tier - 1)
        return self.download_density / f, self.upload_density / f
        check(0 < self.density_decay <= 1, "method.density_decay", "must be in (0, 1]")
        check(self.decay_every >= 1, "method.decay_every", "must be >= 1")


class Flasc(Lora):
    name = "flasc"
    summary = "FLASC: dense local LoRA; global top-k download and upload at separate densities (optional decay, error feedback)"
    Config = FlascConfig

    def density(self, base: float, state) -> float:
        return base * self.cfg.density_decay ** (state.round // self.cfg.decay_every)

    def tiers(self) -> int:
        return self.cfg.tier_count()

    def tier_of(self, device: DeviceInfo) -> int:
        """The device's own tier, or the server's assignment (partition index mod T) when it gave none."""
        if device.tier is not None:
            return device.tier
        return int(device.device_id) % self.cfg.tier_count() if device.device_id.isdigit() else 0

    def upload_rule(self, state):
        return UploadRule(format=UploadFormat.TOPK, density=self.density(self.cfg.upload_density, state),
                          error_feedback=self.cfg.error_feedback, value_type=self.run.server.value_type)

    def configure(self, state, device):
        ins = super().configure(state, device)
        if self.tiers() == 1:
            return dataclasses.replace(ins, download_density=self.density(self.cfg.download_density, state))
        tier = self.tier_of(device)
        down, up = self.cfg.tier_scale(tier)
        task = dataclasses.replace(ins.task, upload=dataclasses.replace(ins.task.upload, density=self.density(up, state)))
        return dataclasses.replace(ins, task=task, download_density=self.density(down, state), tier=tier)

    def download(self, state, ins):
        return dict(global_topk(state.params, ins.download_density))
