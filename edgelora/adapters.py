"""Bottleneck adapters for BERT-style encoders: a small module of our own (no adapters library needed).

Houlsby et al. 2019 (Sec. 2.1, Fig. 2): an adapter after the attention output projection AND after the
feed-forward output projection of every layer, each h + W_up f(W_down h), applied before the residual add
and LayerNorm; trainable: adapters, the layer norms, the classifier head.
Pfeiffer et al. 2021 (AdapterFusion, Sec. 3 "best configuration"): one adapter after the feed-forward block
only; trainable: adapters and the head (layer norms stay frozen).
Which weights train is fixed by the kind (AdapterSpec travels as kind + bottleneck only).
Initialisation is near identity: W_up = 0 makes every adapter exactly the identity at round 0, W_down is
small and seeded so every machine builds the same start.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .configtools import ConfigError
from .tasks import AdapterSpec

ATTN_OUT = re.compile(r".*encoder\.layer\.\d+\.attention\.output$")
FFN_OUT = re.compile(r".*encoder\.layer\.\d+\.output$")
KINDS = {"houlsby": (ATTN_OUT, FFN_OUT), "pfeiffer": (FFN_OUT,)}
HEAD_PARTS = ("classifier", "score")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, gen: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(bottleneck, hidden, generator=gen) * 1e-2)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


class AdaptedDense(nn.Module):
    """The block's output projection followed by its adapter: dense -> adapter (then dropout, + input, LN)."""

    def __init__(self, dense: nn.Linear, adapter: Bottleneck) -> None:
        super().__init__()
        self.dense = dense
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.dense(x))


def add_adapters(model: nn.Module, spec: AdapterSpec, seed: int = 0) -> nn.Module:
    """Insert adapters in place (build_model passes a copy); only adapters (+ LN for houlsby) + head train."""
    if spec is None or spec.kind not in KINDS:
        raise ConfigError(f"structure.adapter.kind: {getattr(spec, 'kind', None)!r}; allowed: {sorted(KINDS)}")
    if spec.bottleneck < 1:
        raise ConfigError("structure.adapter.bottleneck: must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    blocks = [(n, m) for n, m in model.named_modules()
              if any(p.match(n) for p in KINDS[spec.kind]) and isinstance(getattr(m, "dense", None), nn.Linear)]
    if not blocks:
        raise ConfigError(f"method {spec.kind}: bottleneck adapters are built into BERT-style encoder blocks "
                          f"(attention.output, output), and {type(model).__name__} has none: use lora, flasc or "
                          f"another method")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, block in blocks:
        dense = block.dense
        block.dense = AdaptedDense(dense, Bottleneck(dense.out_features, spec.bottleneck, gen))
        for p in block.dense.adapter.parameters():
            p.requires_grad_(True)
        if spec.kind == "houlsby" and hasattr(block, "LayerNorm"):
            for p in block.LayerNorm.parameters():
                p.requires_grad_(True)
    for n, p in model.named_parameters():
        if any(h in n.split(".") for h in HEAD_PARTS):
            p.requires_grad_(True)
    return model
