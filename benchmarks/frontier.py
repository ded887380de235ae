"""The communication frontier of a sweep: MB to the reference run's final accuracy, against Flower's float32.

    python -m benchmarks.frontier results/frontier --json results/frontier/frontier.json

One record per federated run with a reference run (the sweep's [report] reference, or --reference) of its
partition and seed: `run`, `target` (the reference's final accuracy, the mean of its last 3 evaluated rounds),
`mb_to_target` (down + up, until the mean of the run's last --smooth evaluated rounds first reaches the
target), `flower_mb_to_target` (what Flower 1.42's FedAvg sends for the reference's rounds up to the target:
edgelora.experiments.flower), `ratio` (flower / ours; null where the run never reached the target), `final_accuracy`
(its last evaluated round) and `last3_accuracy`. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgelora.experiments.report import collect, frontier, report_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a sweep folder (edgelora sweep --out)")
    parser.add_argument("--reference", help="the reference variant (default: the sweep's [report] reference)")
    parser.add_argument("--smooth", type=int, help="rounds averaged when judging a run (default: [report] smooth, else 3)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    settings = report_settings(Path(args.results))
    settings["reference"] = args.reference or settings.get("reference")
    if not settings["reference"]:
        parser.error("no reference variant: give --reference or set [report] reference in the sweep file")
    settings["smooth"] = args.smooth or settings.get("smooth", 3)
    settings["flower_baseline"] = True
    records = frontier(collect(Path(args.results)), settings)
    if not records:
        parser.error(f"no run of {args.results} has a {settings['reference']!r} run of its partition and seed")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"{'run':<34} {'rounds':>6} {'target':>7} {'MB to target':>12} {'Flower MB':>10} {'ratio':>7} "
          f"{'final':>6} {'last 3':>7}")
    for r in records:
        print(f"{r['run']:<34} {r['rounds_done']:>6} {r['target']:>7.4f} {fmt(r['mb_to_target'], '12.1f'):>12} "
              f"{fmt(r['flower_mb_to_target'], '10.1f'):>10} {'-' if r['ratio'] is None else format(r['ratio'], '6.1f') + 'x':>7} {fmt(r['final_accuracy'], '6.3f'):>6} "
              f"{fmt(r['last3_accuracy'], '7.4f'):>7}")
    best = max((r for r in records if r["ratio"]), key=lambda r: r["ratio"], default=None)
    if best:
        print(f"best: {best['run']}, {best['ratio']:.1f}x fewer bytes than Flower's dense float32 LoRA to "
              f"accuracy {best['target']:.4f} ({best['mb_to_target']:.1f} MB vs {best['flower_mb_to_target']:.1f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
