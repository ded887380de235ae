"""How a device holds the frozen base under LoRA: the layers LoRA wraps kept as loaded (fp32), in bf16, or
quantized by bitsandbytes (nf4: QLoRA's 4-bit NormalFloat in blocks of 64 with double-quantized scales;
int8: LLM.int8's row-wise 8-bit codes), with LoRA's A and B (and everything else) still fp32.

A leaf of the core: torch, and bitsandbytes imported only when a quantized base is asked for. Layers are
converted in place, one at a time, each layer's fp32 weight released as its replacement is made, so converting
never holds a second copy of the model. The embeddings and the output projection stay as loaded: they are
tied in most small LMs, and a lookup reads only the rows it needs.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BASES = ("fp32", "bf16", "nf4", "int8")
QUANTIZED = ("nf4", "int8")
NF4_BLOCK = 64  # bitsandbytes' default, QLoRA's


class _UpcastLinear(torch.autograd.Function):
    """x @ W.T + b with W frozen and stored in bf16: cast up to x's precision in the forward and again in the
    backward, so only the bf16 weight is kept between them (autograd would keep each layer's fp32 copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class Bf16Linear(nn.Linear):
    """A frozen Linear whose weight is stored in bf16 and used at the input's precision (fp32 training casts
    one layer's weight up at a time; under bf16 autocast nothing is cast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(x, self.weight, self.bias)


def check_base(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"train.base: unknown {base!r}; allowed: {', '.join(BASES)}")
    if base in QUANTIZED:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(f"train.base = {base!r} quantizes the frozen base with bitsandbytes, which is not "
                             f"installed here: pip install bitsandbytes") from None


def quantizer_version() -> str:
    """bitsandbytes' version, which fixes how a base is quantized ("" where it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return ""


def is_target(name: str, targets) -> bool:
    """peft's rule for LoRA's target_modules: a regex matched against the whole module name, or a list of
    names each matching the name or its last dotted parts."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _converted(layer: nn.Linear, base: str) -> nn.Module:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    if base == "bf16":
        new = Bf16Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        new.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    elif base == "nf4":
        import bitsandbytes as bnb

        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=weight.dtype,
                                quant_type="nf4", compress_statistics=True, device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK,
                                       compress_statistics=True).to(weight.device)
        # On a CPU with AVX512-BF16, bitsandbytes repacks a layer's weight in place at its first no-grad eval
        # forward, rounding the block scales to bf16: what a layer computes would then depend on the CPU and on
        # whether it was evaluated before it trained, and the repack fails outright where in_features is not a
        # multiple of the block (seen on tiny models). One format everywhere: the repack is off.
        new.support_avx512bf16_for_cpu = False
    elif base == "int8":
        import bitsandbytes as bnb

        # LLM.int8 quantizes each forward's inputs through fp16, and says so on every call: it is the design
        warnings.filterwarnings("ignore", "MatMul8bitLt: inputs will be cast from", UserWarning)

        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=False, has_fp16_weights=False,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(weight.device)
    else:
        raise ValueError(f"train.base: unknown {base!r}; allowed: {', '.join(BASES)}")
    new.bias = bias
    return new.requires_grad_(False)


def convert(model: nn.Module, base: str, targets) -> int:
    """Hold every plain nn.Linear whose name `targets` names (LoRA's target_modules, as peft reads them) as
    `base`, in place; returns how many were converted. Only frozen layers are converted: LoRA trains beside
    them, never in them."""
    check_base(base)
    if base == "fp32":
        return 0
    mapped = _file_mappings()
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not is_target(name, targets):
            continue
        if module.weight.requires_grad:
            raise ValueError(f"train.base = {base!r}: {name} is trained, and only a frozen layer can be held "
                             f"in another precision")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        span = (module.weight.data_ptr(), module.weight.nbytes)
        setattr(parent, child, _converted(module, base))
        del module
        _release(span, mapped)
        _trim_heap()  # quantizing's scratch, freed but kept by the heap, would pile up layer after layer
        count += 1
    if count:
        _own_the_rest(model, mapped)
    return count


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges where this process maps safetensors files (Linux; else none). transformers maps
    them private and copy-on-write; a frozen weight is never written, so its pages are the file's."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def _release(span: tuple[int, int], mapped: list[tuple[int, int]]) -> None:
    """Drop a converted weight's pages from this process's resident memory, where the weight was a view of a
    file mapping (nothing reads the weight again: its layer was replaced). Memory that is not such a mapping
    (a model built in memory) is left to the allocator, which may already have reused it."""
    ptr, size = span
    if not any(start <= ptr and ptr + size <= end for start, end in mapped):
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-ptr // page) * page, (ptr + size) // page * page  # whole pages inside the weight only
    if hi > lo:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


def _own_the_rest(model: nn.Module, mapped: list[tuple[int, int]]) -> None:
    """Give every tensor left as loaded its own memory, then hand freed memory back to the OS. transformers
    maps a safetensors file into memory and the weights are views of that mapping: a layer's pages, read once
    to convert it, stay resident until the whole mapping is released, and the embeddings' views would keep it
    alive. Copying the few tensors left (embeddings, norms) lets the mapping go."""
    release_freed_memory()  # the converting's scratch first: what the copies below add comes on top of it
    with torch.no_grad():
        # each tensor once: a causal LM's output projection holds its embeddings' Parameter
        for t in [*model.parameters(), *model.buffers()]:
            if getattr(t, "quant_state", None) is None and getattr(t, "SCB", None) is None \
                    and t.dtype.is_floating_point and t.device.type == "cpu":
                t.data = _copied(t.data, mapped)
    release_freed_memory()


COPY_BLOCK = 1 << 22  # bytes of a mapped tensor copied, and their file pages dropped, at a time


def _copied(t: torch.Tensor, mapped: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of `t` in memory of its own. Where `t` is a view of a file mapping, the copy goes a block at a
    time and each block's pages are dropped as soon as it is copied, so the file's pages and the copy are not
    both resident whole (SmolLM2's embeddings: 113 MB, which a plain clone held twice at its end)."""
    if not t.is_contiguous():
        return t.clone()
    out = torch.empty_like(t)
    src, dst = t.view(-1), out.view(-1)
    step = max(1, COPY_BLOCK // t.element_size())
    for lo in range(0, src.numel(), step):
        hi = min(lo + step, src.numel())
        dst[lo:hi].copy_(src[lo:hi])
        _release((src[lo:hi].data_ptr(), (hi - lo) * t.element_size()), mapped)
    return out



def release_freed_memory() -> None:
    """Collect garbage and hand the heap's freed pages back to the OS (glibc keeps them for reuse, so a
    process's resident size stays at its high-water mark; elsewhere there is nothing to do)."""
    import gc

    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """glibc's malloc_trim: the heap's free pages back to the OS (nothing where the C library is another)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold as stored (quantized weights at their packed size, a
    quantized layer's scales counted too)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(x.numel() * x.element_size() for x in _state_tensors(state))
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    out = [x for x in (getattr(state, "absmax", None), getattr(state, "code", None)) if isinstance(x, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += _state_tensors(nested)
    return out
