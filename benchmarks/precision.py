"""Time MiniLM training steps (forward + backward + AdamW) in fp32 and under bf16 autocast, in one process.

    python -m benchmarks.precision --json PATH [--batch 32 --seq-len 64 --steps 5 --structure full]

One JSON record per precision: `precision`, `step_ms` (median over the timed steps), `batch`, `seq_len`,
plus `structure`, `steps`, `threads`, `cpu_fast_bf16` and `auto` (what train.precision = "auto" picks
here). Prints the ratio bf16 / fp32. Asserts nothing: on a CPU without AMX/AVX512-BF16, bf16 is emulated
and far slower, which is why "auto" resolves to fp32 there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def time_steps(model, batch: dict, labels, precision: str, steps: int, device) -> float:
    import torch

    from edgelora.precision import autocast

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and oneDNN kernels; not timed
        t0 = time.perf_counter()
        with autocast(precision, device):
            out = model(**batch, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here (JSON list)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per precision (after one warm-up step)")
    ap.add_argument("--structure", choices=["full", "lora"], default="full")
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args(argv)

    import torch

    from edgelora.models import build_model, load_base_model
    from edgelora.tasks import LoraSpec, Structure, StructureKind
    from edgelora.precision import cpu_has_fast_bf16, resolve_precision

    device = torch.device("cpu")
    base = load_base_model(args.model, 20, 0)
    structure = (Structure(kind=StructureKind.FULL) if args.structure == "full"
                 else Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=8, alpha=16.0)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 20, (args.batch,), generator=gen)
    records = []
    for precision in args.precisions.split(","):
        model = build_model(base, structure)  # a fresh copy per precision: same weights, same starting point
        model.train()
        step_ms = time_steps(model, batch, labels, precision, args.steps, device)
        rec = {"precision": precision, "step_ms": round(step_ms, 1), "batch": args.batch, "seq_len": args.seq_len,
               "structure": args.structure, "steps": args.steps, "threads": torch.get_num_threads(),
               "cpu_fast_bf16": cpu_has_fast_bf16(), "auto": resolve_precision("auto", device)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    by = {r["precision"]: r["step_ms"] for r in records}
    if "fp32" in by and "bf16" in by:
        print(f"bf16 / fp32 step time: {by['bf16'] / by['fp32']:.2f}x (goal <= 0.75x where the CPU has AMX)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
