"""Which numeric precision local training runs in: bf16 autocast where the machine runs it fast, fp32 elsewhere.
A leaf of the core: torch only."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU executes bf16 matrix work natively (AMX or AVX512-BF16, read from /proc/cpuinfo).
    Elsewhere (AVX2 alone) oneDNN emulates bf16, and autocast is many times slower than fp32: measured on
    this project's AMD EPYC (AVX2) machines, a MiniLM step went from 1.2 s in fp32 to 29 s under bf16."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where this machine runs it fast (CUDA with bf16 support, a CPU with AMX/AVX512-BF16),
    fp32 otherwise; fp32 and bf16 are taken as asked."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"train.precision: unknown {precision!r}; allowed: auto, fp32, bf16")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """torch.autocast to bf16 for `bf16` (weights and optimizer state stay fp32), nothing for fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
