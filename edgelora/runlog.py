"""The run folder: config.toml, metrics.jsonl (records.RoundRecord rows), state/ (server.checkpoint), the
final adapter, the plots; and the per-round table in the terminal. Shared by every way a run is driven."""
from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .configtools import ConfigError
from .data import label_names
from .records import RoundRecord
from .schema import FILE_DATASETS, RunConfig
from .task_types import task_type

log = logging.getLogger("edgelora.runlog")


PHASES = ("download", "train (+ model build, encode)", "upload", "waiting for stragglers", "aggregate + evaluate")


def round_phases(rec: dict, deadline_s: float, sequential: bool = False) -> list[float] | None:
    """Seconds per PHASES for one metrics.jsonl record (None: no device completed).

    Devices in parallel (a server and its clients): means over the completed devices. A device waits from the
    round's start until its task goes out, and from its upload until the last upload (or the deadline, when
    a device was dropped). Devices one after another (`sequential`: the simulator): sums over the devices,
    with no waiting; every second not spent in a device's download, training or upload is the server's."""
    done = [d for d in rec.get("devices", []) if d["status"] == "completed"]
    if not done:
        return None
    if sequential:
        total = lambda f: sum(f(d) for d in done)
        down, train, up = (total(lambda d: d["download_s"]), total(lambda d: d["train_s"] + d["encode_s"]),
                           total(lambda d: d["upload_s"]))
        return [down, train, up, 0.0, max(0.0, rec.get("seconds", 0.0) - down - train - up)]
    dropped = any(d["status"] == "dropped" for d in rec["devices"])
    collected = deadline_s if dropped else max(d["upload_done_at"] for d in done)
    mean = lambda f: sum(f(d) for d in done) / len(done)
    # train: from the task leaving to the upload arriving (server clock), less the device's own download time
    down, up = mean(lambda d: d["download_s"]), mean(lambda d: d["upload_s"])
    train = mean(lambda d: max(d["train_s"] + d["encode_s"],
                               d["upload_started_at"] - d["task_sent_at"] - d["download_s"]))
    return [down, train, up, max(0.0, collected - down - train - up),
            max(0.0, rec.get("seconds", collected) - collected)]


_ROW_FIELDS = ("round", "stage", "completed", "sampled", "accuracy", "perplexity", "exact_match", "loss",
               "train_loss", "bytes_down", "bytes_up", "seconds")


# Instruction data's first figure: a column of its own, first of the metrics, in runs that score it.
EXACT_MATCH_METRIC = ("exact match", "exact_match", ".4f")


def _metrics(task: str, exact_match: bool) -> tuple[tuple[str, str, str], ...]:
    return ((EXACT_MATCH_METRIC,) if exact_match else ()) + task_type(task).table_metrics


def _columns(task: str, exact_match: bool = False) -> list[tuple[str, int]]:
    metrics = [(head, max(8, len(head))) for head, _, _ in _metrics(task, exact_match)]
    return [("round", 5), ("stage", 7), ("devices", 7), *metrics, ("test loss", 9), ("train loss", 10),
            ("MB down", 8), ("MB up", 8), ("seconds", 7)]


def round_table_header(task: str = "classification", exact_match: bool = False) -> list[str]:
    """The per-round table's two header lines (the run's terminal output, and `edgelora status`): the task's
    metrics (a classifier's accuracy; a causal LM's perplexity and token accuracy), led by exact match when
    the run scores it (causal-lm on instruction data)."""
    cols = _columns(task, exact_match)
    return ["  ".join(c.rjust(w) for c, w in cols), "  ".join("-" * w for _, w in cols)]


def round_table_row(row: dict, task: str = "classification", exact_match: bool = False) -> str:
    """One metrics.jsonl row as a line of the per-round table."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    metrics = [fmt(row.get(key), spec) for _, key, spec in _metrics(task, exact_match)]
    cells = (str(row["round"]), row["stage"], f"{row['completed']}/{row['sampled']}", *metrics,
             fmt(row.get("loss"), ".4f"), fmt(row.get("train_loss"), ".4f"), f"{row['bytes_down'] / 1e6:.3f}",
             f"{row['bytes_up'] / 1e6:.3f}", f"{row['seconds']:.1f}")
    return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, _columns(task, exact_match)))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def read_records(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# The plots are drawn when a run's first row lands, after its last round, when its RunFolder goes away (a run
# stopped, interrupted or abandoned), and otherwise at most this often. Drawing them is serial server time:
# ~0.3 s for the two (round_time.png ~1 s at 200 rounds), every round of a simulation of 1-s rounds if drawn
# each round; a bound in seconds keeps that under ~3 % whatever the round length, and a deployment whose
# rounds take minutes still sees them after every round.
PLOT_EVERY_S = 30.0


class RunFolder:
    def __init__(self, path: Path, run: RunConfig, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.run = run
        self.echo = functools.partial(print, flush=True)  # where the round table goes (a sweep sends it through its progress bar)
        if not resume:
            (self.path / "config.toml").write_text(run.to_toml())
            (self.path / "metrics.jsonl").write_text("")
        self._header_printed = False
        self.sequential_devices = False  # the simulator runs its devices one after another (round_phases)
        self._drawn_at: float | None = None  # time.monotonic() of the last draw
        self._undrawn = False  # rows came after it
        self._tensorboard = None

    def log_to_tensorboard(self) -> None:
        """Also write each round's metrics to RUN_DIR/tb (`tensorboard --logdir runs` shows runs side by side)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard: the tensorboard package is not installed "
                              "(pip install 'edgelora[tensorboard]')") from None
        self._tensorboard = SummaryWriter(str(self.path / "tb"))

    def _write_tensorboard(self, rec: dict) -> None:
        tb, step = self._tensorboard, rec["round"]
        scalars = {"accuracy": rec.get("accuracy"), "perplexity": rec.get("perplexity"),
                   "exact_match": rec.get("exact_match"), "loss/test": rec.get("loss"), "loss/train": rec.get("train_loss"),
                   "MB/down": rec["bytes_down"] / 1e6, "MB/up": rec["bytes_up"] / 1e6,
                   "seconds/round": rec.get("seconds")}
        phases = round_phases(rec, self.run.server.round_deadline_s, self.sequential_devices)
        for name, value in zip(PHASES, phases or ()):
            scalars[f"seconds/{name.split(' (')[0]}"] = value
        for tag, value in scalars.items():
            if value is not None:
                tb.add_scalar(tag, value, step)
        tb.flush()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def append(self, rec: RoundRecord) -> None:
        row = rec.to_json()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tensorboard is not None:
            self._write_tensorboard(row)
        self.print_row(rec)
        self._undrawn = self.run.server.plots
        if not self.run.server.plots:
            return
        if rec.round >= self.run.server.rounds or self._drawn_at is None or \
                time.monotonic() - self._drawn_at >= PLOT_EVERY_S:
            self.draw_plots()

    def append_base(self, score: Callable[[RoundRecord], None]) -> None:
        """Row 0: the base model's scores before round 1, so every curve starts where the model began.
        `score` writes them into the row (ServerRun.score; centralized: RoundRecord.set_scores)."""
        rec = RoundRecord(round=0, stage="base")
        score(rec)
        rec.close()
        self.append(rec)

    def commit_round(self, rec: RoundRecord, save_state: Callable[[], None], final_model=None) -> None:
        """A round's outputs in the order that makes a crash harmless: its row and (last round) the final model
        before the state, so a crash in between re-runs the round on resume (drop_rows_after drops the row)
        instead of losing its row or the model. Federated (server.run) and centralized runs both end rounds so."""
        self.append(rec)
        if final_model is not None:
            self.save_final_model(final_model)
        save_state()

    def draw_plots(self, rows: list[dict] | None = None) -> None:
        """RUN_DIR's plots from every row so far (RunFolder.append draws them when due: PLOT_EVERY_S)."""
        rows = self.records() if rows is None else rows
        self.plot(rows)
        self.plot_round_time(rows)
        self._drawn_at, self._undrawn = time.monotonic(), False

    def close(self) -> None:
        """The run stops (finished, interrupted or abandoned): rows that came after the last draw are drawn, so
        its plots show every round it ran."""
        if self._undrawn:
            try:
                self.draw_plots()
            except Exception as e:  # a plot must not hide why the run stopped; the rows are in metrics.jsonl
                log.warning("could not draw the plots of %s: %s", self.path, e)

    def append_abandoned(self, rec: RoundRecord, in_a_row: int, limit: int, needed: int) -> None:
        """An abandoned round: its record in RUN_DIR/abandoned.jsonl (what it sampled and spent), a line in the
        round table; metrics.jsonl keeps rounds that counted."""
        row = rec.to_json()
        with open(self.path / "abandoned.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.echo(f"round {rec.round} abandoned: {rec.completed} of {rec.sampled} devices reported, {needed} needed "
                  f"(server.min_devices); it runs again ({in_a_row} of {limit} in a row, "
                  f"server.max_abandoned_rounds)")

    def drop_rows_after(self, round_id: int) -> None:
        rows = [r for r in self.records() if r["round"] <= round_id]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def records(self) -> list[dict]:
        return read_records(self.metrics_path)

    def print_row(self, rec: RoundRecord) -> None:
        # from the config, not the row: a row without an evaluation (server.eval_every) must not drop the column
        task, exact = self.run.model.task, task_type(self.run.model.task).scores_exact_match(self.run)
        if not self._header_printed:
            for line in round_table_header(task, exact):
                self.echo(line)
            self._header_printed = True
        # a diverged loss shows as nan
        self.echo(round_table_row({f: getattr(rec, f) for f in _ROW_FIELDS}, task, exact))

    def plot(self, rows: list[dict] | None = None) -> None:
        """RUN_DIR/accuracy.png (a causal LM: perplexity.png): the task's first metric per round and against
        the total bytes communicated so far."""
        head, key, _ = task_type(self.run.model.task).table_metrics[0]
        label = "test accuracy" if key == "accuracy" else f"held-out {key}"
        rows = self.records() if rows is None else rows
        rounds, acc, cum, total = [], [], [], 0
        for r in rows:  # rows are in round order; rounds without an evaluation still add their bytes
            total += r["bytes_up"] + r["bytes_down"]
            if r.get(key) is not None:
                rounds.append(r["round"]), acc.append(r[key]), cum.append(total / 1e6)
        if not rounds:
            return
        plt = pyplot()
        from matplotlib.ticker import MaxNLocator

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        a1.plot(rounds, acc, marker="o")
        a1.set_xlabel("round"), a1.set_ylabel(label), a1.grid(alpha=0.3)
        a1.xaxis.set_major_locator(MaxNLocator(integer=True))
        a2.plot(cum, acc, marker="o")
        a2.set_xlabel("total MB communicated (down + up)"), a2.set_ylabel(label), a2.grid(alpha=0.3)
        fig.suptitle(f"{self.run.method.name} on {self.data_label()} ({self.run.model.name})")
        fig.tight_layout()
        fig.savefig(self.path / ("accuracy.png" if key == "accuracy" else f"{key}.png"), dpi=110)
        plt.close(fig)

    def plot_round_time(self, rows: list[dict] | None = None) -> None:
        """RUN_DIR/round_time.png: where each round's wall-clock time went (round_phases), and below it the
        download and upload alone on their own scale (next to training they are often too thin to see)."""
        rows = [(r["round"], round_phases(r, self.run.server.round_deadline_s, self.sequential_devices))
                for r in (self.records() if rows is None else rows)]
        rows = [r for r in rows if r[1] is not None]
        if not rows:
            return
        plt = pyplot()
        fig, (top, comm) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(rows) + 5), 5.6), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2]})
        x = [r[0] for r in rows]
        bottom = [0.0] * len(rows)
        for i, name in enumerate(PHASES):
            vals = [r[1][i] for r in rows]
            if self.sequential_devices and name == "waiting for stragglers":
                continue  # devices take turns: nobody waits
            top.bar(x, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        how = "sum over devices, in turn" if self.sequential_devices else \
            "mean over devices"
        top.set_ylabel(f"seconds ({how})", fontsize=8)
        top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        for i, name in ((0, "download"), (2, "upload")):
            comm.plot(x, [r[1][i] for r in rows], marker="o", label=name, color=f"C{i}")
        comm.set_ylabel("seconds"), comm.set_xlabel("round"), comm.grid(alpha=0.3)
        comm.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if len(x) <= 30:
            comm.set_xticks(x)
        top.set_title(f"where round time goes: {self.run.method.name} on {self.data_label()} ({self.run.model.name})")
        fig.tight_layout()
        fig.savefig(self.path / "round_time.png", dpi=110)
        plt.close(fig)

    def write_samples(self, samples: list[dict]) -> Path:
        """RUN_DIR/samples.md: held-out prompts with the base model's and the final model's greedy
        continuations side by side."""
        path = self.path / "samples.md"
        quote = lambda t: "<br>".join((t or "").replace("|", "\\|").splitlines()) or " "
        lines = [f"# Samples: {self.run.method.name} on {self.data_label()} ({self.run.model.name})", "",
                 "Greedy continuations of held-out prompts by the base model (before round 1) and the final "
                 "model.", ""]
        ref = any(s.get("reference") is not None for s in samples)
        lines += ["| prompt | " + ("held-out reference | " if ref else "") + "base model | final model |",
                  "|---|" + ("---|" if ref else "") + "---|---|"]
        for s in samples:
            lines.append(f"| {quote(s['prompt'])} | " + (f"{quote(s['reference'])} | " if ref else "")
                         + f"{quote(s['base'])} | {quote(s['final'])} |")
        path.write_text("\n".join(lines) + "\n")
        return path

    def data_label(self) -> str:
        """The data's name for plot titles: the file's name for csv/jsonl, else the dataset's."""
        d = self.run.data
        return Path(d.path).name if d.dataset in FILE_DATASETS and d.path else (d.path or d.dataset)

    def save_final_model(self, model) -> Path:
        """peft models save their adapter (PeftModel.from_pretrained loads it); others the trained model.

        The class names go where Hugging Face looks for them: `id2label`/`label2id` in the model's
        config.json (beside adapter_config.json for an adapter), and RUN_DIR/labels.json."""
        target = self.path / ("adapter" if hasattr(model, "peft_config") else "model")
        names = label_names(self.run.data, self.run.model.task)
        config = model.config
        if names and len(names) == config.num_labels:
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
            (self.path / "labels.json").write_text(json.dumps(list(names), indent=1) + "\n")
        model.save_pretrained(str(target))
        if hasattr(model, "peft_config"):
            config.save_pretrained(str(target))
        return target
