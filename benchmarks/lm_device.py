"""A SmolLM2 LoRA device step: peak memory and step time under each memory lever, on one machine.

    python -m benchmarks.lm_device --json PATH [--batch 4 --seq-len 128 --steps 20 --rank 16]
                                   [--settings fp32,bf16,fp32+gc,fp32+mb1,fp32+chunk128,...]

Each setting runs in a fresh child process (so each peak RSS is its own): the device's model as a device
builds it (edgelora.edge_client.trainer.DeviceHost: SmolLM2-135M-Instruct, LoRA r = 16 on all seven Llama
projections), one batch of real Shakespeare speeches through the causal-LM task's batch builder, trained by the
device's own step (edgelora.training.accumulate, AdamW) for --steps steps. A setting is a precision (fp32, bf16
autocast) with levers joined by "+": gc (gradient checkpointing), mbN (micro-batches of N rows, gradients
accumulated: the same effective batch and update), chunkN (the causal-LM loss over N tokens at a time, no full
logits), copy (the LoRA model holds its own copy of the base weights, as devices did before they shared the
base's). One JSON record per setting: `precision`, `gradient_checkpointing`, `base_copied`, `micro_batch`,
`effective_batch`,
`chunked_loss` (tokens a chunk; 0 = off), `step_ms` (median of the steps after the first), `peak_rss_mb` (the
child's whole life: load, build, train), `load_peak_mb` (the peak before training: loading and building),
`loss_after` (the loss at the last step; the same batch every step, so
settings that compute the same update agree), `steps`, `trainable`, `batch`, `seq_len`, `threads`,
`cpu_fast_bf16`. Prints bf16 / fp32 and each setting's memory and time against the first setting's. Asserts nothing:
without AMX/AVX512-BF16, bf16 is emulated on a CPU and slower, which is why train.precision = "auto" picks fp32
there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


DEFAULT_SETTINGS = "fp32+copy,fp32,fp32+gc,fp32+mb1,fp32+chunk128,fp32+mb1+chunk128,fp32+gc+mb1+chunk128"


def child(args) -> dict:
    import torch

    from edgelora.config import ModelConfig
    from edgelora.schema import shared_dataset
    from edgelora.data import Examples
    from edgelora.edge_client.trainer import DeviceHost, peak_rss_mb
    from edgelora.precision import cpu_has_fast_bf16
    from edgelora.tasks import LoraSpec, Structure, StructureKind, TrainSpec
    from edgelora.training import accumulate, enable_gradient_checkpointing

    host = DeviceHost(ModelConfig(task="causal-lm", name=args.model, max_seq_len=args.seq_len))
    host.share_frozen = not args.copy_base
    model = host.build(Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=args.rank, alpha=float(args.rank),
                                                                        modules_to_save=())))
    load_peak_mb = peak_rss_mb()  # loading and building, so far
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
    spec = TrainSpec(batch_size=args.batch, precision=args.precision, micro_batch_size=args.micro_batch,
                     loss_chunk_tokens=args.chunk)
    model.train()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(accumulate(model, inputs, labels, spec, host.torch_device, host.task))
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
            "base_copied": args.copy_base,
            "micro_batch": args.micro_batch or args.batch, "effective_batch": args.batch, "chunked_loss": args.chunk,
            "step_ms": round(statistics.median(times[1:]) * 1000, 1),
            "peak_rss_mb": peak_rss_mb(),
            "load_peak_mb": load_peak_mb, "loss_after": round(losses[-1], 5), "steps": args.steps,
            "trainable": sum(p.numel() for p in params), "batch": args.batch, "seq_len": int(inputs["input_ids"].shape[1]),
            "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(), "model": args.model}


def parse_setting(setting: str) -> dict:
    """'fp32+gc+mb1+chunk128' -> the child's arguments."""
    precision, *levers = setting.split("+")
    out = {"precision": precision, "gc": False, "micro_batch": 0, "chunk": 0, "copy": False}
    for lever in levers:
        if lever in ("gc", "copy"):
            out[lever] = True
        elif lever.startswith("mb") and lever[2:].isdigit():
            out["micro_batch"] = int(lever[2:])
        elif lever.startswith("chunk") and lever[5:].isdigit():
            out["chunk"] = int(lever[5:])
        else:
            raise SystemExit(f"--settings: unknown lever {lever!r} in {setting!r} (gc, mbN, chunkN, copy)")
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"--settings: precision {precision!r} in {setting!r} is not fp32 or bf16")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here (JSON list)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per setting (the first is not timed)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--settings", help="comma-separated: a precision (fp32, bf16) and levers joined by + (gc, mbN, "
                                       "chunkN, copy); default: " + DEFAULT_SETTINGS + ", and bf16 where this "
                                       "CPU runs it fast (emulated, a step takes minutes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--copy-base", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.settings is None:
        from edgelora.precision import cpu_has_fast_bf16

        args.settings = DEFAULT_SETTINGS + (",bf16" if cpu_has_fast_bf16() else "")
    records = []
    for setting in args.settings.split(","):
        p = parse_setting(setting)
        cmd = [sys.executable, "-m", "benchmarks.lm_device", "--child", "1", "--precision", p["precision"],
               "--model", args.model, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--rank", str(args.rank), "--micro-batch", str(p["micro_batch"]),
               "--chunk", str(p["chunk"])] + (["--gradient-checkpointing"] if p["gc"] else []) + \
              (["--copy-base"] if p["copy"] else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"setting {setting}: the child failed:\n{out.stderr[-3000:]}")
        rec = {"setting": setting, **json.loads(out.stdout.strip().splitlines()[-1])}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    by = {r["setting"]: r for r in records}
    if "fp32" in by and "bf16" in by:
        print(f"bf16 / fp32 step time: {by['bf16']['step_ms'] / by['fp32']['step_ms']:.2f} "
              f"(this CPU {'has' if records[0]['cpu_fast_bf16'] else 'lacks'} fast bf16)")
    ref = records[0]  # the default list starts where devices were before the levers: fp32, the base copied
    print(f"against the first setting, {ref['setting']}:")
    print(f"{'setting':<28} {'peak MB':>8} {'x':>7} {'step ms':>8} {'x':>7} {'loss after':>11}")
    for r in records:
        print(f"{r['setting']:<28} {r['peak_rss_mb']:>8.0f} {r['peak_rss_mb'] / ref['peak_rss_mb']:>7.2f} "
              f"{r['step_ms']:>8.0f} {r['step_ms'] / ref['step_ms']:>7.2f} {r['loss_after']:>11.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
