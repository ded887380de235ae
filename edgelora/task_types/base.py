"""What a task type decides (peft's TaskType, one module each): how its base model loads, how a batch is
built, what is scored, and which modules count as the "head". Everything else (methods, aggregation, the
wire, the round) is the same for every task."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .. import hub


@dataclass(frozen=True)
class Scores:
    """One evaluation. `accuracy` is the task's accuracy (a classifier's; a causal LM's next-token accuracy,
    FLASC's metric) and `loss` its mean cross-entropy (per example; per target token)."""
    accuracy: float
    loss: float
    perplexity: float | None = None     # causal LM: exp(mean token NLL)
    exact_match: float | None = None    # instruction data: share of greedy answers equal to the reference

    @property
    def pair(self) -> tuple[float, float]:
        return self.accuracy, self.loss


class TaskType:
    name: ClassVar[str] = ""
    # What a method's "head" means for this task: trained fully beside LoRA (modules_to_save) and densely
    # outside a sparse mask. Method configs say "head" and load_config puts these names in its place.
    head_modules: ClassVar[tuple[str, ...]] = ()
    # Presets of model.name this task knows (model.name may also be any Hugging Face id or local path).
    presets: ClassVar[tuple[str, ...]] = ()
    eval_batch_size: ClassVar[int] = 64
    # Score the base model before round 1 (metrics.jsonl row 0), so every curve starts where it began.
    scores_round0: ClassVar[bool] = False
    # The per-round table's metric columns: (header, Scores/record field, format).
    table_metrics: ClassVar[tuple[tuple[str, str, str], ...]] = (("accuracy", "accuracy", ".4f"),)

    def load_base_model(self, cfg) -> nn.Module:
        raise NotImplementedError

    def tokenizer_source(self, name: str) -> str:
        """The folder or id the tokenizer of model `name` loads from."""
        return name

    def load_tokenizer(self, name: str):
        """Model `name`'s tokenizer (loaded once a process); a causal LM's pads with end-of-sequence if it has
        no pad token (GPT-2 and other base models)."""
        return hub.tokenizer(self.tokenizer_source(name), pad_with_eos=self.name == "causal-lm")

    def frozen_modules(self, cfg) -> tuple[str, ...]:
        """Module names that stay frozen even when a structure trains every weight (FFT, SFT, BitFit)."""
        return ()

    def check_data(self, run) -> None:
        """Refuse a data config this task cannot train on (raise ConfigError naming the field)."""

    def scores_exact_match(self, run) -> bool:
        """Whether this run's evaluations score exact match (Scores.exact_match)."""
        return False

    def batches(self, examples, tokenizer, max_len: int, batch_size: int, order: np.ndarray | None = None):
        """(model inputs, labels) per batch; `model(**inputs, labels=labels).loss` is the training loss."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: dict, labels: torch.Tensor, loss_chunk_tokens: int = 0) -> torch.Tensor:
        """The training loss of one batch: the mean over what loss_terms counts."""
        return model(**inputs, labels=labels).loss

    def loss_terms(self, labels: torch.Tensor) -> int:
        """How many terms the batch's mean loss averages (a classifier: its examples), so micro-batches'
        means can be weighted into the whole batch's."""
        return int(labels.shape[0])

    def evaluate(self, model: nn.Module, examples, tokenizer, max_len: int, device: torch.device,
                 batch_size: int | None = None, progress: str | None = None, precision: str = "fp32",
                 exact_match_examples: int = 0) -> Scores:
        raise NotImplementedError


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
