"""A short simulated run of every method on 20 Newsgroups (MiniLM, Dirichlet alpha 0.1): final accuracy,
bytes up and down (protobuf ByteSize, as on the wire), seconds. Prints a table; asserts nothing.

    python benchmarks/methods.py --rounds 6 --per-round 10 --examples 48 --out runs/bench-methods
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
ORDER = ("fft", "lora", "sft", "slora", "flora", "bitfit", "houlsby", "pfeiffer", "flasc")


def run_one(method: str, args) -> dict:
    from edgelora.config import load_config
    from edgelora.simulation.simulator import Simulator

    raw = tomllib.loads((REPO / "examples" / f"{method}.toml").read_text())
    raw["server"].update(rounds=args.rounds, devices_per_round=args.per_round, eval_every=args.rounds)
    raw["data"].update(num_devices=args.devices, max_examples_per_device=args.examples,
                       test_max_examples=args.test_examples)
    raw["model"]["name"] = args.model
    run = load_config(raw)
    out = Path(args.out) / method
    t0 = time.perf_counter()
    sim = Simulator(run, out, resume=False, progress=False)
    sim.run_rounds()
    seconds = time.perf_counter() - t0
    recs = sim.folder.records()
    return {"method": method, "rounds": len(recs), "accuracy": recs[-1]["accuracy"],
            "bytes_up": sum(r["bytes_up"] for r in recs), "bytes_down": sum(r["bytes_down"] for r in recs),
            "seconds": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| method | rounds | final accuracy | total MB up | total MB down | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['rounds']} | {r['accuracy']:.4f} | {r['bytes_up'] / 1e6:.3f} | "
                     f"{r['bytes_down'] / 1e6:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--examples", type=int, default=48, help="max examples per device")
    ap.add_argument("--test-examples", type=int, default=300)
    ap.add_argument("--out", default="runs/bench-methods")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    for m in args.methods.split(","):
        rows.append(run_one(m, args))
        r = rows[-1]
        print(f"{m}: {r['rounds']} rounds, accuracy {r['accuracy']:.4f}, up {r['bytes_up']/1e6:.3f} MB, "
              f"down {r['bytes_down']/1e6:.3f} MB, {r['seconds']:.0f} s", flush=True)
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
