"""FLASC (Kuo et al. 2024): dense local LoRA training, sparse communication in both directions.

Download: global top-k by magnitude of the server's LoRA weights (all trainable tensors flattened together,
as in the reference code) at download_density; the device starts from those values, zeros elsewhere.
Upload: global top-k of the device's delta at upload_density. Densities may decay:
d_t = d * decay ** (t // decay_every), t = rounds completed. The one top-k is edgelora.sparsity.global_topk.

Heterogeneous tiers (the reference code's train_sparse_lora_het.py): with `tiers = T`, a device of tier i
(0 = the slowest) gets both densities divided by 4^(T-i-1), so the top tier gets the configured ones; or
`tier_densities` lists [download, upload] per tier. A device's tier is its own (`edgelora client --tier`)
or, when it gives none, the server's assignment: partition index mod T, as the reference assigns them.

Bandwidth-aware densities (`density_policy = "deadline"`; none of the papers has it): each device gets the
largest density in [min_density, max_density], each way, whose transfer fits its share of the round deadline
(transfer_fraction x server.round_deadline_s, half down, half up) at its link rate: the rate the server
measured on its last round or, before any, the one it declared (`link_rates = "declared"` uses only that,
so a simulated and a gRPC run plan alike). Size = entries x bytes per entry, measured on the device's last
sparse transfer or, before any, the value's bytes + 2 for its index. A device with no known rate gets the
configured densities.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from edgelora import codec

from ..configtools import check, field
from ..sparsity import global_topk
from ..tasks import DeviceInfo, UploadFormat
from .baselines import Lora, LoraConfig, LoraMethodConfig


@dataclass
class FlascConfig(LoraMethodConfig):
    # 4-bit blockwise values both ways: at 1/4 the accuracy of float32 top-k at a quarter of its bytes
    # (docs/communication.md)
    default_value_type: ClassVar[str] = "int4_block"
    name: str = field("flasc", "FLASC: LoRA with sparse (top-k) download and upload")
    download_density: float = field(0.25, "fraction of the server's LoRA entries sent down (global top-k by magnitude)")
    upload_density: float = field(0.25, "fraction of the device delta's entries sent up (global top-k by magnitude)")
    density_decay: float = field(1.0, "multiply both densities by this every decay_every rounds (1 = constant)")
    decay_every: int = field(1, "rounds between density decays")
    error_feedback: bool = field(True, "devices keep what top-k and the value type's rounding did not send and add it to their next delta (on by default: level at 1/4, ahead at 1/8 and 1/16 in docs/communication.md)")
    eval_masked: bool = field(True, "score and save the model as devices download it: the server's top-k at download_density (decayed as in the round that made it; the top tier's) in the download's value type, as the reference code's --eval-masked does; false = the dense server weights, which no device ever trains from")
    lora: LoraConfig = field(LoraConfig(rank=16, alpha=16.0, dropout=0.1), "LoRA hyperparameters (FLASC: r = 16, alpha 16, dropout 0.1)")
    tiers: int = field(1, "device tiers (FLASC's heterogeneous setting): tier i of T gets both densities / 4^(T-i-1); 1 = every device alike")
    tier_densities: list[list[float]] = field([], "[download, upload] density per tier, tier 0 first; overrides the 4^(T-i-1) rule (its length sets tiers)")
    density_policy: Literal["fixed", "deadline"] = field("fixed", "fixed: the configured (or tier) densities; deadline: per device, the largest density whose transfer fits its share of the round deadline at its link rate")
    min_density: float = field(1 / 256, "deadline policy: the sparsest a device is sent or asked to send")
    max_density: float = field(1.0, "deadline policy: the densest")
    transfer_fraction: float = field(0.5, "deadline policy: share of server.round_deadline_s a device's transfers may take (half down, half up)")
    link_rates: Literal["measured", "declared"] = field("measured", "deadline policy: measured = the rates measured on the device's last round, else declared; declared = only what the device declared at Register (client --uplink-mbps)")

    def validate(self) -> None:
        check(0 < self.download_density <= 1, "method.download_density", "must be in (0, 1]")
        check(0 < self.upload_density <= 1, "method.upload_density", "must be in (0, 1]")
        check(self.tiers >= 1, "method.tiers", "must be >= 1")
        check(0 < self.density_decay <= 1, "method.density_decay", "must be in (0, 1]")
        check(self.decay_every >= 1, "method.decay_every", "must be >= 1")
        if self.tier_densities:
            check(all(isinstance(t, (list, tuple)) and len(t) == 2 and all(0 < float(d) <= 1 for d in t)
                      for t in self.tier_densities), "method.tier_densities",
                  "must be a list of [download, upload] pairs, each density in (0, 1]")
            check(self.tiers in (1, len(self.tier_densities)), "method.tiers",
                  f"is {self.tiers} but tier_densities lists {len(self.tier_densities)} tiers")
        check(0 < self.min_density <= self.max_density <= 1, "method.min_density/max_density",
              "must satisfy 0 < min_density <= max_density <= 1")
        check(0 < self.transfer_fraction <= 1, "method.transfer_fraction", "must be in (0, 1]")
        check(self.density_policy == "fixed" or self.tier_count() == 1, "method.density_policy",
              "deadline plans each device from its link rate; it does not combine with tiers")

    def tier_count(self) -> int:
        return len(self.tier_densities) or self.tiers

    def tier_scale(self, tier: int) -> tuple[float, float]:
        """(download, upload) density of `tier` before decay."""
        if self.tier_densities:
            down, up = self.tier_densities[tier]
            return float(down), float(up)
        f = 4.0 ** (self.tiers - tier - 1)
        return self.download_density / f, self.upload_density / f


class Flasc(Lora):
    name = "flasc"
    summary = "FLASC: dense local LoRA; global top-k download and upload at separate densities (optional decay, error feedback)"
    Config = FlascConfig

    def density(self, base: float, state) -> float:
        """`base` decayed for the round that opens at `state` (t = state.round rounds completed)."""
        return self._decayed(base, state.round)

    def _decayed(self, base: float, completed: int) -> float:
        return base * self.cfg.density_decay ** (completed // self.cfg.decay_every)

    def tiers(self) -> int:
        return self.cfg.tier_count()

    def tier_of(self, device: DeviceInfo) -> int:
        """The device's own tier, or the server's assignment (partition index mod T) when it gave none."""
        if device.tier is not None:
            return device.tier
        return int(device.device_id) % self.cfg.tier_count() if device.device_id.isdigit() else 0

    def upload_rule(self, state):
        return self.upload(UploadFormat.TOPK, density=self.density(self.cfg.upload_density, state),
                           error_feedback=self.cfg.error_feedback)

    def configure(self, state, device):
        ins = super().configure(state, device)
        if self.cfg.density_policy == "deadline":
            return self._fit_to_deadline(state, device, ins)
        if self.tiers() == 1:
            return dataclasses.replace(ins, download_density=self.density(self.cfg.download_density, state))
        tier = self.tier_of(device)
        down, up = self.cfg.tier_scale(tier)
        task = dataclasses.replace(ins.task, upload=dataclasses.replace(ins.task.upload, density=self.density(up, state)))
        return dataclasses.replace(ins, task=task, download_density=self.density(down, state), tier=tier)

    def download(self, state, ins):
        return dict(global_topk(state.params, ins.download_density))

    def served_params(self, state):
        # At the density the round that made these weights downloaded at: a decay step falling on state.round
        # would score the model (and save the final one) at a density no device has trained from.
        density = self._decayed(self.cfg.download_density, max(0, state.round - 1))
        if not self.cfg.eval_masked or density >= 1:
            return state.params
        sent = global_topk(state.params, density)
        if self.download_value_type() != "float32":  # as devices decode it: the value type's rounding too
            sent = codec.decode_bundle(codec.encode_bundle(sent, value_type=self.download_value_type()))
        return {n: codec.to_dense(n, t) for n, t in sent.items()}

    def _fit_to_deadline(self, state, device: DeviceInfo, ins):
        cfg = self.cfg
        entries = sum(v.size for v in state.params.values())
        budget_s = cfg.transfer_fraction * self.run.server.round_deadline_s / 2
        up_entry = codec.bytes_per_value(self.run.server.value_type) + 2.0  # value + its index, before any measurement
        down_entry = codec.bytes_per_value(self.download_value_type()) + 2.0
        measured = cfg.link_rates == "measured"
        up_bps = (device.uplink_bps if measured else 0.0) or device.declared_uplink_bps
        down_bps = (device.downlink_bps if measured else 0.0) or device.declared_downlink_bps
        up = fit_density(up_bps, budget_s, entries, (device.up_bytes_per_entry if measured else 0.0) or up_entry,
                         cfg.min_density, cfg.max_density)
        down = fit_density(down_bps, budget_s, entries,
                           (device.down_bytes_per_entry if measured else 0.0) or down_entry,
                           cfg.min_density, cfg.max_density)
        up = self.density(cfg.upload_density, state) if up is None else up
        down = self.density(cfg.download_density, state) if down is None else down
        task = dataclasses.replace(ins.task, upload=dataclasses.replace(ins.task.upload, density=up))
        return dataclasses.replace(ins, task=task, download_density=down)


def fit_density(rate_bps: float, budget_s: float, entries: int, bytes_per_entry: float, lo: float, hi: float
                ) -> float | None:
    """The density whose top-k of `entries` (bytes_per_entry each) crosses a link of rate_bps in budget_s,
    clipped to [lo, hi]; None when the rate is unknown (0)."""
    if rate_bps <= 0:
        return None
    return min(hi, max(lo, rate_bps / 8.0 * budget_s / (entries * bytes_per_entry)))
