"""Sparse fine-tuning (SFT) and BitFit: full-model structures where only a subset of entries trains.

SFT (SLoRA Sec. 4.1, the Stage-1 building block): the server draws ONE data-independent random mask from
`mask_seed`, the same density for every tensor; the seed travels in the task, the mask never does. Devices
train only the masked entries (plus the classifier, densely) and upload values only (codec.Masked).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgelora import codec

from ..configtools import check, field
from ..models import is_masked
from ..sparsity import mask_bool
from ..tasks import Structure, StructureKind, UploadFormat
from .base import Method, MethodConfig


@dataclass
class SftConfig(MethodConfig):
    name: str = field("sft", "random-mask sparse fine-tuning")
    density: float = field(0.013, "fraction of each tensor's entries in the mask (the SLoRA paper runs SFT at the final adapter's density, ~1.3 %)")
    mask_seed: int = field(1, "seed of the random mask; sent in every task, both sides derive the mask from it")
    dense_patterns: list[str] = field(["head"], "module names trained densely, outside the mask; \"head\" = the task's head (classification: the classifier; causal-lm: none)")

    def validate(self) -> None:
        check(0 < self.density <= 1, "method.density", "must be in (0, 1]")


def masked_structure(density: float, seed: int, dense_patterns) -> Structure:
    """Full model under a random mask (density 1 = FLoRA's Stage 1: no mask at all)."""
    if density >= 1:
        return Structure(kind=StructureKind.FULL)
    return Structure(kind=StructureKind.FULL, mask_density=density, mask_seed=seed,
                     dense_patterns=tuple(dense_patterns))


def masked_download(params: dict[str, np.ndarray], structure: Structure) -> dict[str, codec.Tensor]:
    """Values at the mask for masked tensors (the device fills W0 elsewhere), the rest dense.

    Entries outside the mask never change on the server (every aggregated delta is zero there), so sending
    only the masked values loses nothing."""
    out: dict[str, codec.Tensor] = {}
    for n, v in params.items():
        if is_masked(n, structure):
            m = _server_mask(structure.mask_seed, n, tuple(v.shape), structure.mask_density)
            out[n] = codec.Masked(tuple(v.shape), structure.mask_seed, structure.mask_density,
                                  np.ascontiguousarray(v[m], np.float32))
        else:
            out[n] = codec.Dense(v)
    return out


@lru_cache(maxsize=1024)
def _server_mask(seed: int, name: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """The mask never changes during a run: derive it once, not in every round's download (~0.17 s for
    MiniLM). Read-only, since the cache hands the same array to every round."""
    m = mask_bool(seed, name, shape, density)
    m.flags.writeable = False
    return m


class SparseFineTuning(Method):
    name = "sft"
    summary = "random-mask sparse fine-tuning at density d: one seeded mask, devices upload masked values only"
    Config = SftConfig

    def structure(self, state):
        return masked_structure(self.cfg.density, self.cfg.mask_seed, self.cfg.dense_patterns)

    def upload_rule(self, state):
        fmt = UploadFormat.MASKED if self.cfg.density < 1 else UploadFormat.DENSE
        return self.upload(fmt)

    def download(self, state, ins):
        return masked_download(state.params, ins.task.structure)


@dataclass
class BitFitConfig(MethodConfig):
    name: str = field("bitfit", "BitFit: biases and the classifier head train")


class BitFit(Method):
    name = "bitfit"
    summary = "BitFit (Ben Zaken et al. 2022): only bias terms and the classifier head train and travel"
    Config = BitFitConfig

    def structure(self, state):
        return Structure(kind=StructureKind.BITFIT)
