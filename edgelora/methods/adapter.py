"""Bottleneck-adapter baselines (Houlsby, Pfeiffer), built by edgelora.adapters."""
from __future__ import annotations

from dataclasses import dataclass

from ..configtools import check, field
from ..tasks import AdapterSpec, Structure, StructureKind
from .base import Method, MethodConfig


@dataclass
class HoulsbyConfig(MethodConfig):
    name: str = field("houlsby", "Houlsby adapters")
    bottleneck: int = field(64, "adapter bottleneck width m")

    def validate(self) -> None:
        check(self.bottleneck >= 1, "method.bottleneck", "must be >= 1")


@dataclass
class PfeifferConfig(HoulsbyConfig):
    name: str = field("pfeiffer", "Pfeiffer adapters")


class Houlsby(Method):
    name = "houlsby"
    summary = "Houlsby adapters: bottleneck after attention and after feed-forward; adapters + layer norms + head train"
    Config = HoulsbyConfig

    def structure(self, state):
        return Structure(kind=StructureKind.ADAPTER, adapter=AdapterSpec(kind=self.name, bottleneck=self.cfg.bottleneck))


class Pfeiffer(Houlsby):
    name = "pfeiffer"
    summary = "Pfeiffer adapters: one bottleneck after feed-forward per layer; adapters + head train"
    Config = PfeifferConfig
