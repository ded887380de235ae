"""Client trainings per minute of the simulator, sequential and on Ray, on one MiniLM LoRA workload.

    python -m benchmarks.simulation --devices 20 --per-round 4 --rounds 5 --json PATH [--repeats 1] [--gpu]

Settings, each in a fresh child process, in one run, alternating (A B C D, then again with --repeats 2):
sequential at 1 and at 2 torch threads, Ray with 1 worker x 2 threads and with 2 workers x 1 thread (a local
Ray started by the child; --gpu adds Ray with 2 workers x 0.5 GPU each). The workload: examples/lora.toml
(20 Newsgroups, Dirichlet 0.1, MiniLM, LoRA r = 10), N devices, K a round, 64 examples a device, fp32, no
evaluation but the last round's. One JSON record per setting: `backend`, `workers`, `threads`,
`trainings_per_minute` (client trainings in rounds 2..R over their wall time: steady rounds, every model
loaded), `startup_s` (child start to round 1's start: imports, data, models, Ray and its actors),
`round1_s`, `peak_rss_mb` and `peak_pss_mb` (the child's whole process tree, Ray's daemons and workers
included; RSS sampled every 0.2 s, PSS every 2 s, as it costs far more to read; PSS counts a shared page once,
split among the processes that map it), `peak_pss_by_process_mb` (each process's PSS at the PSS peak, by "pid
name"), `rounds`, `per_round`; each setting's run folder (--out) keeps its metrics.jsonl (every device's train_s). Prints a table with each setting against
sequential at 1 and at 2 threads. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [("sequential", 1, 1, 0.0), ("sequential", 1, 2, 0.0), ("ray", 1, 2, 0.0), ("ray", 2, 1, 0.0)]
GPU_SETTING = ("ray", 2, 1, 0.5)


SAMPLE_S = 0.2  # the tree's RSS is read this often
SLOW_SAMPLE_S = 2.0  # its PSS, and which processes it holds, this often: reading a process's PSS walks its page
# tables (~60 ms of CPU for a Ray tree of 4 GB), so a sampler reading it every 0.2 s took ~30 % of a core, which
# a setting that keeps both cores busy lost (Ray 2 x 1 trained 15 % slower under it)


def _tree(root: int) -> set[int]:
    """`root` and every process below it, from /proc."""
    parent = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            parent[int(p.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, {root}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier and c not in keep}
        keep |= frontier
    return keep


def _rss_mb(pids: set[int]) -> float:
    """RSS of the processes, MB: a page shared by several (torch's libraries, mapped by the driver and every Ray
    worker) counts once in each."""
    total = 0
    for p in pids:
        try:
            total += int((Path("/proc") / str(p) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


def _pss_mb(pids: set[int]) -> dict[str, float]:
    """PSS of each process, MB, by "pid name": a shared page is split among the processes that map it, so their
    sum is the memory they take from the machine."""
    out = {}
    for p in pids:
        try:
            for line in (Path("/proc") / str(p) / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    args = (Path("/proc") / str(p) / "cmdline").read_bytes().split(b"\0")
                    name = " ".join(Path(a.decode(errors="replace")).name for a in args[:3] if a)
                    out[f"{p} {name[:60]}"] = int(line.split()[1]) * 1024 / 1e6
                    break
        except (OSError, ValueError):
            continue
    return out


def child(args) -> dict:
    t_start = time.perf_counter()
    import torch

    from edgelora.config import SimulateConfig, load_config
    from edgelora.simulation.simulator import Simulator

    torch.set_num_threads(args.threads)
    raw = tomllib.loads((REPO / "examples" / "lora.toml").read_text())
    raw["server"].update(rounds=args.rounds, devices_per_round=args.per_round, eval_every=10_000)
    raw["data"].update(num_devices=args.devices, max_examples_per_device=args.examples, test_max_examples=32)
    raw["train"]["precision"] = "fp32"
    run = load_config(raw)
    if args.backend == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), num_gpus=1 if args.gpus else 0, include_dashboard=False,
                 log_to_driver=False, object_store_memory=256 << 20)
        run = run.replace(simulate=SimulateConfig(backend="ray", workers=args.workers, device_cpus=float(args.threads),
                                                  device_gpus=args.gpus))
    out = Path(args.out) / f"{args.backend}-{args.workers}x{args.threads}"
    sim = Simulator(run, out, resume=False, progress=False)
    if args.backend == "ray":  # the actors' models are loaded before round 1, as the sequential host's is
        sim.runner.actor_pids()
    startup = time.perf_counter() - t_start
    ends = []
    t0 = time.perf_counter()
    while not sim.state.finished:
        sim.run_one_round()
        ends.append(time.perf_counter())
    sim.runner.close()
    steady_s = ends[-1] - ends[0]
    trained = sum(r["completed"] for r in sim.folder.records()[1:])
    return {"backend": args.backend, "workers": args.workers, "threads": args.threads, "gpus": args.gpus,
            "trainings_per_minute": 60.0 * trained / steady_s, "startup_s": startup, "round1_s": ends[0] - t0,
            "rounds": args.rounds, "per_round": args.per_round}


def run_setting(args, backend: str, workers: int, threads: int, gpus: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.simulation", "--child", "--backend", backend, "--workers", str(workers),
           "--threads", str(threads), "--gpus", str(gpus), "--devices", str(args.devices), "--per-round",
           str(args.per_round), "--rounds", str(args.rounds), "--examples", str(args.examples), "--out", args.out]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, by_process = [0.0, 0.0], {}
    done = threading.Event()

    def sample():
        tree, slow_at = {p.pid}, float("-inf")
        while not done.wait(SAMPLE_S):
            if time.monotonic() - slow_at >= SLOW_SAMPLE_S:
                tree, slow_at = _tree(p.pid), time.monotonic()
                pss = _pss_mb(tree)
                if sum(pss.values()) > peak[1]:
                    peak[1] = sum(pss.values())
                    by_process.clear()
                    by_process.update(pss)
            peak[0] = max(peak[0], _rss_mb(tree))

    threading.Thread(target=sample, daemon=True).start()
    out, err = p.communicate()
    done.set()
    if p.returncode != 0:
        raise SystemExit(f"{backend} {workers}x{threads} failed:\n{err[-3000:]}")
    rec = json.loads(out.strip().splitlines()[-1])
    rec["peak_rss_mb"], rec["peak_pss_mb"] = peak
    rec["peak_pss_by_process_mb"] = {k: round(v, 1) for k, v in sorted(by_process.items(), key=lambda kv: -kv[1])}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="add Ray 2 workers x 0.5 GPU (a GPU machine)")
    ap.add_argument("--json", help="write the records here (a JSON list)")
    ap.add_argument("--out", default="/tmp/bench-simulation")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="sequential", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(child(args)), flush=True)
        return
    settings = SETTINGS + ([GPU_SETTING] if args.gpu else [])
    records = []
    for rep in range(args.repeats):
        for s in settings:
            rec = run_setting(args, *s)
            print(f"[{rep + 1}/{args.repeats}] {rec['backend']} {rec['workers']} x {rec['threads']}: "
                  f"{rec['trainings_per_minute']:.1f} trainings/min, start-up {rec['startup_s']:.1f} s, "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MB, PSS {rec['peak_pss_mb']:.0f} MB", flush=True)
            records.append(rec)
    by = {}
    for r in records:  # the mean over repeats
        by.setdefault((r["backend"], r["workers"], r["threads"], r["gpus"]), []).append(r)
    rows = {k: {f: sum(x[f] for x in v) / len(v) for f in ("trainings_per_minute", "startup_s", "peak_rss_mb",
                                                             "peak_pss_mb")}
            for k, v in by.items()}
    s1, s2 = rows[("sequential", 1, 1, 0.0)], rows[("sequential", 1, 2, 0.0)]
    print("\n| setting | trainings/min | vs seq 1 thread | vs seq 2 threads | start-up s | peak RSS MB | vs seq 2 threads "
          "| peak PSS MB | vs seq 2 threads |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (b, w, t, g), r in rows.items():
        name = f"{b} {w} x {t}" + (f" x {g:g} GPU" if g else "")
        print(f"| {name} | {r['trainings_per_minute']:.1f} | {r['trainings_per_minute'] / s1['trainings_per_minute']:.2f}x | "
              f"{r['trainings_per_minute'] / s2['trainings_per_minute']:.2f}x | {r['startup_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / s2['peak_rss_mb']:.2f}x | {r['peak_pss_mb']:.0f} | "
              f"{r['peak_pss_mb'] / s2['peak_pss_mb']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
