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
base's), and the frozen base's precision (edgelora.frozen_base): bf16base, nf4, int8 (the layers LoRA wraps; fp32
when none is named). One JSON record per setting: `precision`, `base`, `base_mb` (the frozen base as held), `gradient_checkpointing`,
`base_copied`, `micro_batch`,
`effective_batch`,
`chunked_loss` (tokens a chunk; 0 = off), `step_ms` (median of the steps after the first), `peak_rss_mb` (the
child's whole life: load, build, train), `load_peak_mb` (the peak before training: loading and building), `build_s` (building the
structure on the loaded base, its conversion to `base` included), `loaded_mb` (resident once
built) and `released_mb` (with release: after handing the heap's freed pages back), `step_peaks_mb` (each
step's own peak: the peak is reset before it, on Linux),
`loss_after` (the loss at the last step; the same batch every step, so
settings that compute the same update agree), `steps`, `trainable`, `batch`, `seq_len`, `threads`,
`cpu_fast_bf16`; budgetMB runs the device's own planning (edgelora.memory) for a device declaring MB, after
one warm-up pass as a device makes before Register, and adds `budget_mb`, `plan`, `predicted_mb`
(a budget no plan fits: only those, `plan` "refused"); release hands the heap's freed pages back (malloc_trim) once built and after every step; mmap64k runs the child with MALLOC_MMAP_THRESHOLD_=65536
(glibc returns freed activations to the OS at once: less memory, slower); jemalloc runs the child on jemalloc
(preloaded, as `edgelora client --allocator jemalloc` does; `allocator` says what the child ran on). Prints bf16 / fp32 and each setting's memory and time against the first setting's. Asserts nothing:
without AMX/AVX512-BF16, bf16 is emulated on a CPU and slower, which is why train.precision = "auto" picks fp32
there.
"""
from __future__ import annotations

import argparse
import json
import os
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
    from edgelora.edge_client.allocator import in_use as allocator_in_use
    from edgelora.edge_client.trainer import DeviceHost, peak_rss_mb, resident_mb
    from edgelora.frozen_base import base_bytes, release_freed_memory
    from edgelora.precision import cpu_has_fast_bf16
    from edgelora.tasks import LoraSpec, Structure, StructureKind, TrainSpec
    from edgelora.training import accumulate, enable_gradient_checkpointing

    host = DeviceHost(ModelConfig(task="causal-lm", name=args.model, max_seq_len=args.seq_len))
    host.share_frozen = not args.copy_base
    structure = Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=args.rank, alpha=float(args.rank),
                                                                 modules_to_save=()))
    import gzip

    path = shared_dataset("shakespeare/shakespeare.jsonl.gz")
    with gzip.open(path, "rt") as f:  # long speeches, so every row fills seq_len tokens
        texts = [t for t in (json.loads(l)["text"] for l in f) if len(t) > 8 * args.seq_len][:args.batch]
    examples = Examples(tuple(texts), torch.zeros(len(texts), dtype=torch.long).numpy())
    (inputs, labels), = host.task.batches(examples, host.tokenizer, args.seq_len, args.batch)
    spec = TrainSpec(batch_size=args.batch, precision=args.precision, micro_batch_size=args.micro_batch,
                     loss_chunk_tokens=args.chunk, base=args.base, gradient_checkpointing=args.gradient_checkpointing)
    plan, predicted, resident = "", 0.0, 0.0
    if args.budget:  # as a device and its coordinator do: one pass, Register's figures, the plan that fits
        from edgelora import memory
        from edgelora.edge_client.trainer import warm_up_pass

        warm = host.build(structure)
        warm_up_pass(warm, examples, host)  # as the device does before Register
        declared = memory.Declared(args.budget, resident_mb())
        trainable = sum(p.numel() for p in warm.parameters() if p.requires_grad)
        fp = memory.Footprint.of(host.base, structure, trainable, causal_lm=True)
        del warm
        fitted = memory.fit(spec, fp, args.seq_len, declared)
        if fitted is None:
            return {"budget_mb": args.budget, "resident_mb": declared.resident_mb, "plan": "refused",
                    "predicted_mb": round(memory.frugal(spec, fp, args.seq_len, declared).predicted_mb, 1),
                    "model": args.model}
        spec, plan, predicted, resident = fitted.spec, fitted.plan or "as made", fitted.predicted_mb, \
            declared.resident_mb
    t0 = time.perf_counter()
    model = host.build(structure, spec.base)
    build_s = time.perf_counter() - t0
    load_peak_mb = peak_rss_mb()  # loading and building, so far
    loaded_mb, released_mb = resident_mb(), None
    if args.release:
        release_freed_memory()
        released_mb = resident_mb()
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, losses, step_peaks = [], [], []
    whole_life = load_peak_mb
    for _ in range(args.steps):
        whole_life = max(whole_life, peak_rss_mb())
        resettable = _reset_peak()  # so the peak read after the step is its own; the whole life's is kept here
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(accumulate(model, inputs, labels, spec, host.torch_device, host.task))
        opt.step()
        if args.release:
            release_freed_memory()
        times.append(time.perf_counter() - t0)
        step_peaks.append(peak_rss_mb() if resettable else None)
    return {"precision": args.precision, "base": spec.base, "budget_mb": args.budget, "plan": plan,
            "predicted_mb": round(predicted, 1), "resident_mb": resident, "base_mb": round(base_bytes(host.base) / 2**20, 1),
            "gradient_checkpointing": spec.gradient_checkpointing,
            "base_copied": args.copy_base,
            "micro_batch": spec.micro_batch_size or args.batch, "effective_batch": args.batch,
            "chunked_loss": spec.loss_chunk_tokens,
            "step_ms": round(statistics.median(times[1:]) * 1000, 1),
            "peak_rss_mb": max(whole_life, peak_rss_mb()),
            "load_peak_mb": load_peak_mb, "build_s": round(build_s, 2), "loaded_mb": loaded_mb, "released_mb": released_mb,
            "step_peaks_mb": step_peaks, "release_each_step": args.release, "loss_after": round(losses[-1], 5), "loss_after_20": round(losses[19], 5)
            if len(losses) >= 20 else None, "steps": args.steps,
            "trainable": sum(p.numel() for p in params), "batch": args.batch, "seq_len": int(inputs["input_ids"].shape[1]),
            "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(), "model": args.model,
            "allocator": allocator_in_use()}


def _reset_peak() -> bool:
    """Set this process's peak resident size back to what it holds now (Linux: /proc/self/clear_refs, which
    resets VmHWM and getrusage's ru_maxrss with it), so the next peak_rss_mb() is one step's; False where it
    cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_setting(setting: str) -> dict:
    """'fp32+gc+mb1+chunk128' -> the child's arguments."""
    precision, *levers = setting.split("+")
    out = {"precision": precision, "gc": False, "micro_batch": 0, "chunk": 0, "copy": False, "base": "fp32",
           "budget": 0, "mmap": False, "release": False, "jemalloc": False}
    for lever in levers:
        if lever in ("gc", "copy", "release", "jemalloc"):
            out[lever] = True
        elif lever == "mmap64k":
            out["mmap"] = True
        elif lever.startswith("budget") and lever[6:].isdigit():
            out["budget"] = int(lever[6:])
        elif lever in ("bf16base", "nf4", "int8"):
            out["base"] = lever.removesuffix("base")
        elif lever.startswith("mb") and lever[2:].isdigit():
            out["micro_batch"] = int(lever[2:])
        elif lever.startswith("chunk") and lever[5:].isdigit():
            out["chunk"] = int(lever[5:])
        else:
            raise SystemExit(f"--settings: unknown lever {lever!r} in {setting!r} (gc, mbN, chunkN, copy, bf16base, "
                             f"nf4, int8, budgetMB, mmap64k, release, jemalloc)")
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"--settings: precision {precision!r} in {setting!r} is not fp32 or bf16")
    return out


def table(records: list[dict]) -> str:
    """The records side by side: each trained setting's peak and step time against the first trained one's (the
    default list starts where devices were before the levers: fp32, the base copied); a budget no plan fits is
    a row of its own, and with none trained the table is those rows alone."""
    lines = []
    by = {r["setting"]: r for r in records}
    if "fp32" in by and "bf16" in by:
        lines.append(f"bf16 / fp32 step time: {by['bf16']['step_ms'] / by['fp32']['step_ms']:.2f} "
                     f"(this CPU {'has' if by['fp32']['cpu_fast_bf16'] else 'lacks'} fast bf16)")
    ref = next((r for r in records if "peak_rss_mb" in r), None)
    if ref is not None:
        lines.append(f"against the first setting, {ref['setting']}:")
    lines.append(f"{'setting':<30} {'plan':<18} {'predicted':>9} {'peak MB':>8} {'x':>7} {'step ms':>8} {'x':>7} "
                 f"{'loss after':>11}")
    for r in records:
        if "peak_rss_mb" not in r:  # a budget no plan fits
            lines.append(f"{r['setting']:<30} {'refused':<18} {r['predicted_mb']:>9.0f}")
            continue
        lines.append(f"{r['setting']:<30} {r['plan'] or '-':<18} {r['predicted_mb'] or float('nan'):>9.0f} "
                     f"{r['peak_rss_mb']:>8.0f} {r['peak_rss_mb'] / ref['peak_rss_mb']:>7.2f} "
                     f"{r['step_ms']:>8.0f} {r['step_ms'] / ref['step_ms']:>7.2f} {r['loss_after']:>11.5f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records here (JSON list)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per setting (the first is not timed)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--settings", help="comma-separated: a precision (fp32, bf16) and levers joined by + (gc, mbN, "
                                       "chunkN, copy, bf16base, nf4, int8); default: " + DEFAULT_SETTINGS + ", and bf16 where this "
                                       "CPU runs it fast (emulated, a step takes minutes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--copy-base", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--release", action="store_true", help=argparse.SUPPRESS)
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
               "--chunk", str(p["chunk"]), "--base", p["base"]] + (["--gradient-checkpointing"] if p["gc"] else []) + \
              (["--copy-base"] if p["copy"] else []) + (["--release"] if p["release"] else []) + \
              ["--budget", str(p["budget"])]
        # mmap64k: glibc serves every allocation over 64 kB from its own mapping and unmaps it when freed, so
        # freed activations leave the process at once instead of staying in its heap
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if p["mmap"] else {})}
        if p["jemalloc"]:  # as `edgelora client --allocator jemalloc` runs a device
            from edgelora.edge_client.allocator import AllocatorError, jemalloc_library, preloaded

            try:
                env = preloaded(env, jemalloc_library())
            except AllocatorError as e:
                raise SystemExit(f"setting {setting}: {e}") from None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"setting {setting}: the child failed:\n{out.stderr[-3000:]}")
        rec = {"setting": setting, "malloc_mmap_threshold": 65536 if p["mmap"] else None,
               **json.loads(out.stdout.strip().splitlines()[-1])}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.json:  # before the table: what was measured is kept whatever the table makes of it
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
