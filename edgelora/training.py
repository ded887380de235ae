"""Local training and evaluation. Pure torch: no I/O beyond an optional progress bar."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Examples
from .tasks import TrainSpec


def batches(examples: Examples, tokenizer, max_len: int, batch_size: int, order: np.ndarray | None = None):
    idx = np.arange(len(examples)) if order is None else order
    for s in range(0, len(idx), batch_size):
        sel = idx[s:s + batch_size]
        enc = tokenizer([examples.texts[i] for i in sel], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt")
        yield enc, torch.from_numpy(examples.labels[sel])


def make_optimizer(params: list[nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"train.optimizer: unknown {spec.optimizer!r}; allowed: sgd, adamw")


def train_local(model: nn.Module, examples: Examples, tokenizer, spec: TrainSpec, max_len: int,
                device: torch.device, masks: dict[str, torch.Tensor] | None = None,
                progress: str | None = None) -> float:
    """Train the model's trainable parameters in place; return the mean training loss.

    `masks` maps a parameter name to a boolean tensor of its shape: only True entries change
    (gradients are masked, and entries outside the mask are restored after each step so weight decay and
    optimizer moments cannot move them).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    masks = {n: m.to(device) for n, m in (masks or {}).items()}
    frozen = {n: params[n].detach().clone() for n in masks}
    opt = make_optimizer(list(params.values()), spec)
    gen = np.random.default_rng(spec.seed)
    steps_per_epoch = math.ceil(len(examples) / spec.batch_size)
    total = steps_per_epoch * spec.local_epochs
    if spec.max_steps:
        total = min(total, spec.max_steps)
    model.train()
    losses, step = [], 0
    bar = tqdm(total=total, desc=progress or "train", leave=False, disable=progress is None, unit="step")
    for _ in range(spec.local_epochs):
        for enc, labels in batches(examples, tokenizer, max_len, spec.batch_size, gen.permutation(len(examples))):
            if step >= total:
                break
            out = model(**{k: v.to(device) for k, v in enc.items()}, labels=labels.to(device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            for n, m in masks.items():
                if params[n].grad is not None:
                    params[n].grad.mul_(m)
            opt.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        params[n].copy_(torch.where(m, params[n], frozen[n]))
            losses.append(float(out.loss))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, examples: Examples, tokenizer, max_len: int, device: torch.device,
             batch_size: int = 64, progress: str | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the examples."""
    model.eval()
    correct, loss_sum = 0, 0.0
    n_batches = math.ceil(len(examples) / batch_size)
    for enc, labels in tqdm(batches(examples, tokenizer, max_len, batch_size), total=n_batches,
                            desc=progress or "eval", leave=False, disable=progress is None, unit="batch"):
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = max(len(examples), 1)
    return correct / n, loss_sum / n
