"""A SmolLM2 LoRA device step: peak memory and step time in fp32 and under bf16 autocast, on one machine.

    python -m benchmarks.lm_device --json PATH [--batch 4 --seq-len 128 --steps 5 --rank 16]

Each setting runs in a fresh child process (so each peak RSS is its own): the device's model as a device
builds it (edgelora.edge_client.trainer.DeviceHost: SmolLM2-135M-Instruct, LoRA r = 16 on all seven Llama projections),
batches of real Shakespeare speeches through the causal-LM task's batch builder, AdamW. One JSON record per
setting: `precision`, `gradient_checkpointing`, `step_ms` (median of the timed steps after one warm-up),
`peak_rss_mb` (the child's whole life: load, build, train), `trainable`, `batch`, `seq_len`, `threads`,
`cpu_fast_bf16`. Prints bf16 / fp32 (goal: <= 0.75). Asserts nothing: without AMX/AVX512-BF16, bf16 is
emulated on a CPU and slower, which is why train.precision = "auto" picks fp32 there.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> dict:
    import torch

    from edgelora.config import ModelConfig, shared_dataset
    from edgelora.data import Examples
    from edgelora.edge_client.trainer import DeviceHost
    from edgelora.precision import autocast, cpu_has_fast_bf16
    from edgelora.tasks import LoraSpec, Structure, StructureKind
    from edgelora.training import enable_gradient_checkpointing

    host = DeviceHost(ModelConfig(task="causal-lm", name=args.model, max_seq_len=args.seq_len))
    model = host.build(Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=args.rank, alpha=float(args.rank),
                                                                        modules_to_save=())))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    import gzip

    path = shared_dataset("shakespeare/shakespeare.jsonl.gz")
    with gzip.open(path, "rt") as f:  # long speeches, so every row fills seq_len tokens
        texts = [t for t in (json.loads(l)["text"] for l in f) if len(t) > 8 * args.seq_len][:args.batch]
    examples = Examples(tuple(texts), torch.zeros(len(texts), dtype=torch.long).numpy())
    (inputs, labels), = host.task.batches(examples, host.tokenizer, args.seq_len, args.batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        with autocast(args.precision, host.torch_device):
            loss = model(**inputs, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
            "step_ms": round(statistics.median(times[1:]) * 1000, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "trainable": sum(p.numel() for p in params), "batch": args.batch, "seq_len": int(inputs["input_ids"].shape[1]),
            "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(), "model": args.model}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here (JSON list)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--settings", default="fp32,bf16,fp32+gc",
                    help="comma-separated precisions, +gc for gradient checkpointing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    records = []
    for setting in args.settings.split(","):
        precision, _, gc = setting.partition("+")
        cmd = [sys.executable, "-m", "benchmarks.lm_device", "--child", "1", "--precision", precision,
               "--model", args.model, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--rank", str(args.rank)] + (["--gradient-checkpointing"] if gc else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(json.dumps(rec), flush=True)
    by = {(r["precision"], r["gradient_checkpointing"]): r for r in records}
    if ("fp32", False) in by and ("bf16", False) in by:
        print(f"bf16 / fp32 step time: {by['bf16', False]['step_ms'] / by['fp32', False]['step_ms']:.2f} "
              f"(goal <= 0.75; this CPU {'has' if records[0]['cpu_fast_bf16'] else 'lacks'} fast bf16)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
