"""Aggregation math as pure functions on dicts of numpy arrays (Flower's aggregate.py, fedjax's fed_avg).

Devices upload deltas (trained - received). FedAvg adds the example-weighted mean delta; FedAdam feeds the
same mean delta, as a negative pseudo-gradient, to a server AdamW (Reddi et al. 2021, Alg. 2).
"""
from __future__ import annotations

import numpy as np

from .config import AggregatorConfig

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


def fedadam_step(params: Arrays, mean_delta: Arrays, opt_state: Arrays, cfg: AggregatorConfig
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


def apply_aggregate(params: Arrays, mean_delta: Arrays, opt_state: Arrays, cfg: AggregatorConfig
                    ) -> tuple[Arrays, Arrays]:
    if cfg.name == "fedadam":
        return fedadam_step(params, mean_delta, opt_state, cfg)
    return fedavg_step(params, mean_delta), opt_state
