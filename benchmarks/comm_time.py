"""Check the time-to-target computation (edgelora.experiments.report) against a real throttled run.

    python -m benchmarks.comm_time --json PATH [--config examples/sweeps/cpu-base.toml] [--method flasc]
        [--downlink-mbps 4 --uplink-mbps 1] [--rounds 2] [--app-throttle]

Runs a short federated run (2 devices, real server and client processes) of a sweep's FLASC variant with
each device behind a tbf link (`tc` in network namespaces, deploy/emulate.py) or, without root, behind the
client's application throttle. For every device and round it compares what edgelora.experiments.report computes from
the bytes and the link rates (bytes_down * 8 / downlink + bytes_up * 8 / uplink) with what was measured
(the device's download_s + upload_s). One JSON record per device and round with `round`, `device`,
`bytes_down`, `bytes_up`, `computed_s`, `measured_s`, `ratio`; prints the worst ratio (goal: within 15%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tomllib

GOAL = 0.15


def run_config(args) -> dict:
    from edgelora.experiments.sweep import load_sweep

    if args.sweep:
        spec = next((s for s in load_sweep(args.sweep).runs if s.method == args.method), None)
        if spec is None:
            raise SystemExit(f"{args.sweep} has no run of method variant {args.method!r}")
        raw = spec.raw
    else:
        raw = tomllib.loads(Path(args.config).read_text())
    raw["server"].update(rounds=args.rounds, devices_per_round=2, min_devices=2, min_registered=2,
                         round_deadline_s=900.0, eval_every=args.rounds)
    raw["data"].update(num_devices=2)
    return raw


def measured_vs_computed(metrics: Path, down_mbps: float, up_mbps: float) -> list[dict]:
    from edgelora.experiments.report import communication_seconds
    from edgelora.runlog import read_records

    out = []
    for rec in read_records(metrics):
        for d in rec["devices"]:
            if d["status"] != "completed":
                continue
            one = {"sampled": 1, "bytes_down": d["bytes_down"], "bytes_up": d["bytes_up"]}
            computed = communication_seconds(one, down_mbps, up_mbps)
            measured = d["download_s"] + d["upload_s"]
            out.append({"round": rec["round"], "device": d["device_id"], "bytes_down": d["bytes_down"],
                        "bytes_up": d["bytes_up"], "computed_s": round(computed, 3), "measured_s": round(measured, 3),
                        "ratio": round(measured / computed, 4)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.comm_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--sweep", default="examples/sweeps/cpu-profile.toml", help="take the run config from this sweep")
    ap.add_argument("--method", default="flasc-d1_4-u1_16", help="the sweep's method variant")
    ap.add_argument("--config", help="a run config instead of --sweep")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--downlink-mbps", type=float, default=4.0)
    ap.add_argument("--uplink-mbps", type=float, default=1.0)
    ap.add_argument("--app-throttle", action="store_true", help="the client's throttle instead of tc")
    ap.add_argument("--out", default=f"runs/comm-time-{time.strftime('%Y%m%d-%H%M%S')}")
    a = ap.parse_args(argv)
    if a.config:
        a.sweep = None
    raw = run_config(a)
    run_dir = Path(a.out)
    shaping = "app" if a.app_throttle else "tc"
    if shaping == "tc":
        from deploy.emulate import Emulation, EmulationConfig, EmulationError, check_host

        try:
            check_host()
        except EmulationError as e:
            print(f"comm_time: {e}; using the application-level throttle", file=sys.stderr)
            shaping = "app"
    print(f"comm_time: {raw['method']['name']} on {raw['model']['name']}, 2 devices, {a.rounds} rounds, "
          f"{a.downlink_mbps:g} Mbit/s down, {a.uplink_mbps:g} Mbit/s up ({shaping} shaping); {run_dir}", flush=True)
    if shaping == "tc":
        cfg = EmulationConfig.from_toml({"emulation": {"devices": 2}, "run": raw,
                                         "link": {"uplink_mbit": a.uplink_mbps, "downlink_mbit": a.downlink_mbps}})
        Emulation(cfg, run_dir, tag="ct").run()
    else:
        from benchmarks.uplink import with_app_throttle

        with_app_throttle(raw, run_dir, up_mbit=a.uplink_mbps, down_mbit=a.downlink_mbps)
    records = [{**r, "shaping": shaping} for r in measured_vs_computed(run_dir / "metrics.jsonl", a.downlink_mbps,
                                                                      a.uplink_mbps)]
    Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{'round':>5} {'dev':>3} {'bytes down':>10} {'bytes up':>9} {'computed s':>10} {'measured s':>10} "
          f"{'ratio':>6}")
    for r in records:
        print(f"{r['round']:>5} {r['device']:>3} {r['bytes_down']:>10} {r['bytes_up']:>9} {r['computed_s']:>10.2f} "
              f"{r['measured_s']:>10.2f} {r['ratio']:>6.3f}")
    worst = max(abs(r["ratio"] - 1) for r in records) if records else float("nan")
    print(f"worst |measured / computed - 1| = {worst:.3f} (goal <= {GOAL}): {'met' if worst <= GOAL else 'NOT met'}")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
