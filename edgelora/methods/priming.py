"""SVD priming of LoRA blocks from an accumulated dense update (SLoRA Sec. 4.2, Appendix A).

peft-style named initialisation (cf. peft's `pissa_init`, `eva.py::initialize_lora_eva_weights`): it runs
after the model is wrapped, on its LoRA layers, in place.

Appendix A: Delta W ~= U_r Sigma_r V_r^T, B = U_r Sigma_r, A = V_r^T. peft computes
W0 x + s * B A x with s = lora_alpha / r, so the factors must absorb 1/s:
- split "b"    (paper's split): B = U_r Sigma_r / s,          A = V_r^T
- split "sqrt" (balanced):      B = U_r sqrt(Sigma_r) / sqrt(s), A = sqrt(Sigma_r) V_r^T / sqrt(s)
Either way s * B A equals the rank-r truncation of Delta W.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers by the name of the weight they wrap in the plain model ('bert....query.weight')."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            plain = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            out[f"{plain}.weight"] = mod
    return out


@torch.no_grad()
def svd_prime_lora(model: nn.Module, delta: dict[str, np.ndarray], split: Literal["b", "sqrt"] = "b",
                   residual: Literal["discard", "merge"] = "discard", adapter: str = "default") -> list[str]:
    """Set each LoRA layer's A/B to the rank-r truncated SVD of `delta[<wrapped weight name>]`.

    `residual`: what happens to Delta W - (rank-r part): "discard" (SLoRA's reading) or "merge" (added to the
    frozen base weight; only meaningful where every party holds the merged base). Returns the primed names.
    Layers without a delta keep their initialisation.
    """
    primed = []
    for wname, layer in lora_layers(model).items():
        if wname not in delta or adapter not in layer.lora_A:
            continue
        A = layer.lora_A[adapter].weight            # (r, in)
        B = layer.lora_B[adapter].weight            # (out, r)
        r, s = A.shape[0], float(layer.scaling[adapter])
        d = torch.from_numpy(np.asarray(delta[wname], np.float64))
        if tuple(d.shape) != (B.shape[0], A.shape[1]):
            raise ValueError(f"{wname}: delta shape {tuple(d.shape)} != layer {(B.shape[0], A.shape[1])}")
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = min(r, S.numel())
        Ur, Sr, Vr = U[:, :k], S[:k], Vh[:k]
        if split == "b":
            b, a = Ur * Sr / s, Vr
        elif split == "sqrt":
            root = Sr.sqrt() / (s ** 0.5)
            b, a = Ur * root, root[:, None] * Vr
        else:
            raise ValueError(f"split: {split!r} is not 'b' or 'sqrt'")
        # A rank below r (tiny layers) leaves the extra rows/columns at zero: s * B A is still rank-k part.
        A.zero_()
        B.zero_()
        A[:k].copy_(a.to(A.dtype))
        B[:, :k].copy_(b.to(B.dtype))
        if residual == "merge":
            base = layer.get_base_layer().weight
            base.add_((d - (Ur * Sr) @ Vr).to(base.dtype))
        elif residual != "discard":
            raise ValueError(f"residual: {residual!r} is not 'discard' or 'merge'")
        primed.append(wname)
    return primed
