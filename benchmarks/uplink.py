"""Wall-clock uploads over a slow uplink: 2 devices, each behind a 1 Mbit/s uplink and a 10 Mbit/s downlink.

    python -m benchmarks.uplink --json uplink.jsonl [--out runs/uplink] [--app-throttle]

Runs FLASC (upload density 1/16) for 2 rounds on tiny-bert and on MiniLM, and one round of dense float32 LoRA
on MiniLM at the same rank, with real `tc` shaping in network namespaces (deploy/emulate.py) when root and
iproute2 are there, otherwise with the client's application-level throttle. Writes one JSON record per upload
(JSON Lines) with `model`, `bytes` (gRPC message bytes the server received), `upload_s` (server clock, first
to last upload message) and `link_limit_s` = bytes * 8 / uplink rate. Goal: upload_s <= 1.15 x link_limit_s
for every payload over 100 kB.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgelora.launch import Client, Launcher

UP_MBIT, DOWN_MBIT, GOAL, BIG = 1.0, 10.0, 1.15, 100_000


def run_config(model: str, method: dict, rounds: int) -> dict:
    return {"server": {"rounds": rounds, "devices_per_round": 2, "min_devices": 2, "round_deadline_s": 900.0,
                       "heartbeat_s": 5.0},
            "model": {"name": model, "max_seq_len": 64 if model == "minilm" else 32},
            "data": {"dataset": "20newsgroups", "num_devices": 2, "partition": "iid", "max_examples_per_device": 32,
                     "test_max_examples": 64},
            "train": {"batch_size": 16, "lr": 2e-3},
            "method": method}


FLASC = {"name": "flasc", "upload_density": 1 / 16, "download_density": 0.25,
         "lora": {"rank": 16, "alpha": 16.0, "dropout": 0.1}}
DENSE_LORA = {"name": "lora", "lora": {"rank": 16, "alpha": 16.0, "dropout": 0.1}}
CASES = [("tiny-bert", "flasc", FLASC, 2), ("minilm", "flasc", FLASC, 2), ("minilm", "lora", DENSE_LORA, 1)]


def with_tc(raw: dict, run_dir: Path, tag: str) -> None:
    from deploy.emulate import Emulation, EmulationConfig, print_report

    cfg = EmulationConfig.from_toml({"emulation": {"devices": 2}, "run": raw,
                                     "link": {"uplink_mbit": UP_MBIT, "downlink_mbit": DOWN_MBIT}})
    print_report(Emulation(cfg, run_dir, tag=tag).run())


def with_app_throttle(raw: dict, run_dir: Path, up_mbit: float = UP_MBIT, down_mbit: float = DOWN_MBIT) -> None:
    throttled_fleet(raw, run_dir, [(up_mbit, down_mbit)] * 2)


def throttled_fleet(raw: dict, run_dir: Path, links: list[tuple[float, float]], env: dict | None = None) -> None:
    """A server and one client process per (uplink, downlink) Mbit/s pair, device i behind the client's
    application throttle at links[i]; returns when the server has finished the run."""
    with Launcher(run_dir, env=env) as fleet:
        fleet.start_server(raw, args=["--insecure"], log=run_dir / "server.log")
        fleet.start_clients(Client(device_id=str(i), log=run_dir / f"client_{i}.log",
                                   args=["--quiet", "--insecure", "--uplink-mbps", str(up),
                                         "--downlink-mbps", str(down)])
                            for i, (up, down) in enumerate(links))
        if fleet.wait_server(1800) != 0:
            raise RuntimeError(f"server failed; see {run_dir / 'server.log'}")


def uploads(run_dir: Path, model: str, method: str, shaping: str) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for d in rec["devices"]:
            if d["status"] != "completed":
                continue
            limit = d["bytes_up"] * 8 / (UP_MBIT * 1e6)
            out.append({"model": model, "method": method, "round": rec["round"], "device": d["device_id"],
                        "bytes": d["bytes_up"], "upload_s": round(d["upload_s"], 4),
                        "link_limit_s": round(limit, 4), "ratio": round(d["upload_s"] / limit, 4),
                        "shaping": shaping})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.uplink", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write one JSON record per upload here (JSON Lines)")
    ap.add_argument("--out", default=f"runs/uplink-{time.strftime('%Y%m%d-%H%M%S')}", help="run folders go here")
    ap.add_argument("--app-throttle", action="store_true", help="use the client's throttle even when tc is there")
    a = ap.parse_args(argv)
    from deploy.emulate import EmulationError, check_host

    shaping = "app"
    if not a.app_throttle:
        try:
            check_host()
            shaping = "tc"
        except EmulationError as e:
            print(f"uplink: {e}; using the application-level throttle", file=sys.stderr)
    records = []
    for i, (model, method, spec, rounds) in enumerate(CASES):
        run_dir = Path(a.out) / f"{model}-{method}"
        print(f"== {model} {method}: {rounds} round(s), 2 devices, {UP_MBIT:g} Mbit/s up, {DOWN_MBIT:g} Mbit/s "
              f"down ({shaping} shaping); {run_dir}", flush=True)
        raw = run_config(model, spec, rounds)
        with_tc(raw, run_dir, tag=f"b{i}") if shaping == "tc" else with_app_throttle(raw, run_dir)
        records += uploads(run_dir, model, method, shaping)
    Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in records))

    print(f"\n{'model':>9} {'method':>6} {'round':>5} {'dev':>3} {'bytes':>9} {'upload_s':>8} {'link_s':>7} "
          f"{'ratio':>6}")
    for r in records:
        print(f"{r['model']:>9} {r['method']:>6} {r['round']:>5} {r['device']:>3} {r['bytes']:>9} "
              f"{r['upload_s']:>8.2f} {r['link_limit_s']:>7.2f} {r['ratio']:>6.3f}")
    big = [r for r in records if r["bytes"] > BIG]
    worst = max((r["ratio"] for r in big), default=float("nan"))
    print(f"\npayloads > {BIG // 1000} kB: {len(big)}, worst upload_s / link_limit_s = {worst:.3f} "
          f"(goal <= {GOAL}): {'met' if big and worst <= GOAL else 'NOT met'}")
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else float("nan")
    dense = [r for r in records if r["model"] == "minilm" and r["method"] == "lora"]
    sparse = [r for r in records if r["model"] == "minilm" and r["method"] == "flasc"]
    print(f"\nMiniLM update over {UP_MBIT:g} Mbit/s:   dense float32 LoRA r=16      FLASC 1/16 (r=16)")
    print(f"  bytes                          {mean(dense, 'bytes'):>14,.0f}      {mean(sparse, 'bytes'):>14,.0f}")
    print(f"  upload seconds (measured)      {mean(dense, 'upload_s'):>14.2f}      {mean(sparse, 'upload_s'):>14.2f}")
    print(f"wrote {len(records)} records to {a.json}")
    return 0 if big and worst <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
