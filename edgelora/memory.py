"""What a device's training holds in memory, and the plan that fits it into what the device declared.

A device declares at Register the memory it may use (`memory_mb`) and what it holds already, its base loaded
and one forward pass run (`resident_mb`; edge_client.trainer.warm_up_pass). Training adds to that: the activations kept for the backward pass,
the output logits and their gradient, the gradients and AdamW moments of the trainable weights; holding the
frozen base in another precision takes away. The coordinator predicts that sum for a plan and fits the
device's task to its budget (`fit`), after the method's instruction and before the device:

1. the task as the method made it, when it fits (a plan of "");
2. else levers that leave the update unchanged up to floating-point summation order, the cheapest in time
   first: smaller micro-batches, the chunked causal-LM loss, gradient checkpointing;
3. else (LoRA only: its base is frozen) a smaller frozen base, bf16, then int8, then nf4, which changes
   the result, and the plan says so;
4. else nothing fits, and the device is refused at Register with the sizes.

The coefficients are calibrated on SmolLM2-135M (benchmarks.lm_device with budget settings, which make a
device's warm-up and Register figures first; results/lm-device/memory-plans.json, 2 cores, fp32). Over the
~976 MB a device holds after its warm-up, 4 x 128 tokens took ~1,530 MB more, 2 x 128 ~1,110, 1 x 128 ~620,
checkpointing at 4 x 128 ~900, checkpointing + 1 x 128 + the chunked loss ~485. A token costs ~2.4 MB without
checkpointing (0.59 of it the logits: 3 vocabulary-sized fp32 vectors, the logits, their log-softmax and their
gradient; the rest ~26 floats a layer and hidden unit) and ~1.2 MB with it (~9 floats), on top of a share that
does not follow the tokens (the allocator's high-water mark is not linear in them: 2 x 128 cost more than
half way between 1 and 4 rows), taken as 2.4 bytes per model weight. With `MARGIN` every one of those points
is predicted above what was measured (the prediction is meant as an upper bound), and every device reports its
measured peak in its metrics row beside the prediction, so it is checked each round.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .frozen_base import is_target
from .models import lora_target_modules
from .tasks import StructureKind

ACT_FLOATS = 26     # fp32 values a token keeps per layer and hidden unit for the backward pass
CKPT_FLOATS = 9     # the same under gradient checkpointing (layer inputs, one layer recomputed, the allocator's)
LOGIT_COPIES = 3    # logits, their log-softmax and their gradient, each vocabulary x fp32, per token
OPT_BYTES = 12      # per trainable weight: its gradient and AdamW's two moments (the weight is resident)
STEP_BYTES = 2.4    # per weight of the model: what a training step holds whatever its tokens (scratch space,
#                     autograd's graph, the heap's high-water mark); measured, not derived
QUANT_LEFT = 1.0    # bytes per converted weight a smaller base leaves behind in the heap after converting
MARGIN = 1.2        # predictions are raised by this much: too high costs speed, too low breaks a device
CHUNK = 128         # tokens a chunk of the chunked causal-LM loss, when the plan turns it on
# bytes per weight of the layers LoRA wraps, as each base holds them (nf4: 4 bits, an fp32 absmax per 64
# quantized again to 8 bits; int8: a byte, an fp32 scale per row)
BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4 / 576, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
SMALLER_BASES = ("bf16", "int8", "nf4")
# relative step time of each lever, what orders the plans: set by hand near benchmarks.lm_device's SmolLM2
# figures (results/lm-device/levers.json: checkpointing 1.57x, the chunked loss 1.25x, micro-batches of 1 of
# 4 rows 1.58x, i.e. ~0.19 a pass; memory-plans.json: bf16 0.86x, int8 0.99x, nf4 1.08x), not fitted to them:
# a pass is counted cheaper and the smaller bases dearer than measured
TIME_GC, TIME_CHUNK, TIME_PER_PASS = 1.55, 1.25, 0.08
TIME_BASE = {"fp32": 1.0, "bf16": 1.0, "int8": 1.1, "nf4": 1.15}


@dataclass(frozen=True)
class Footprint:
    """What the prediction needs of a model and the structure trained on it (Footprint.of)."""
    layers: int
    hidden: int
    vocab: int           # a causal LM's logits per token; 0 for a classifier (a logit per class)
    trainable: int       # weights the structure trains
    convertible: int     # weights in the layers LoRA wraps (what a smaller base holds differently); 0: not LoRA
    weights: int = 0     # every weight of the model

    @classmethod
    def of(cls, base, structure, trainable: int, causal_lm: bool) -> "Footprint":
        """Of `structure` on the fp32 base model `base`, training `trainable` weights; nothing is built."""
        cfg = getattr(base, "config", None)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 1)
        hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1)
        vocab = int(getattr(cfg, "vocab_size", 0) or 0) if causal_lm else 0
        convertible = 0
        if structure.kind == StructureKind.LORA and structure.lora is not None:
            targets = lora_target_modules(base, structure.lora.target_modules)
            convertible = sum(m.weight.numel() for n, m in base.named_modules()
                              if type(m) is nn.Linear and is_target(n, targets))
        return cls(layers, hidden, vocab, trainable, convertible, sum(p.numel() for p in base.parameters()))


@dataclass(frozen=True)
class Declared:
    """What a device says of its memory at Register."""
    memory_mb: float = 0.0     # the most it may hold (0: nothing declared, nothing planned)
    resident_mb: float = 0.0   # what it holds already: the base as loaded, one forward pass run


@dataclass(frozen=True)
class Plan:
    micro_batch_size: int = 0
    loss_chunk_tokens: int = 0
    gradient_checkpointing: bool = False
    base: str = "fp32"

    def describe(self, batch_size: int) -> str:
        parts = []
        if self.micro_batch_size and self.micro_batch_size < batch_size:
            parts.append(f"mb{self.micro_batch_size}")
        if self.loss_chunk_tokens:
            parts.append(f"chunk{self.loss_chunk_tokens}")
        if self.gradient_checkpointing:
            parts.append("gc")
        if self.base != "fp32":
            parts.append(self.base)
        return "+".join(parts) or "plain"

    @classmethod
    def of(cls, spec) -> "Plan":
        return cls(spec.micro_batch_size, spec.loss_chunk_tokens, spec.gradient_checkpointing, spec.base)

    def apply(self, spec):
        return dataclasses.replace(spec, micro_batch_size=self.micro_batch_size,
                                   loss_chunk_tokens=self.loss_chunk_tokens,
                                   gradient_checkpointing=self.gradient_checkpointing, base=self.base)


def predict_mb(plan: Plan, fp: Footprint, batch_size: int, seq_len: int, resident_mb: float) -> float:
    """The device's predicted peak, MB: what it holds at Register plus what training this plan adds."""
    rows = min(plan.micro_batch_size or batch_size, batch_size)
    tokens = rows * seq_len
    per_layer = CKPT_FLOATS if plan.gradient_checkpointing else ACT_FLOATS
    activations = tokens * fp.layers * fp.hidden * 4 * per_layer
    logit_tokens = min(tokens, plan.loss_chunk_tokens) if plan.loss_chunk_tokens else tokens
    logits = logit_tokens * fp.vocab * 4 * LOGIT_COPIES
    added = MARGIN * (activations + logits + fp.trainable * OPT_BYTES + fp.weights * STEP_BYTES)
    base = 0.0
    if plan.base != "fp32":  # negative: what a smaller base frees
        base = fp.convertible * (BASE_BYTES[plan.base] - BASE_BYTES["fp32"] + QUANT_LEFT)
    return resident_mb + (added + base) / 2**20


def relative_time(plan: Plan, batch_size: int) -> float:
    passes = -(-batch_size // min(plan.micro_batch_size or batch_size, batch_size))
    return ((TIME_GC if plan.gradient_checkpointing else 1.0) * (TIME_CHUNK if plan.loss_chunk_tokens else 1.0)
            * (1 + TIME_PER_PASS * (passes - 1)) * TIME_BASE[plan.base])


def candidates(spec, fp: Footprint) -> tuple[list[Plan], list[Plan]]:
    """(plans that keep the update, plans with a smaller base) that add levers to `spec`, never remove one."""
    start = Plan.of(spec)
    b = spec.batch_size
    sizes = sorted({m for m in (b, *(b >> i for i in range(1, b.bit_length())), 1)
                    if m >= 1 and m <= (start.micro_batch_size or b)}, reverse=True)
    chunks = sorted({start.loss_chunk_tokens, *((CHUNK,) if fp.vocab and not start.loss_chunk_tokens else ())})
    gcs = sorted({start.gradient_checkpointing, True})
    keep = [Plan(m if m < b else start.micro_batch_size, c, g, start.base) for m in sizes for c in chunks for g in gcs]
    smaller = []
    if fp.convertible and start.base in ("fp32", *SMALLER_BASES):
        order = ("fp32", *SMALLER_BASES)
        smaller = [dataclasses.replace(p, base=x) for x in order[order.index(start.base) + 1:] for p in keep]
    key = lambda p: relative_time(p, b)  # noqa: E731
    return sorted(keep, key=key), sorted(smaller, key=key)


@dataclass(frozen=True)
class Fit:
    spec: object            # the TrainSpec to send (the method's own when it fits as made)
    plan: str               # "" when the method's task fits as made; else Plan.describe
    predicted_mb: float
    changes_result: bool    # a smaller base than the method asked for


def fit(spec, fp: Footprint, seq_len: int, device: Declared) -> Fit | None:
    """The fastest plan whose predicted peak fits the device's budget; None when none does."""
    asked = Plan.of(spec)
    predicted = predict_mb(asked, fp, spec.batch_size, seq_len, device.resident_mb)
    if device.memory_mb <= 0 or predicted <= device.memory_mb:
        return Fit(spec, "", predicted, False)
    keep, smaller = candidates(spec, fp)
    for plans, changes in ((keep, False), (smaller, True)):
        for p in plans:
            mb = predict_mb(p, fp, spec.batch_size, seq_len, device.resident_mb)
            if mb <= device.memory_mb:
                return Fit(p.apply(spec), p.describe(spec.batch_size), mb, changes)
    return None


def frugal(spec, fp: Footprint, seq_len: int, device: Declared) -> Fit:
    """The plan of the smallest predicted peak (what a refused device is told it would need)."""
    keep, smaller = candidates(spec, fp)
    mb, p = min(((predict_mb(p, fp, spec.batch_size, seq_len, device.resident_mb), p)
                 for p in [Plan.of(spec), *keep, *smaller]), key=lambda x: x[0])
    return Fit(p.apply(spec), p.describe(spec.batch_size), mb, p.base != spec.base)
