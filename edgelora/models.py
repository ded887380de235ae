"""Base models, the trainable structure around them, and fingerprints.

Base weights never cross the wire: the server and every device load them locally, and Register compares
fingerprints so a device with other weights (or another tokenizer) is refused before it trains.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import frozen_base
from .adapters import add_adapters
from .configtools import ConfigError
from .schema import ModelConfig
from .sparsity import mask_bool
from .task_types import task_type
from .tasks import Structure, StructureKind

# Every dense layer of BERT-style attention and feed-forward blocks (SLoRA Sec. 5, FLASC's setup).
BERT_DENSE_LAYERS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"
HEAD_PATTERNS = ("classifier", "score")


# Default LoRA targets of decoder LMs, by the module names they use: Llama-style (Llama, SmolLM2, Mistral,
# Qwen2: all seven projections) and GPT-2 (fused attention, its output and the feed-forward Conv1Ds).
DECODER_TARGETS = (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   ("c_attn", "c_proj", "c_fc"))


def load_tokenizer(name: str, task: str = "classification"):
    return task_type(task).load_tokenizer(name)


def load_base_model(model, num_labels: int = 0, head_seed: int = 0) -> nn.Module:
    """The frozen starting point W0, identical on every machine for the same model config (a ModelConfig, or
    a classifier's name, num_labels and head_seed)."""
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name=model, num_labels=num_labels,
                                                                   head_seed=head_seed)
    return task_type(cfg.task).load_base_model(cfg)


def fingerprint_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def fingerprint_tokenizer(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{token}\n".encode())
    return h.hexdigest()


def lora_target_modules(model: nn.Module, targets: tuple[str, ...]):
    """Explicit targets, or every dense attention/feed-forward layer of a BERT-style encoder, or peft's default."""
    if targets:
        return list(targets)
    names = [n for n, _ in model.named_modules()]
    if any(re.match(BERT_DENSE_LAYERS, n) for n in names):
        return BERT_DENSE_LAYERS
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    for family in DECODER_TARGETS:
        if leaves >= set(family):
            return list(family)
    return None


def build_model(base: nn.Module, structure: Structure, frozen: tuple[str, ...] = (),
                share_frozen: bool = False) -> nn.Module:
    """Wrap (a copy of) the base model in the structure's trainable parts; only those require grad.
    `frozen`: modules that stay frozen even where the structure trains every weight (a causal LM's
    embeddings, edgelora.task_types).

    `share_frozen`: under LoRA, the copy's modules hold the base's own weight tensors instead of copies (the
    base stays frozen there: LoRA trains its A and B, and peft trains a copy of each module to save), so the
    weights exist once: 540 MB less for SmolLM2 in fp32. Only for a holder that never writes into the base
    (a device; not priming's residual = "merge")."""
    import copy

    shared = {}
    if share_frozen and structure.kind == StructureKind.LORA:
        shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    model = copy.deepcopy(base, shared)
    kind = structure.kind
    if kind == StructureKind.FULL:
        for n, p in model.named_parameters():
            p.requires_grad_(not matches_any(n, frozen))
    elif kind == StructureKind.BITFIT:
        for n, p in model.named_parameters():
            p.requires_grad_((n.endswith(".bias") or _is_head(n)) and not matches_any(n, frozen))
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"method bitfit: {type(base).__name__} has no bias terms (and no head) to train; "
                              f"use lora, flasc or another method")
    elif kind == StructureKind.LORA:
        from peft import LoraConfig, get_peft_model

        spec = structure.lora
        if spec is None:
            raise ConfigError("structure: LORA needs a lora spec")
        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         target_modules=lora_target_modules(model, spec.target_modules),
                         modules_to_save=list(spec.modules_to_save) or None,
                         rank_pattern=dict(spec.rank_pattern), bias="none")
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing (peft's
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # to fix)
            model = get_peft_model(model, cfg)
    elif kind == StructureKind.ADAPTER:
        model = add_adapters(model, structure.adapter)
    else:
        raise ConfigError(f"structure.kind: unknown {kind!r}")
    model.eval()
    return model


class ModelHost:
    """W0 and the model built on it for one structure at a time, rebuilt only when the structure changes.
    The server's host (initial weights, priming, evaluation) and a device's (training) are this one class.

    `reload`: loads W0 again (a device's host has one). Holding the frozen base in another precision
    (edgelora.frozen_base: bf16, nf4, int8) converts the host's base in place, so the fp32 weights are gone
    afterwards; going back to fp32, or to another precision, reloads them. A host without `reload` keeps W0 as
    loaded and refuses any other base."""

    def __init__(self, base: nn.Module, torch_device: str | torch.device = "cpu", frozen: tuple[str, ...] = (),
                 share_frozen: bool = False, reload=None) -> None:
        self.torch_device = torch.device(torch_device)
        self.base = base.to(self.torch_device)
        self.frozen = frozen                 # modules no structure trains (TaskType.frozen_modules)
        self.share_frozen = share_frozen     # LoRA models hold the base's weights, not copies (build_model)
        self._reload = reload
        self.base_kind: tuple = ("fp32",)    # how the base is held: ("fp32",) or (precision, LoRA's targets)
        self._built: tuple[tuple, nn.Module] | None = None
        self._prepared: tuple[tuple, dict[str, np.ndarray], dict[str, np.ndarray]] | None = None

    def build(self, structure: Structure, base: str = "fp32") -> nn.Module:
        """The model of `structure` on the base held as `base` (fp32, bf16, nf4, int8; only LoRA leaves its
        base frozen, so only a LoRA structure takes another than fp32)."""
        key = (structure, base)
        if self._built is None or self._built[0] != key:
            self._built = None  # the model built before goes first: two never exist at once
            self._hold_base(structure, base)
            self._built = (key, build_model(self.base, structure, self.frozen, self.share_frozen)
                           .to(self.torch_device))
        return self._built[1]

    def _hold_base(self, structure: Structure, base: str) -> None:
        frozen_base.check_base(base)
        if base == "fp32":
            kind: tuple = ("fp32",)
        else:
            if structure.kind != StructureKind.LORA or structure.lora is None:
                raise ConfigError(f"train.base = {base!r} holds the frozen base in another precision, and only a "
                                  f"LoRA structure leaves its base frozen; this task trains {structure.kind.name}")
            targets = lora_target_modules(self.base, structure.lora.target_modules)
            kind = (base, targets if isinstance(targets, str) else tuple(targets or ()))
        if kind == self.base_kind:
            return
        if self.base_kind != ("fp32",):
            if self._reload is None:
                raise ConfigError(f"train.base = {base!r}: this host holds its base as {self.base_kind[0]} and "
                                  f"cannot reload it")
            self.base = None
            self.base = self._reload().to(self.torch_device)
            self.base_kind = ("fp32",)
        elif kind != ("fp32",) and self._reload is None:
            raise ConfigError(f"train.base = {base!r}: this host keeps its base as loaded (fp32); only a device's "
                              f"host converts it")
        if kind != ("fp32",):
            frozen_base.convert(self.base, base, kind[1])
        self.base_kind = kind

    def prepare(self, structure: Structure, base: str = "fp32"
                ) -> tuple[nn.Module, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(model, its trainable state as built, the boolean masks of its masked tensors) for training."""
        model = self.build(structure, base)
        if self._prepared is None or self._prepared[0] != (structure, base):
            init = trainable_state(model)
            masks = {n: mask_bool(structure.mask_seed, n, tuple(init[n].shape), structure.mask_density)
                     for n in masked_names(model, structure)}
            self._prepared = ((structure, base), init, masks)
        return model, self._prepared[1], self._prepared[2]


def _is_head(name: str) -> bool:
    return any(p in name.split(".") for p in HEAD_PATTERNS)


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(p in parts for p in patterns)


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The federated tensors: every parameter that requires grad, by its stable name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().astype(np.float32, copy=True) for n, p in trainable_params(model).items()}


def load_trainable_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    params = trainable_params(model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"state lacks trainable tensors: {missing[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(state[n], np.float32)).to(p.device))


def masked_names(model: nn.Module, structure: Structure) -> list[str]:
    """Trainable tensors the structure's sparse mask applies to (everything but dense_patterns)."""
    return [n for n in trainable_params(model) if is_masked(n, structure)]


def is_masked(name: str, structure: Structure) -> bool:
    """The one rule for which trainable tensors a structure's sparse mask covers: all but dense_patterns."""
    return structure.mask_density > 0 and not matches_any(name, structure.dense_patterns)


@dataclass(frozen=True)
class HardwareInfo:
    hardware: str
    versions: dict[str, str]


def hardware_info(torch_device: str) -> HardwareInfo:
    import platform

    import peft
    import transformers

    hw = f"{platform.machine()} {os.cpu_count()} cpu"
    if torch_device.startswith("cuda") and torch.cuda.is_available():
        hw += f", {torch.cuda.get_device_name(0)}"
    return HardwareInfo(hw, {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": platform.python_version(),
                           "bitsandbytes": frozen_base.quantizer_version()})
