"""Local training and evaluation. Pure torch: no I/O beyond an optional progress bar."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Examples
from .precision import autocast
from .task_types import TaskType, task_type
from .tasks import TrainSpec


def _task(task):
    return task if isinstance(task, TaskType) else task_type(task or "classification")


def batches(examples: Examples, tokenizer, max_len: int, batch_size: int, order: np.ndarray | None = None,
            task=None):
    """(model inputs, labels) per batch, as the task type builds them (edgelora.task_types)."""
    return _task(task).batches(examples, tokenizer, max_len, batch_size, order)


def make_optimizer(params: list[nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"train.optimizer: unknown {spec.optimizer!r}; allowed: sgd, adamw")


def train_local(model: nn.Module, examples: Examples, tokenizer, spec: TrainSpec, max_len: int,
                device: torch.device, masks: dict[str, torch.Tensor] | None = None,
                progress: str | None = None, optimizer: torch.optim.Optimizer | None = None, task=None) -> float:
    """Train the model's trainable parameters in place; return the mean training loss.

    A device starts a fresh optimizer every round; `optimizer` lets a caller keep one across calls
    (centralized training, edgelora.experiments.centralized).

    `masks` maps a parameter name to a boolean tensor of its shape: only True entries change
    (gradients are masked, and entries outside the mask are restored after each step so weight decay and
    optimizer moments cannot move them).

    `task`: the task type (or its name) that builds the batches; default classification.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    masks = {n: m.to(device) for n, m in (masks or {}).items()}
    frozen = {n: params[n].detach().clone() for n in masks}
    opt = optimizer or make_optimizer(list(params.values()), spec)
    gen = np.random.default_rng(spec.seed)
    steps_per_epoch = math.ceil(len(examples) / spec.batch_size)
    total = steps_per_epoch * spec.local_epochs
    if spec.max_steps:
        total = min(total, spec.max_steps)
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    losses, step = [], 0
    bar = tqdm(total=total, desc=progress or "train", leave=False, disable=progress is None, unit="step")
    for _ in range(spec.local_epochs):
        for enc, labels in batches(examples, tokenizer, max_len, spec.batch_size, gen.permutation(len(examples)),
                                   task):
            if step >= total:
                break
            opt.zero_grad(set_to_none=True)
            loss = accumulate(model, enc, labels, spec, device, _task(task))
            for n, m in masks.items():
                if params[n].grad is not None:
                    params[n].grad.mul_(m)
            opt.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        params[n].copy_(torch.where(m, params[n], frozen[n]))
            losses.append(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")


def accumulate(model: nn.Module, inputs: dict, labels: torch.Tensor, spec: TrainSpec, device: torch.device,
               task: TaskType) -> float:
    """Forward and backward one batch, adding its gradient to the parameters' .grad; returns its loss.

    With spec.micro_batch_size = m below the batch's rows, the batch goes through in passes of m rows, each
    pass's mean loss weighted by its share of the batch's loss terms (examples; a causal LM's target tokens), so
    the summed gradients are the whole batch's up to floating-point summation order, while activations exist
    for m rows at a time. A pass without a loss term (a causal LM's rows all prompt) adds nothing. Dropout
    draws its masks pass by pass: the same distribution as the whole batch's, not the same draws."""
    rows = int(labels.shape[0])
    m = spec.micro_batch_size
    total = task.loss_terms(labels) if 0 < m < rows else 0
    if not total:  # one pass: no micro-batches asked for, or nothing to weigh them by
        with autocast(spec.precision, device):
            mean = task.loss(model, {k: v.to(device) for k, v in inputs.items()}, labels.to(device),
                             spec.loss_chunk_tokens)
        mean.backward()
        return float(mean.detach())
    loss = 0.0
    for s in range(0, rows, m):
        part_labels = labels[s:s + m].to(device)
        share = task.loss_terms(part_labels) / total
        if share == 0:
            continue
        with autocast(spec.precision, device):
            mean = task.loss(model, {k: v[s:s + m].to(device) for k, v in inputs.items()}, part_labels,
                             spec.loss_chunk_tokens)
        (mean * share).backward()
        loss += float(mean.detach()) * share
    return loss


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient checkpointing (non-reentrant); inputs require grad so a frozen embedding in
    front of LoRA still lets gradients flow through the checkpointed blocks.

    transformers 5 renamed the API to activation checkpointing and warns (FutureWarning) on every use of the
    gradient_checkpointing_* names; those stay only as the fallback for the older releases pyproject allows."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "activation_checkpointing_enable"):
        on, enable = inner.is_activation_checkpointing, inner.activation_checkpointing_enable
    elif hasattr(inner, "gradient_checkpointing_enable"):
        on = inner.is_gradient_checkpointing
        enable = lambda kwargs: inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        return
    if on:
        return
    enable({"use_reentrant": False})
    if hasattr(inner, "enable_input_require_grads"):
        inner.enable_input_require_grads()


def evaluate(model: nn.Module, examples: Examples, tokenizer, max_len: int, device: torch.device,
             batch_size: int | None = None, progress: str | None = None, precision: str = "fp32", task=None,
             exact_match_examples: int = 0):
    """The task type's Scores on the examples (edgelora.task_types: accuracy and loss; a causal LM adds
    perplexity and, for instruction data, exact match)."""
    return _task(task).evaluate(model, examples, tokenizer, max_len, device, batch_size=batch_size,
                                progress=progress, precision=precision, exact_match_examples=exact_match_examples)
