"""Aggregators: `[aggregator] name = "..."` picks one, as `[method]` picks a method (Flower's strategies,
aggregate.py's pure functions).

An Aggregator has three hooks and no state of its own: `start()` gives the round's accumulator, devices'
deltas (trained - received) are `add`ed to it as they arrive, and `finish(params, acc, opt_state)` returns the
new weights and server-optimizer state, which live in ServerState (checkpointed). FedAvg adds the weighted mean
delta; FedAdam feeds the same mean delta, as a negative pseudo-gradient, to a server AdamW (Reddi et al. 2021,
Alg. 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .configtools import ConfigError, check, field, from_dict

Arrays = dict[str, np.ndarray]


class RunningMean:
    """Weighted running sum: memory is one copy of the weights, whatever the number of devices."""

    def __init__(self) -> None:
        self.sum: Arrays = {}
        self.weight = 0.0
        self.count = 0

    def add(self, delta: Arrays, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        for k, v in delta.items():
            if k in self.sum:
                self.sum[k] += weight * v.astype(np.float64)
            else:
                self.sum[k] = weight * v.astype(np.float64)
        self.weight += weight
        self.count += 1

    def mean(self) -> Arrays:
        if not self.count:
            raise ValueError("no updates to average")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sum.items()}


def fedavg_step(params: Arrays, mean_delta: Arrays) -> Arrays:
    return {k: (v + mean_delta[k]).astype(np.float32) if k in mean_delta else v for k, v in params.items()}


def fedadam_step(params: Arrays, mean_delta: Arrays, opt_state: Arrays, cfg: "FedAdamConfig"
                 ) -> tuple[Arrays, Arrays]:
    """One AdamW step with gradient g = -mean_delta, exactly torch.optim.AdamW's update (bias-corrected)."""
    step = int(opt_state.get("step", np.zeros(1))[0]) + 1
    b1, b2 = cfg.beta1, cfg.beta2
    new_params, new_state = {}, {"step": np.array([step], np.float32)}
    for k, p in params.items():
        g = -mean_delta[k].astype(np.float64) if k in mean_delta else np.zeros_like(p, np.float64)
        m = b1 * opt_state.get(f"m/{k}", np.zeros_like(p)).astype(np.float64) + (1 - b1) * g
        v = b2 * opt_state.get(f"v/{k}", np.zeros_like(p)).astype(np.float64) + (1 - b2) * g * g
        x = p.astype(np.float64) * (1 - cfg.lr * cfg.weight_decay)
        denom = np.sqrt(v / (1 - b2 ** step)) + cfg.eps
        x = x - cfg.lr * (m / (1 - b1 ** step)) / denom
        new_params[k] = x.astype(np.float32)
        new_state[f"m/{k}"], new_state[f"v/{k}"] = m.astype(np.float32), v.astype(np.float32)
    return new_params, new_state


# -- configs ----------------------------------------------------------------------------------------------------
@dataclass
class FedAvgConfig:
    name: str = field("fedavg", "the aggregator (fedavg, fedadam)")
    weighted: bool = field(True, "weight device deltas by example count (false = unweighted mean, FLASC's reference)")

    def validate(self) -> None:
        pass


@dataclass
class FedAdamConfig(FedAvgConfig):
    name: str = field("fedadam", "the mean delta is a pseudo-gradient for a server AdamW")
    lr: float = field(1e-3, "server learning rate")
    beta1: float = field(0.9, "first-moment decay")
    beta2: float = field(0.999, "second-moment decay")
    eps: float = field(1e-8, "denominator epsilon")
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)")

    def validate(self) -> None:
        check(self.lr > 0, "aggregator.lr", "must be > 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "aggregator.beta1/beta2", "must be in [0, 1)")
        check(self.eps > 0, "aggregator.eps", "must be > 0")
        check(self.weight_decay >= 0, "aggregator.weight_decay", "must be >= 0")


# -- aggregators ------------------------------------------------------------------------------------------------
class Aggregator:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = FedAvgConfig

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def weight(self, num_examples: int) -> float:
        return float(num_examples) if self.cfg.weighted else 1.0

    def start(self):
        """The round's accumulator: `add(delta, weight)` per accepted upload, `count` of them."""
        return RunningMean()

    def finish(self, params: Arrays, acc, opt_state: Arrays) -> tuple[Arrays, Arrays]:
        raise NotImplementedError

    def mean_delta(self, acc) -> Arrays:
        """The delta the round applies (what a stage switch, e.g. SLoRA's, sees as the round's update)."""
        return acc.mean()


class FedAvg(Aggregator):
    name = "fedavg"
    summary = "FedAvg: add the (example-weighted) mean delta"
    Config = FedAvgConfig

    def finish(self, params, acc, opt_state):
        return fedavg_step(params, self.mean_delta(acc)), opt_state


class FedAdam(Aggregator):
    name = "fedadam"
    summary = "FedAdam (Reddi et al. 2021): the mean delta as a pseudo-gradient for a server AdamW"
    Config = FedAdamConfig

    def finish(self, params, acc, opt_state):
        return fedadam_step(params, self.mean_delta(acc), opt_state, self.cfg)


AGGREGATORS: dict[str, type[Aggregator]] = {a.name: a for a in (FedAvg, FedAdam)}

# Run folders written before the aggregator registry carry FedAdam's fields under every aggregator, at their
# defaults: those are dropped when another aggregator is named; any other value is an error naming the field.
_LEGACY_DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


def aggregator_config_from_dict(raw: dict | None):
    raw = dict(raw or {})
    name = raw.get("name", "fedavg")
    if name not in AGGREGATORS:
        raise ConfigError(f"aggregator.name: unknown aggregator {name!r}; allowed: {sorted(AGGREGATORS)}")
    cls = AGGREGATORS[name].Config
    own = set(cls.__dataclass_fields__)
    for key, default in _LEGACY_DEFAULTS.items():
        if key in raw and key not in own and raw[key] == default:
            del raw[key]
    return from_dict(cls, raw, "aggregator")


def make_aggregator(cfg) -> Aggregator:
    return AGGREGATORS[cfg.name](cfg)
