"""SLoRA (Babakniya et al. 2023) and FLoRA: sparse (or full) fine-tuning, then LoRA primed by SVD.

Stage 1 (Stage.SPARSE, Sec. 4.1): `sft` at density d1 for R1 rounds (FLoRA: every weight, no mask).
Switch (Sec. 4.2, Appendix A): Delta W = W_R1 - W0 of every LoRA-targeted layer -> rank-r A/B by truncated
SVD (edgelora.methods.priming.svd_prime_lora). Stage 2 (Stage.LORA): ordinary federated LoRA from there.
The stage and its first round live in ServerState (checkpointed every round), so a restart resumes the
right stage; the server optimizer state restarts at the switch because the trainable tensors change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..configtools import check, field
from ..models import trainable_state
from ..tasks import Stage, Structure, StructureKind, UploadFormat
from .base import Method, MethodConfig
from .baselines import LoraConfig
from .priming import PEFT_PREFIX, svd_prime_lora
from .sparse import masked_download, masked_structure

log = logging.getLogger("edgelora.methods")

HEAD_TAG = ".modules_to_save.default"


@dataclass
class SLoraConfig(MethodConfig):
    name: str = field("slora", "SLoRA: sparse fine-tuning, then SVD-primed LoRA")
    density: float = field(0.1, "Stage 1 mask density d1 (paper: 10 %); 1 = full fine-tuning (FLoRA)")
    mask_seed: int = field(1, "seed of the Stage-1 random mask, sent in every task")
    stage1_rounds: int = field(0, "R1, rounds of Stage 1 (0 = stage1_fraction of server.rounds, at least 1); Stage 2 runs the rest")
    stage1_fraction: float = field(0.5, "R1 as a fraction of server.rounds when stage1_rounds = 0")
    stage1_lr: float = field(0.0, "device learning rate in Stage 1 (0 = train.lr); full-weight updates usually want a smaller one than LoRA")
    dense_patterns: list[str] = field(["head"], "Stage 1: modules trained densely outside the mask; \"head\" = the task's head (classification: the classifier; causal-lm: none)")
    split: Literal["b", "sqrt"] = field("b", "how s = alpha/r is absorbed: b = B = U_r S_r / s, A = V_r^T (Appendix A); sqrt = sqrt(S_r / s) on both factors")
    residual: Literal["discard"] = field("discard", "Delta W minus its rank-r part, and the Stage-1 deltas of weights with no LoRA block (LayerNorm, biases, embeddings): discarded, the paper's reading. (Merging them into W0 would need the merged base on every device, which the wire does not carry.)")
    head: Literal["carry", "reset"] = field("carry", "the classifier's Stage-1 weights: carry = start Stage 2's fully-trained head (modules_to_save) from them; reset = from W0's head")
    lora: LoraConfig = field(LoraConfig(rank=10, alpha=10.0), "Stage 2 LoRA (paper: r = 10 on every dense attention/feed-forward layer, alpha = r)")

    def validate(self) -> None:
        check(0 < self.density <= 1, "method.density", "must be in (0, 1]")
        check(self.stage1_rounds >= 0, "method.stage1_rounds", "must be >= 0")
        check(0 < self.stage1_fraction < 1, "method.stage1_fraction", "must be in (0, 1)")
        check(self.stage1_lr >= 0, "method.stage1_lr", "must be >= 0")


@dataclass
class FLoraConfig(SLoraConfig):
    name: str = field("flora", "FLoRA: full fine-tuning, then SVD-primed LoRA")
    density: float = field(1.0, "Stage 1 is full fine-tuning: must stay 1")

    def validate(self) -> None:
        super().validate()
        check(self.density == 1.0, "method.density", "flora trains every weight in Stage 1; use slora for a mask")


class SLora(Method):
    name = "slora"
    summary = "SLoRA: Stage 1 sparse fine-tuning (random mask, d1), then LoRA primed by SVD of Delta W (Stage 2)"
    Config = SLoraConfig

    def __init__(self, cfg, run) -> None:
        super().__init__(cfg, run)
        rounds = run.server.rounds
        self.stage1_rounds = cfg.stage1_rounds or max(1, int(round(rounds * cfg.stage1_fraction)))
        if self.stage1_rounds >= rounds:
            log.warning("%s: stage1_rounds = %d >= server.rounds = %d: Stage 2 (LoRA) never runs",
                        cfg.name, self.stage1_rounds, rounds)

    def initial_stage(self) -> Stage:
        return Stage.SPARSE

    def _sparse(self) -> Structure:
        return masked_structure(self.cfg.density, self.cfg.mask_seed, self.cfg.dense_patterns)

    def _lora(self) -> Structure:
        return Structure(kind=StructureKind.LORA, lora=self.cfg.lora.spec())

    def structure(self, state):
        return self._sparse() if state.stage == Stage.SPARSE else self._lora()

    def stage_rounds(self, state):
        if state.stage == Stage.SPARSE:
            return 1, self.stage1_rounds
        return state.stage_start, self.run.server.rounds

    def stage_lr(self, state):
        if state.stage == Stage.SPARSE and self.cfg.stage1_lr:
            return self.cfg.stage1_lr
        return super().stage_lr(state)

    def upload_rule(self, state):
        masked = state.stage == Stage.SPARSE and self.cfg.density < 1
        return self.upload(UploadFormat.MASKED if masked else UploadFormat.DENSE)

    def download(self, state, ins):
        if state.stage == Stage.SPARSE:
            return masked_download(state.params, ins.task.structure)
        return super().download(state, ins)

    def after_round(self, state, host, aggregated):
        if state.stage != Stage.SPARSE or state.round < self.stage1_rounds:
            return state
        params = prime_from_stage1(host, self._lora(), state.params, self.cfg.split, self.cfg.head)
        log.info("%s: round %d ends Stage 1; LoRA primed by SVD, Stage 2 starts at round %d",
                 self.name, state.round, state.round + 1)
        return state.replace(stage=Stage.LORA, stage_start=state.round + 1, params=params, opt_state={},
                             method_state={})


def prime_from_stage1(host, lora_structure: Structure, full_params: dict[str, np.ndarray], split: str,
                      head: str) -> dict[str, np.ndarray]:
    """Stage 2's initial trainable state from Stage 1's full weights W_R1 (host.base holds W0)."""
    w0 = {n: p.detach().cpu().numpy() for n, p in host.base.named_parameters()}
    delta = {n: full_params[n].astype(np.float64) - w0[n].astype(np.float64) for n in full_params if n in w0}
    model = host.build(lora_structure)
    svd_prime_lora(model, delta, split=split, residual="discard")
    params = trainable_state(model)
    for n in params:
        if HEAD_TAG in n:  # the fully trained head (modules_to_save) starts where Stage 1 left it
            plain = n[len(PEFT_PREFIX):].replace(HEAD_TAG, "")
            if head == "carry" and plain in full_params:
                params[n] = full_params[plain].astype(np.float32).copy()
            elif head == "reset":
                params[n] = w0[plain].astype(np.float32).copy()
    return params


class FLora(SLora):
    name = "flora"
    summary = "FLoRA: Stage 1 full fine-tuning (no mask), then LoRA primed by SVD of Delta W (Stage 2)"
    Config = FLoraConfig
