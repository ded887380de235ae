"""What SLoRA's SVD priming keeps of Stage 1, measured on a real Stage-1 model.

    python -m benchmarks.priming --run RUN_DIR [--json PATH]

RUN_DIR is a finished run that is still in SLoRA's (or FLoRA's) Stage 1 at its last round, e.g. the
`stage1` run of examples/sweeps/slora-priming.toml. With W0 the base and dW = W_R1 - W0 its accumulated
update, the script evaluates (on the run's own evaluation split) the full weights of:

- `stage1`:             W0 + dW                                  (the model priming starts from)
- `primed`:             W0 + rank-r part of dW on the LoRA layers (what Stage 2 starts from)
- `lora_layers_full`:   W0 + all of dW on the LoRA layers        (only the residual discard)
- `rank_r_plus_rest`:   W0 + rank-r part on the LoRA layers + dW elsewhere (only the truncation)

All four keep Stage 1's classifier (head = "carry"). It also evaluates the primed LoRA model exactly as the
server builds it (the priming equality: it must score as `primed` does). It prints the share of dW's energy
(squared Frobenius norm) that sits in LoRA layers, and the share of each LoRA layer's energy that the rank-r
truncation keeps.

The discarded rest, group by group (`residual`): each group's share of dW's energy and the accuracy of
`primed` plus that group's Stage-1 values (embeddings, LayerNorms, the LoRA layers' biases, the pooler).
`primed_carrying`: the primed LoRA model as served when `method.lora.modules_to_save` also names LayerNorm
and the pooler, so Stage 2 trains them and priming starts them from Stage 1 (the head's "carry" rule);
`primed_carrying_pooler` the same with the pooler alone; `primed_pooler_lora18` a rank-18 LoRA block on the
pooler (the paper's pre-classifier LoRA), primed by SVD like the others.
Asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder whose last round is still Stage 1")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from edgelora.config import load_config
    from edgelora.methods.slora import prime_from_stage1
    from edgelora.models import BERT_DENSE_LAYERS, load_trainable_state
    from edgelora.server.run import ServerRun
    from edgelora.tasks import Stage

    run_dir = Path(args.run)
    srv = ServerRun(load_config(run_dir / "config.toml"), run_dir, resume=True)
    state, method = srv.state, srv.engine.method
    if state.stage != Stage.SPARSE:
        raise SystemExit(f"{run_dir}: its last round is in stage {state.stage.name}, not Stage 1")
    w0 = {n: t.detach().double() for n, t in srv.base.state_dict().items()}
    w1 = {n: t.detach().double() for n, t in srv.engine.model_for(state).state_dict().items() if n in w0}
    delta = {n: w1[n] - w0[n] for n in w0}
    rank = method.cfg.lora.rank
    lora_weights = {f"{m}.weight" for m, _ in srv.base.named_modules() if re.fullmatch(BERT_DENSE_LAYERS, m)}
    head = {n for n in w0 if n.startswith("classifier.")}

    energy = {n: float((d ** 2).sum()) for n, d in delta.items()}
    total = sum(energy.values())
    truncated, kept = {}, {}
    for n in sorted(lora_weights):
        U, S, Vh = torch.linalg.svd(delta[n], full_matrices=False)
        truncated[n] = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        kept[n] = float((S[:rank] ** 2).sum() / (S ** 2).sum()) if energy[n] else 0.0

    def weights(lora_part: str, rest: str) -> dict:
        out = {}
        for n in w0:
            if n in head:
                out[n] = w1[n]
            elif n in lora_weights:
                out[n] = w0[n] + (truncated[n] if lora_part == "rank" else delta[n])
            else:
                out[n] = w1[n] if rest == "keep" else w0[n]
        return out

    def score(state_dict: dict) -> tuple[float, float]:
        model = copy.deepcopy(srv.base)
        model.load_state_dict({n: t.float() for n, t in state_dict.items()})
        return srv.evaluate(model)

    variants = {"stage1": w1, "primed": weights("rank", "discard"),
                "lora_layers_full": weights("full", "discard"), "rank_r_plus_rest": weights("rank", "keep")}
    full = {n: t.numpy().astype(np.float32) for n, t in w1.items()}  # Stage 1's weights, as priming takes them
    structure = method._lora()
    primed_state = state.replace(stage=Stage.LORA, params=prime_from_stage1(
        srv.engine.host, structure, full, method.cfg.split, method.cfg.head))
    record = {"run": str(run_dir), "rank": rank, "round": state.round,
              "energy_share_in_lora_layers": sum(energy[n] for n in lora_weights) / total,
              "energy_share_in_head": sum(energy[n] for n in head) / total,
              "energy_kept_by_rank_r": {"mean": float(np.mean(list(kept.values()))),
                                        "min": min(kept.values()), "max": max(kept.values()),
                                        "overall": sum(kept[n] * energy[n] for n in kept)
                                        / max(sum(energy[n] for n in kept), 1e-30)},
              "accuracy_loss": {k: score(v) for k, v in variants.items()}}
    record["accuracy_loss"]["primed_lora_as_served"] = srv.evaluate(srv.engine.model_for(primed_state))

    lora_biases = {f"{n[:-len('.weight')]}.bias" for n in lora_weights}
    groups = {"embeddings": lambda n: n.startswith("bert.embeddings.") and "LayerNorm" not in n,
              "layernorm": lambda n: "LayerNorm" in n, "lora_biases": lambda n: n in lora_biases,
              "pooler": lambda n: n.startswith("bert.pooler.")}
    primed = variants["primed"]
    record["residual"] = {}
    for g, member in groups.items():
        names = {n for n in w0 if member(n) and n not in lora_weights and n not in head}
        acc, loss = score({n: w1[n] if n in names else t for n, t in primed.items()})
        record["residual"][g] = {"energy_share": sum(energy[n] for n in names) / total, "accuracy": acc,
                                 "loss": loss}
    lora = structure.lora
    stage2_variants = {  # Stage 2 structures that give the pooler (the layer under the head) a parameter
        "primed_carrying": dataclasses.replace(lora, modules_to_save=("classifier", "LayerNorm", "pooler")),
        "primed_carrying_pooler": dataclasses.replace(lora, modules_to_save=("classifier", "pooler")),
        "primed_pooler_lora18": dataclasses.replace(  # the paper's pre-classifier LoRA, r = 18
            lora, target_modules=("query", "key", "value", "dense"), rank_pattern=(("pooler.dense", 18),)),
    }
    for name, spec in stage2_variants.items():
        variant = dataclasses.replace(structure, lora=spec)
        model = srv.engine.host.build(variant)
        load_trainable_state(model, prime_from_stage1(srv.engine.host, variant, full, method.cfg.split,
                                                      method.cfg.head))
        record["accuracy_loss"][name] = srv.evaluate(model)
    for k, (acc, loss) in record["accuracy_loss"].items():
        print(f"{k:24s} accuracy {acc:.4f}  loss {loss:.4f}")
    print(f"dW energy: {record['energy_share_in_lora_layers']:.3f} in LoRA layers, "
          f"{record['energy_share_in_head']:.3f} in the head; rank-{rank} keeps "
          f"{record['energy_kept_by_rank_r']['overall']:.3f} of the LoRA layers' energy "
          f"(per layer {record['energy_kept_by_rank_r']['min']:.3f}-{record['energy_kept_by_rank_r']['max']:.3f})")
    for g, r in record["residual"].items():
        print(f"primed + Stage-1 {g:12s} accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  "
              f"({r['energy_share']:.4f} of dW's energy)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
