"""The run configuration: one typed value (schema.RunConfig), loaded from TOML and validated once at load,
with the method's and the aggregator's own sections resolved by their registries. The schema's names are
re-exported here, where users and the rest of the project import them from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .configtools import ConfigError, check, from_dict
from .frozen_base import check_base
from .methods import method_config_from_dict, resolve_head
from .schema import (  # noqa: F401 (users' path)
    DataConfig,
    ModelConfig,
    RunConfig,
    SecureConfig,
    ServerConfig,
    SimulateConfig,
    TrainConfig,
    aggregator_config_from_dict,
    read_run_toml,
)
from .secagg.graph import neighbour_count
from .task_types import task_type


def load_config(source: str | Path | dict | None = None) -> RunConfig:
    """Load and validate a run config from a TOML path, a TOML dict, or None (all defaults)."""
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        raw = read_run_toml(source)
    allowed = {"server", "model", "data", "train", "aggregator", "method", "simulate", "secure"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; allowed: {sorted(allowed)}")
    cfg = RunConfig(
        server=from_dict(ServerConfig, raw.get("server"), "server"),
        model=from_dict(ModelConfig, raw.get("model"), "model"),
        data=from_dict(DataConfig, raw.get("data"), "data"),
        train=from_dict(TrainConfig, raw.get("train"), "train"),
        aggregator=aggregator_config_from_dict(raw.get("aggregator")),
        method=method_config_from_dict(raw.get("method")),
        simulate=from_dict(SimulateConfig, raw.get("simulate"), "simulate"),
        secure=from_dict(SecureConfig, raw.get("secure"), "secure"),
    )
    task = task_type(cfg.model.task)
    task.check_data(cfg)
    cfg = cfg.replace(method=resolve_head(cfg.method, task.head_modules))
    if not cfg.server.value_type:  # resolved here, so a saved config.toml names the type its run used
        cfg = cfg.replace(server=dataclasses.replace(cfg.server, value_type=cfg.method.default_value_type))
    # Noise lands on every coordinate of the aggregate; a masked upload's devices never receive the entries
    # outside the mask, so server and devices would drift apart there.
    check(not (cfg.aggregator.name == "dp-fedavg" and cfg.method.name in ("sft", "slora")), "aggregator.name",
          f"dp-fedavg adds noise outside {cfg.method.name}'s sparse mask, which devices never receive; use it "
          f"with a dense-update method (lora, flasc, fft, flora, bitfit, adapters)")
    check(cfg.data.mode == "own" or cfg.server.devices_per_round <= cfg.data.num_devices, "server.devices_per_round",
          f"({cfg.server.devices_per_round}) exceeds data.num_devices ({cfg.data.num_devices})")
    if cfg.train.base != "fp32":
        check(cfg.method.name in LORA_METHODS, "train.base",
              f"{cfg.train.base} holds the frozen base under LoRA, and method {cfg.method.name} trains no LoRA; "
              f"use fp32, or one of {', '.join(LORA_METHODS)}")
        try:
            check_base(cfg.train.base)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.secure.enabled:
        check_secure(cfg)
    return cfg


# The methods whose devices train LoRA over a frozen base (SLoRA and FLoRA in their Stage 2): train.base
# applies to them
LORA_METHODS = ("lora", "flasc", "slora", "flora")


def secure_threshold(cfg: RunConfig, n: int) -> tuple[int, int]:
    """(k, t) of a secure round with n sampled devices: each device's neighbours, and the shares that
    reconstruct one of its secrets."""
    k = neighbour_count(n, cfg.secure.neighbours)
    return k, min(k, int(cfg.secure.threshold * k) + 1)


def check_secure(cfg: RunConfig) -> None:
    """What secure aggregation cannot run with, refused at load, one line each: the coordinator never holds
    an individual update, so nothing that needs one can run."""
    agg = cfg.aggregator.name
    check(agg not in ("median", "trimmed-mean"), "aggregator.name",
          f"{agg} needs every device's update, which secure aggregation hides; use fedavg or fedadam")
    check(agg != "dp-fedavg", "aggregator.name",
          "dp-fedavg trusts the server with clipping and noise; with [secure] use its distributed DP "
          "(secure.noise_multiplier, secure.l2_clip)")
    check(not cfg.aggregator.clip_norm, "aggregator.clip_norm",
          "the server cannot clip an update it never sees; use secure.l2_clip (devices clip)")
    check(not cfg.server.save_updates, "server.save_updates",
          "would keep each device's upload; with [secure] the coordinator holds only masked values")
    n = cfg.server.sampled_per_round
    check(n >= 3, "server.devices_per_round", f"secure aggregation needs at least 3 devices a round, got {n}")
    # Any secure.threshold in [0, 1) can be met: t <= k <= n - 1, so a round whose n devices all answer has
    # the t + 1 it needs (secure_threshold).
    tiers = getattr(cfg.method, "tier_count", lambda: 1)()
    check(tiers == 1 and getattr(cfg.method, "density_policy", "fixed") == "fixed", "method.tiers",
          "secure aggregation needs one coordinate set for every device of a round: FLASC's tiers and "
          "deadline densities give devices different ones")
