"""train.precision: config validation, what `auto` resolves to, the wire field, and bf16 training that stays
finite with fp32 weights."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgelora.configtools import ConfigError
from edgelora.data import Examples
from edgelora.protos import serde
from edgelora.tasks import TrainSpec
from edgelora.precision import autocast, cpu_has_fast_bf16, resolve_precision
from edgelora.training import train_local


def test_precision_is_validated_with_the_field_named(tiny_config):
    assert tiny_config().train.precision == "auto"
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not one of \['auto', 'fp32', 'bf16'\]"):
        tiny_config(train={"precision": "fp16"})


def test_auto_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    fast = "amx_bf16" in flags or "avx512_bf16" in flags
    assert cpu_has_fast_bf16() is fast
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if fast else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="train.precision: unknown 'half'"):
        resolve_precision("half", torch.device("cpu"))


def test_precision_travels_in_the_train_spec():
    for p in ("auto", "fp32", "bf16"):
        spec = TrainSpec(precision=p, lr=0.01, seed=5)
        assert serde.train_from_proto(serde.train_to_proto(spec)) == spec


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights(tiny_config):
    from edgelora.models import build_model, load_base_model, load_tokenizer
    from edgelora.tasks import Structure

    lin = torch.nn.Linear(4, 3)
    with autocast("bf16", torch.device("cpu")):
        assert lin(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert lin(torch.ones(2, 4)).dtype == torch.float32

    base = load_base_model("tiny-bert", 3, 0)
    model = build_model(base, Structure())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = Examples(tuple(f"example {i} about topic {i % 3}" for i in range(16)), torch.arange(16).remainder(3).numpy())
    loss = train_local(model, ex, load_tokenizer("tiny-bert"), TrainSpec(batch_size=8, lr=1e-3, precision="bf16"),
                       16, torch.device("cpu"))
    assert math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "bf16 training changed nothing"
