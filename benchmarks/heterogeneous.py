"""Uniform densities against the deadline policy on devices with very different uplinks.

    python -m benchmarks.heterogeneous --json PATH [--rounds 3] [--uplinks 0.5,1,4,8] [--batch-size 16] [--out DIR]

A real server and one client process per device (4 by default), each behind the client's application
throttle at its own uplink (0.5, 1, 4 and 8 Mbit/s; downlinks 100 Mbit/s), FLASC on MiniLM with 1 local step
(communication, not training, is what differs). `uniform`: every device uploads and downloads at density
1/4. `deadline`: `density_policy = "deadline"` on the links the devices declare, with a transfer budget
chosen so that the uploads' mean density is the same 1/4 (up to clipping and rounding): each device then gets
a density proportional to its uplink. One JSON record per policy and round with `policy`, `round`,
`round_s` (round start to its last accepted upload), `max_upload_s`, `bytes_up`, `bytes_down`,
`mean_upload_density`; prints the table and the ratio of mean round times (goal: deadline at least 2x shorter).
"""
from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from pathlib import Path

from benchmarks.uplink import throttled_fleet

BASE = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "cpu-base.toml"
DENSITY = 0.25
DOWN_MBIT = 100.0
BYTES_PER_ENTRY = 6.0  # the policy's estimate before any measurement: float32 value + 2 for its index


def lora_entries(raw: dict) -> int:
    """N: the trainable entries FLASC's top-k runs over (LoRA + head) for this config."""
    from edgelora.config import load_config
    from edgelora.data import with_num_labels
    from edgelora.methods import ModelHost, make_method
    from edgelora.models import load_base_model
    from edgelora.tasks import Stage

    run = with_num_labels(load_config(raw))
    host = ModelHost(load_base_model(run.model.name, run.model.num_labels, run.model.head_seed))
    return sum(v.size for v in make_method(run).init_params(host, Stage.DENSE).values())


def run_config(policy: str, uplinks: list[float], rounds: int, entries: int | None, batch_size: int = 16) -> dict:
    raw = tomllib.loads(BASE.read_text())
    raw["data"]["path"] = str((BASE.parent / raw["data"]["path"]).resolve())
    n = len(uplinks)
    # float32 values, as first measured: the policy's 6-bytes-an-entry estimate and its figures assume them
    raw["server"].update(rounds=rounds, devices_per_round=n, min_devices=n, min_registered=n, eval_every=rounds,
                         round_deadline_s=120.0, value_type="float32")
    raw["data"].update(num_devices=n, max_examples_per_device=64, test_max_examples=100, partition="iid")
    raw["train"].update(lr=3e-3, max_steps=1, batch_size=batch_size)
    raw["method"] = {"name": "flasc", "download_density": DENSITY, "upload_density": DENSITY, "error_feedback": False,
                     "lora": {"rank": 10, "alpha": 10.0}}  # no error feedback, as first measured
    if policy == "deadline":
        # mean over devices of rate_i / 8 * budget / (N * b) = DENSITY  ->  budget (seconds, each way)
        mean_bps = sum(uplinks) / n * 1e6
        budget_s = DENSITY * entries * BYTES_PER_ENTRY * 8 / mean_bps
        raw["method"].update(density_policy="deadline", link_rates="declared", min_density=1 / 1024,
                             max_density=1.0, transfer_fraction=2 * budget_s / raw["server"]["round_deadline_s"])
    return raw


def run_fleet(raw: dict, run_dir: Path, uplinks: list[float]) -> None:
    import os

    # one thread per device process: the devices share this machine's cores, as they would not in a fleet
    throttled_fleet(raw, run_dir, [(up, DOWN_MBIT) for up in uplinks], env={**os.environ, "OMP_NUM_THREADS": "1"})


def records(run_dir: Path, policy: str) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        done = [d for d in rec["devices"] if d["status"] == "completed"]
        up_bytes = [d["bytes_up"] for d in done]
        out.append({"policy": policy, "round": rec["round"], "devices": len(done),
                    "round_s": round(max(d["upload_done_at"] for d in done), 3),
                    "max_upload_s": round(max(d["upload_s"] for d in done), 3),
                    "bytes_up": sum(up_bytes), "bytes_down": rec["bytes_down"],
                    "mean_upload_density": None})
    return out


def upload_densities(run_dir: Path, entries: int) -> dict[int, float]:
    """Round -> mean upload density, from the devices' planned densities logged in updates/ (counted)."""
    from edgelora import codec

    out = {}
    for d in sorted((run_dir / "updates").glob("round_*")):
        nnz = [sum(len(t.indices) for t in codec.decode_bundle(f.read_bytes()).values())
               for f in d.glob("device_*.elb")]
        out[int(d.name.split("_")[1])] = sum(nnz) / len(nnz) / entries
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.heterogeneous", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--uplinks", default="0.5,1,4,8", help="Mbit/s, one device each")
    ap.add_argument("--batch-size", type=int, default=16, help="the one local step's batch: device compute per round")
    ap.add_argument("--out", default=f"runs/heterogeneous-{time.strftime('%Y%m%d-%H%M%S')}")
    a = ap.parse_args(argv)
    uplinks = [float(x) for x in a.uplinks.split(",")]
    entries = lora_entries(run_config("uniform", uplinks, a.rounds, None))
    print(f"heterogeneous: FLASC on MiniLM, N = {entries} entries, {len(uplinks)} devices at "
          f"{', '.join(f'{u:g}' for u in uplinks)} Mbit/s up, {a.rounds} rounds; {a.out}", flush=True)
    rows = []
    for policy in ("uniform", "deadline"):
        raw = run_config(policy, uplinks, a.rounds, entries, a.batch_size)
        raw["server"]["save_updates"] = True
        run_dir = Path(a.out) / policy
        run_fleet(raw, run_dir, uplinks)
        dens = upload_densities(run_dir, entries)
        for r in records(run_dir, policy):
            r["mean_upload_density"] = round(dens.get(r["round"], math.nan), 4)
            rows.append(r)
    Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{'policy':>8} {'round':>5} {'round s':>8} {'max upload s':>12} {'bytes up':>9} {'bytes down':>10} "
          f"{'mean up density':>15}")
    for r in rows:
        print(f"{r['policy']:>8} {r['round']:>5} {r['round_s']:>8.2f} {r['max_upload_s']:>12.2f} {r['bytes_up']:>9} "
              f"{r['bytes_down']:>10} {r['mean_upload_density']:>15.4f}")
    mean = {p: sum(r["round_s"] for r in rows if r["policy"] == p) / a.rounds for p in ("uniform", "deadline")}
    ratio = mean["uniform"] / mean["deadline"]
    print(f"mean round: uniform {mean['uniform']:.2f} s, deadline {mean['deadline']:.2f} s: {ratio:.2f}x shorter "
          f"(goal >= 2x): {'met' if ratio >= 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
