"""`edgelora sweep --report DIR`: a summary of whatever runs of a sweep have finished rounds, and its plots.

Writes DIR/summary.csv (one row per run), DIR/summary.md (the same, plus the mean and spread over seeds of
each method x partition, and each federated run against its ceiling: the centralized run with the same
[method], partition and seed) and, where the sweep has the runs for them:
- accuracy_rounds.png: accuracy per round, one panel per partition, one line per run;
- accuracy_bytes.png: accuracy against total MB communicated (FLASC Fig. 2);
- gap_heterogeneity.png: final accuracy of FFT minus each PEFT method, per partition (SLoRA Fig. 1),
  when [report] names `fft` and `peft` variants;
- time_to_target.png: communication time to reach [report] target_accuracy when the uplink is 1x, 4x, 16x
  slower than the downlink (FLASC Fig. 3), computed from the measured bytes per device and round.

A sweep of causal-LM runs (model.task = "causal-lm") is scored by held-out perplexity (lower is better):
summary.md leads with it, the learning-rate choice and the ceiling ratios use it, and perplexity_rounds.png
and perplexity_bytes.png join the accuracy plots (whose accuracy is then FLASC's next-token accuracy).
With [report] reference naming a variant, summary.md adds the MB (down + up) each run needed to first reach
the reference run's final score (its mean over the last 3 evaluated rounds) of the same partition and seed;
`smooth = 3` judges each run by the mean of its last 3 evaluated rounds too (one lucky round does not count as
reaching the target), and `flower_baseline = true` adds what Flower's dense float32 FedAvg would have sent for
the reference run's rounds up to the target (edgelora.experiments.flower) and that over each run's MB: the frontier table
(`python -m benchmarks.frontier DIR` prints the same records).

Where DIR/full-test.json exists (`edgelora evaluate DIR/runs/* --max-examples 0 --json DIR/full-test.json`),
summary.md adds each run's accuracy on the whole test split, for runs scored at their last round.

    [report]
    fft = "fft"                   # the FFT variant the gap is measured against
    peft = ["lora", "houlsby"]    # the PEFT variants whose gap is plotted
    target_accuracy = 0.30        # for time_to_target.png
    downlink_mbps = 10.0
    uplink_slowdowns = [1, 4, 16]
    time_methods = ["lora", "flasc-1_16"]
    reference = "lora"            # the MB-to-target table's reference variant
    smooth = 3                    # a run reaches a target when the mean of its last 3 evaluated rounds does
    flower_baseline = true        # add Flower's float32 bytes to the same target
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import tomllib

from edgelora.experiments import flower
from edgelora.runlog import pyplot, read_records


class Metric(NamedTuple):
    """A score in metrics.jsonl: its key, its name in tables and plots, and whether higher is better."""
    key: str
    label: str
    higher_is_better: bool

    def best(self, values: list[float]) -> float:
        return max(values) if self.higher_is_better else min(values)

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target


ACCURACY = Metric("accuracy", "acc", True)
PERPLEXITY = Metric("perplexity", "ppl", False)


def metrics_of(rows: list[dict]) -> tuple[Metric, ...]:
    """The scores a sweep's report shows, the first one leading: perplexity then (token) accuracy when any
    run is a causal LM, else accuracy."""
    return (PERPLEXITY, ACCURACY) if any(r.get("task") == "causal-lm" for r in rows) else (ACCURACY,)

CSV_COLUMNS = ("run", "method", "partition", "seed", "rounds_done", "final_accuracy", "best_accuracy", "bytes_up",
               "bytes_down", "seconds")
LM_CSV_COLUMNS = CSV_COLUMNS[:5] + ("final_perplexity", "best_perplexity") + CSV_COLUMNS[5:]


WHOLE_TEST = "full-test.json"  # `edgelora evaluate DIR/runs/* --max-examples 0 --json DIR/full-test.json`


def collect(out: Path) -> list[dict]:
    """One row per planned run that has at least one finished round, in plan order; with its metrics rows
    and, where DIR/full-test.json scored its last round's model, its accuracy on the whole test split."""
    out = Path(out)
    plan_path = out / "plan.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{out} is not a sweep folder (no plan.json; run `edgelora sweep --config ...` first)")
    whole_path = out / WHOLE_TEST
    whole_test = {r["run"]: r for r in json.loads(whole_path.read_text())} if whole_path.exists() else {}
    rows = []
    for p in json.loads(plan_path.read_text()):
        recs = read_records(out / "runs" / p["run"] / "metrics.jsonl")
        if not recs:
            continue
        config = tomllib.loads((out / "runs" / p["run"] / "config.toml").read_text())
        whole = whole_test.get(p["run"], {})
        fresh = whole.get("rounds") == recs[-1]["round"]  # a rescoring of an earlier round's model is stale
        row = {**p, "folder": out / "runs" / p["run"], "rounds_done": recs[-1]["round"],
               "rounds_planned": config["server"]["rounds"],
               "method_table": config["method"], "task": config.get("model", {}).get("task", "classification"),
               "bytes_up": sum(r["bytes_up"] for r in recs), "bytes_down": sum(r["bytes_down"] for r in recs),
               "seconds": round(sum(r["seconds"] for r in recs), 1), "records": recs}
        for m in (ACCURACY, PERPLEXITY):
            vals = [r[m.key] for r in recs if r.get(m.key) is not None]
            row.update({f"final_{m.key}": vals[-1] if vals else None, f"best_{m.key}": m.best(vals) if vals else None,
                        f"last3_{m.key}": tail_score(recs, m.key),
                        f"whole_test_{m.key}": whole.get(m.key) if fresh else None})
        rows.append(row)
    return rows


def report_settings(out: Path) -> dict[str, Any]:
    """The sweep file's [report] table, plus `partition_order`: its [partitions] in the order written."""
    path = Path(out) / "sweep.toml"
    raw = tomllib.loads(path.read_text()) if path.exists() else {}
    return {**raw.get("report", {}), "partition_order": list(raw.get("partitions", {}))}


def in_partition_order(rows: list[dict], order: list[str]) -> list[dict]:
    """Rows with their partitions in the sweep file's order (IID first, the most heterogeneous last), which
    the plots follow, instead of the order runs happened to run in."""
    return sorted(rows, key=lambda r: order.index(r["partition"]) if r["partition"] in order else len(order))


def write_report(out: Path) -> list[Path]:
    out = Path(out)
    rows = collect(out)
    settings = report_settings(out)
    written = [_write_csv(out / "summary.csv", rows), _write_markdown(out / "summary.md", rows, settings)]
    rows = in_partition_order(rows, settings["partition_order"])
    for m in metrics_of(rows):
        for plot, name in ((plot_accuracy_rounds, f"{m.key}_rounds.png"), (plot_accuracy_bytes, f"{m.key}_bytes.png")):
            p = plot(rows, out / name, m)
            written += [p] if p else []
    if settings.get("fft") and settings.get("peft"):
        p = plot_gap(rows, settings["fft"], settings["peft"], out / "gap_heterogeneity.png")
        written += [p] if p else []
    if settings.get("target_accuracy"):
        p = plot_time_to_target(rows, settings, out / "time_to_target.png")
        written += [p] if p else []
    if settings.get("reference") and settings.get("flower_baseline"):
        p = plot_frontier(rows, settings, out / "frontier.png", metrics_of(rows)[0])
        written += [p] if p else []
    return written


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    columns = LM_CSV_COLUMNS if PERPLEXITY in metrics_of(rows) else CSV_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r[c]) if c.endswith(("accuracy", "perplexity")) else r[c] for c in columns])
    return path


def group_by_variant(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["partition"]), []).append(r)
    return groups


def spread(values: list[float]) -> str:
    """mean, and min-max when there are several: '0.4120 (0.4010-0.4230, n=2)'."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}, n={len(values)})"


def _score_keys(rows: list[dict]) -> list[tuple[str, str]]:
    """(row key, column name) of every score column: final, last 3, best (and whole test where scored) of each
    metric, the leading metric first."""
    whole = any(r.get(f"whole_test_{m.key}") is not None for r in rows for m in metrics_of(rows))
    return [(f"{kind}_{m.key}", f"{name} {m.label}") for m in metrics_of(rows)
            for kind, name in (("final", "final"), ("last3", "last 3"), ("best", "best"))
            + ((("whole_test", "whole test"),) if whole else ())]


def _write_markdown(path: Path, rows: list[dict], settings: dict) -> Path:
    scores = _score_keys(rows)
    lead = metrics_of(rows)[0]
    lines = ["| run | method | partition | seed | rounds | " + "".join(f"{c} | " for _, c in scores)
             + "MB up | MB down | seconds |", "|---|---|---|---:|---:|" + "---:|" * len(scores) + "---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['partition']} | {r['seed']} | {r['rounds_done']} | "
                     + "".join(f"{_fmt(r.get(k))} | " for k, _ in scores)
                     + f"{r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | {r['seconds']:.0f} |")
    lines += ["", "Mean over seeds (min-max):", "",
              "| method | partition | " + "".join(f"{c} | " for _, c in scores) + "MB up + down (mean) |",
              "|---|---|" + "---|" * len(scores) + "---:|"]
    for (m, p), g in group_by_variant(rows).items():
        cells = [spread([r[k] for r in g if r.get(k) is not None]) for k, _ in scores]
        mb = statistics.mean((r["bytes_up"] + r["bytes_down"]) / 1e6 for r in g)
        lines.append(f"| {m} | {p} | " + " | ".join(cells) + f" | {mb:.1f} |")
    pairs = ceiling_pairs(rows)
    if pairs:
        ratio_keys = {f"{k}_{lead.key}": name for k, name in _RATIO_KINDS.items()}
        lines += ["", "Federated runs against their ceiling (the centralized run of the same method, partition "
                      f"and seed): {lead.key}, and federated / ceiling:", "",
                  "| run | ceiling | " + " | ".join(f"{k} | ceiling | ratio" for k in ratio_keys.values()) + " |",
                  "|---|---|" + "---:|---:|---:|" * len(ratio_keys)]
        def ratio_row(label: str, ceiling: str, feds: list[dict], ceils: list[dict]) -> str:
            cells = []
            for k in ratio_keys:
                a = [r[k] for r in feds if r.get(k) is not None]
                c = [r[k] for r in ceils if r.get(k) is not None]
                ok = len(a) == len(c) == len(feds)
                a, c = (statistics.mean(a), statistics.mean(c)) if ok else (None, None)
                cells += [_fmt(a), _fmt(c), f"{100 * a / c:.1f} %" if ok and c else ""]
            return f"| {label} | {ceiling} | " + " | ".join(cells) + " |"

        for fed, ceil in pairs:
            lines.append(ratio_row(fed["run"], ceil["run"], [fed], [ceil]))
        by_variant: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
        for fed, ceil in pairs:
            by_variant.setdefault((fed["method"], fed["partition"]), []).append((fed, ceil))
        for (m, p), g in by_variant.items():
            if len(g) > 1:  # the mean of each over seeds, and the ratio of the means
                lines.append(ratio_row(f"{m} {p}, mean of {len(g)} seeds", g[0][1]["method"],
                                       [f for f, _ in g], [c for _, c in g]))
    choices = lr_choices(rows, lead)
    if choices:
        lines += ["", f"Learning-rate choice (score: mean {lead.key} of the last 3 evaluated rounds; * = chosen):", "",
                  "| method | learning rate: score |", "|---|---|"]
        for fam, c in choices.items():
            cells = ", ".join(f"{lr}: {v:.4f}{' *' if lr == c['best'] else ''}" for lr, v in
                              sorted(c["scores"].items(), key=lambda kv: float(kv[0])))
            lines.append(f"| {fam} | {cells} |")
    if settings.get("target_accuracy"):
        lines += ["", f"Communication time to reach accuracy {settings['target_accuracy']} "
                      f"(downlink {settings.get('downlink_mbps', 10.0)} Mbit/s; seconds, '-' = not reached):", ""]
        slow = settings.get("uplink_slowdowns", [1, 4, 16])
        lines += ["| run | " + " | ".join(f"uplink {s}x slower" for s in slow) + " |",
                  "|---|" + "---:|" * len(slow)]
        for r in rows:
            if r["method"] in settings.get("time_methods", [r["method"]]):
                cells = [time_to_target(r["records"], settings["target_accuracy"],
                                        settings.get("downlink_mbps", 10.0), s) for s in slow]
                lines.append(f"| {r['run']} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    if settings.get("reference"):
        lines += _mb_to_reference(rows, settings, lead)
    path.write_text("\n".join(lines) + "\n")
    return path


_RATIO_KINDS = {"final": "final", "last3": "last 3", "whole_test": "whole test"}


def rounds_to_target(records: list[dict], metric: Metric, target: float, smooth: int = 1) -> int | None:
    """Index into `records` of the first evaluated round whose score (the mean of the last `smooth`
    evaluated rounds, fewer at the start) reaches `target`; None when the run never did."""
    seen: list[float] = []
    for i, x in enumerate(records):
        if x.get(metric.key) is not None:
            seen.append(x[metric.key])
            if metric.reached(statistics.mean(seen[-smooth:]), target):
                return i
    return None


def mb_to_target(records: list[dict], metric: Metric, target: float, smooth: int = 1) -> float | None:
    """Total MB (down + up) communicated until the round of rounds_to_target; None when it never came."""
    i = rounds_to_target(records, metric, target, smooth)
    return None if i is None else sum(x["bytes_up"] + x["bytes_down"] for x in records[:i + 1]) / 1e6


def frontier(rows: list[dict], settings: dict, metric: Metric = ACCURACY) -> list[dict]:
    """One record per federated run that has a reference run (the [report] reference variant of its partition
    and seed): the target (the reference's final score, its last-3 mean), the MB it and the reference took to
    reach it, and with flower_baseline what Flower's float32 FedAvg would have sent over the reference's
    rounds to it, and that over the run's MB (`ratio`; None where the run never reached the target)."""
    reference, smooth = settings["reference"], int(settings.get("smooth", 1))
    refs = {(r["partition"], r["seed"]): r for r in rows if r["method"] == reference and r.get(f"last3_{metric.key}")}
    out = []
    for r in rows:
        ref = refs.get((r["partition"], r["seed"]))
        if ref is None or r["mode"] != "federated":
            continue
        target = ref[f"last3_{metric.key}"]
        rec = {"run": r["run"], "method": r["method"], "target": target,
               "mb_to_target": mb_to_target(r["records"], metric, target, smooth),
               "reference_mb_to_target": mb_to_target(ref["records"], metric, target, smooth),
               f"final_{metric.key}": r.get(f"final_{metric.key}"), f"last3_{metric.key}": r.get(f"last3_{metric.key}"),
               "rounds_done": r["rounds_done"], "mb_total": (r["bytes_up"] + r["bytes_down"]) / 1e6}
        if settings.get("flower_baseline"):
            per_model = flower.model_bytes(str(ref["folder"]))
            hit = rounds_to_target(ref["records"], metric, target, smooth)
            rec["flower_mb_to_target"] = None if hit is None else sum(
                flower.round_bytes(x, per_model) for x in ref["records"][:hit + 1]) / 1e6
            mine = rec["mb_to_target"]
            rec["ratio"] = rec["flower_mb_to_target"] / mine if mine and rec["flower_mb_to_target"] else None
        out.append(rec)
    return out


def _mb_to_reference(rows: list[dict], settings: dict, metric: Metric) -> list[str]:
    """summary.md's table of the MB each federated run needed to reach its reference run's final score."""
    reference, smooth, flower = settings["reference"], int(settings.get("smooth", 1)), settings.get("flower_baseline")
    records = frontier(rows, settings, metric)
    if not records:
        return []
    judged = "" if smooth == 1 else f"; a run reaches it when the mean of its last {smooth} evaluated rounds does"
    lines = ["", f"MB (down + up) to first reach the final {metric.key} (mean of its last 3 evaluated rounds) of "
                 f"{reference!r} with the same partition and seed{judged}, and the reference's MB over yours"
                 + (", and what Flower's dense float32 FedAvg would send over the reference's rounds to the target "
                    "(edgelora.experiments.flower) over yours" if flower else "") + ":", "",
             f"| run | target {metric.label} | MB to target | {reference} MB / run MB | "
             + ("Flower MB | Flower MB / run MB | " if flower else "") + f"final {metric.label} | last 3 |",
             "|---|---:|---:|---:|" + ("---:|---:|" if flower else "") + "---:|---:|"]
    for rec in records:
        mine, theirs = rec["mb_to_target"], rec["reference_mb_to_target"]
        ratio = f"{theirs / mine:.1f}x" if mine and theirs else "-"
        cells = [rec["run"], f"{rec['target']:.4f}", "-" if mine is None else f"{mine:.1f}", ratio]
        if flower:
            fl = rec["flower_mb_to_target"]
            cells += ["-" if fl is None else f"{fl:.1f}", "-" if rec["ratio"] is None else f"{rec['ratio']:.1f}x"]
        cells += [_fmt(rec[f"final_{metric.key}"]), _fmt(rec[f"last3_{metric.key}"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ceiling_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(federated run, its ceiling): the centralized run with the same [method] table, partition and seed."""
    key = lambda r: (json.dumps(r["method_table"], sort_keys=True), r["partition"], r["seed"])
    ceilings = {key(r): r for r in rows if r.get("mode") == "centralized"}
    return [(r, ceilings[key(r)]) for r in rows if r.get("mode") != "centralized" and key(r) in ceilings]


def tail_score(records: list[dict], key: str = "accuracy", last: int = 3) -> float | None:
    """Mean score of the last `last` evaluated rounds: the tuning score, steadier than the final round."""
    vals = [x[key] for x in records if x.get(key) is not None][-last:]
    return statistics.mean(vals) if vals else None


def lr_choices(rows: list[dict], metric: Metric = ACCURACY) -> dict[str, dict]:
    """For variants named `<family>-lr<value>` (a learning-rate grid): {family: {"scores": {lr: score},
    "best": lr}}, scored by tail_score of `metric` over every seed that finished all its rounds."""
    out: dict[str, dict] = {}
    for r in rows:
        family, sep, lr = r["method"].rpartition("-lr")
        if not sep or r["rounds_done"] < r["rounds_planned"]:
            continue
        score = tail_score(r["records"], metric.key)
        if score is not None:
            out.setdefault(family, {"scores": {}})["scores"][lr] = score
    for fam in out.values():
        pick = max if metric.higher_is_better else min
        fam["best"] = pick(fam["scores"], key=fam["scores"].get)
    return out


def per_device_bytes(rec: dict) -> tuple[float, float]:
    """Mean bytes one sampled device downloaded and uploaded in a round (devices transfer in parallel)."""
    n = max(rec.get("sampled") or len(rec.get("devices", [])) or 1, 1)
    return rec["bytes_down"] / n, rec["bytes_up"] / n


def communication_seconds(rec: dict, downlink_mbps: float, uplink_mbps: float) -> float:
    down, up = per_device_bytes(rec)
    return down * 8 / (downlink_mbps * 1e6) + up * 8 / (uplink_mbps * 1e6)


def time_to_target(records: list[dict], target: float, downlink_mbps: float, slowdown: float) -> float | None:
    """Communication seconds until the first evaluated round at or above `target` (FLASC Fig. 3: link time
    only, compute excluded); None when the run never reached it."""
    total = 0.0
    for rec in records:
        total += communication_seconds(rec, downlink_mbps, downlink_mbps / slowdown)
        if rec.get("accuracy") is not None and rec["accuracy"] >= target:
            return total
    return None


def _label(r: dict) -> str:
    return f"{r['method']} s{r['seed']}"


def _panels(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["partition"] not in seen:
            seen.append(r["partition"])
    return seen


def round_points(records: list[dict], key: str = "accuracy") -> list[tuple[float, float]]:
    return [(x["round"], x[key]) for x in records if x.get(key) is not None]


def byte_points(records: list[dict], key: str = "accuracy") -> list[tuple[float, float]]:
    """(total MB communicated so far, score); rounds without an evaluation still add their bytes. Round 0
    (a causal LM's base model, before any byte moved) has no point on a log axis."""
    total, pts = 0, []
    for x in records:
        total += x["bytes_up"] + x["bytes_down"]
        if x.get(key) is not None and total:
            pts.append((total / 1e6, x[key]))
    return pts


def plot_accuracy_rounds(rows: list[dict], path: Path, metric: Metric = ACCURACY) -> Path | None:
    return _plot_panels(rows, path, round_points, "round", metric)


def plot_accuracy_bytes(rows: list[dict], path: Path, metric: Metric = ACCURACY) -> Path | None:
    federated = [r for r in rows if r["mode"] == "federated"]  # a centralized run moves no bytes
    return _plot_panels(federated, path, byte_points, "total MB communicated (down + up, indices included)",
                        metric, log_x=True)


def _plot_panels(rows: list[dict], path: Path, points, xlabel: str, metric: Metric = ACCURACY,
                 log_x: bool = False) -> Path | None:
    """One panel per partition, one line per run (centralized dashed, later seeds lighter); None: no runs."""
    if not rows:
        return None
    plt = pyplot()
    parts = _panels(rows)
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts) + 1.5, 3.6), squeeze=False, sharey=True)
    colors = _colors(rows)
    for ax, part in zip(axes[0], parts):
        for r in (r for r in rows if r["partition"] == part):
            pts = points(r["records"], metric.key)
            if pts:
                ax.plot(*zip(*pts), label=_label(r), color=colors[r["method"]],
                        alpha=1.0 if r["seed"] == 0 else 0.5, linestyle="--" if r["mode"] == "centralized" else "-")
        if log_x:
            ax.set_xscale("log")
        ax.set_title(part), ax.set_xlabel(xlabel), ax.grid(alpha=0.3, which="both" if log_x else "major")
        if not log_x:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = {"accuracy": "next-token accuracy" if rows[0].get("task") == "causal-lm" else "accuracy",
            "perplexity": "perplexity"}[metric.key]
    axes[0][0].set_ylabel(f"{name} (server's evaluation split)")
    if metric is PERPLEXITY:
        axes[0][0].set_yscale("log")
    labelled = {}  # every panel's runs in one legend (a run shows in one panel only)
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(l, h)
    axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, plt, path)


def smoothed_byte_points(records: list[dict], key: str, smooth: int, per_round=None) -> list[tuple[float, float]]:
    """byte_points with each score the mean of the last `smooth` evaluated rounds; per_round(record) gives a
    round's bytes (default: the run's own down + up)."""
    total, seen, pts = 0, [], []
    for x in records:
        total += per_round(x) if per_round else x["bytes_up"] + x["bytes_down"]
        if x.get(key) is not None:
            seen.append(x[key])
            if total:
                pts.append((total / 1e6, statistics.mean(seen[-smooth:])))
    return pts


def plot_frontier(rows: list[dict], settings: dict, path: Path, metric: Metric = ACCURACY) -> Path | None:
    """Left: every run's score (smoothed as the frontier judges it) against total MB, log scale, with Flower's
    dense float32 FedAvg (the reference run's scores at Flower's bytes) and the target; right: each run's
    MB to the target against its final score (last-3 mean). One panel pair per reference run (seed)."""
    records = {r["run"]: r for r in frontier(rows, settings, metric)}
    refs = [r for r in rows if r["method"] == settings["reference"] and r["run"] in records]
    if not refs:
        return None
    plt = pyplot()
    smooth = int(settings.get("smooth", 1))
    fig, axes = plt.subplots(len(refs), 2, figsize=(13, 4.6 * len(refs)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for (curves, scatter), ref in zip(axes, refs):
        mine = [r for r in rows if r["run"] in records and (r["partition"], r["seed"]) == (ref["partition"], ref["seed"])]
        per_model = flower.model_bytes(str(ref["folder"]))
        target = records[ref["run"]]["target"]
        for i, r in enumerate(mine):
            pts = smoothed_byte_points(r["records"], metric.key, smooth)
            curves.plot(*zip(*pts), marker=".", markersize=3, linewidth=1, color=cmap(i % 20), label=r["run"])
            rec = records[r["run"]]
            if rec["mb_to_target"]:
                scatter.scatter(rec["mb_to_target"], rec[f"last3_{metric.key}"], color=cmap(i % 20))
                scatter.annotate(r["method"], (rec["mb_to_target"], rec[f"last3_{metric.key}"]), fontsize=6,
                                 xytext=(3, 2), textcoords="offset points")
        fl = smoothed_byte_points(ref["records"], metric.key, smooth, lambda x: flower.round_bytes(x, per_model))
        curves.plot(*zip(*fl), color="black", linestyle="--", linewidth=1.2, label="Flower, dense float32 LoRA")
        flower_mb = records[ref["run"]].get("flower_mb_to_target")
        if flower_mb:
            scatter.scatter(flower_mb, ref[f"last3_{metric.key}"], color="black", marker="x")
            scatter.annotate("Flower float32", (flower_mb, ref[f"last3_{metric.key}"]), fontsize=6,
                             xytext=(3, 2), textcoords="offset points")
        for ax in (curves, scatter):
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
        curves.axhline(target, color="grey", linewidth=0.8)
        curves.set_xlabel("total MB communicated (down + up)")
        curves.set_ylabel(f"{metric.key} (mean of the last {smooth} evaluations)")
        curves.set_title(f"{ref['partition']}, seed {ref['seed']}: target {target:.4f} ({ref['run']}'s last 3)")
        curves.legend(fontsize=6, ncol=2)
        scatter.set_xlabel("MB to the target (log)")
        scatter.set_ylabel(f"final {metric.key} (last-3 mean)")
        scatter.set_title("MB to target against final score (runs that reached it)")
    return _save(fig, plt, path)


def gap_table(rows: list[dict], fft: str, peft: list[str]) -> dict[str, dict[str, float]]:
    """{peft variant: {partition: mean final accuracy of fft - mean final accuracy of the variant}}."""
    groups = group_by_variant(rows)
    mean = lambda g: statistics.mean(r["final_accuracy"] for r in g)
    out: dict[str, dict[str, float]] = {}
    for m in peft:
        for part in _panels(rows):
            if (fft, part) in groups and (m, part) in groups:
                out.setdefault(m, {})[part] = mean(groups[(fft, part)]) - mean(groups[(m, part)])
    return out


def plot_gap(rows: list[dict], fft: str, peft: list[str], path: Path) -> Path | None:
    gaps = gap_table([r for r in rows if r["final_accuracy"] is not None], fft, peft)
    if not gaps:
        return None
    plt = pyplot()
    parts = [p for p in _panels(rows) if any(p in g for g in gaps.values())]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    width = 0.8 / len(gaps)
    for i, (m, g) in enumerate(gaps.items()):
        xs = [j + i * width for j, p in enumerate(parts) if p in g]
        ax.bar(xs, [100 * g[p] for p in parts if p in g], width, label=m)
    ax.set_xticks([j + width * (len(gaps) - 1) / 2 for j in range(len(parts))], parts)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("data distribution (more heterogeneous to the right)")
    ax.set_ylabel(f"{fft} minus PEFT final accuracy (points)")
    ax.legend(fontsize=8), ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def plot_time_to_target(rows: list[dict], settings: dict, path: Path) -> Path | None:
    target, down = settings["target_accuracy"], settings.get("downlink_mbps", 10.0)
    slow = settings.get("uplink_slowdowns", [1, 4, 16])
    chosen = [r for r in rows if r["method"] in settings.get("time_methods", [r["method"]]) and r["mode"] == "federated"]
    if not chosen:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(chosen)
    for i, r in enumerate(chosen):
        vals = [time_to_target(r["records"], target, down, s) for s in slow]
        xs = [j + i * width for j in range(len(slow))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=r["run"])
        for x, v in zip(xs, vals):
            if v is None:
                ax.text(x, 0, "not\nreached", ha="center", va="bottom", fontsize=6)
    ax.set_xticks([j + width * (len(chosen) - 1) / 2 for j in range(len(slow))], [f"{s}x" for s in slow])
    ax.set_xlabel(f"uplink slowdown vs a {down:g} Mbit/s downlink")
    ax.set_ylabel(f"communication s to accuracy {target}")
    ax.set_yscale("log"), ax.legend(fontsize=7), ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def _colors(rows: list[dict]) -> dict[str, Any]:
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r["method"] for r in rows))
    return {m: cycle[i % len(cycle)] for i, m in enumerate(names)}


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
