"""Resumable experiment sweeps: `edgelora sweep --config SWEEP.toml [--out DIR] [--max-minutes M]`.

A sweep file names a base run config and the variants to combine:

    [sweep]
    name = "smoke"
    base = "../lora.toml"            # a run config, relative to this file
    seeds = [0, 1]                    # each seed sets server.seed, data.seed and model.head_seed
    [sweep.set]                       # dotted overrides applied to every run
    "server.rounds" = 2
    [methods.lora]                    # a method variant: dotted overrides; "method.*" keys anywhere replace the
    "method.name" = "lora"            #   base's [method] table as a whole (method configs differ), and
                                      #   [sweep.set]'s "method.*" keys still apply to every method
    [methods.lora-central]
    mode = "centralized"              # the ceiling: edgelora.experiments.centralized instead of the simulator
    "method.name" = "lora"
    [partitions.iid]
    "data.partition" = "iid"
    [partitions."dir0.1"]             # a name with a dot needs quotes in TOML
    "data.partition" = "dirichlet"
    "data.alpha" = 0.1
    [[grid]]                          # runs = union over grid blocks of methods x partitions x seeds
    methods = ["lora", "lora-central"]
    partitions = ["iid"]
    seeds = [0]                       # optional; default sweep.seeds

Each run is an ordinary simulator run folder, DIR/runs/<method>-<partition>-s<seed>. Running the same
command again skips finished runs (metrics.jsonl holds the last round) and resumes unfinished ones from their
last completed round (state/ is saved after every round), so a sweep survives Ctrl-C or a machine going away.
`--max-minutes` stops between rounds once the budget is spent. A run whose folder holds another config than
the sweep now asks for is refused by name rather than silently mixed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelora.config import RunConfig, load_config, read_run_toml
from edgelora.configtools import ConfigError
from edgelora.data import with_num_labels
from edgelora.experiments.centralized import train_centralized
from edgelora.runlog import read_records
from edgelora.schema import read_toml
from edgelora.server.checkpoint import has_state
from edgelora.simulation.simulator import Simulator

SEED_KEYS = ("server.seed", "data.seed", "model.head_seed")
MODES = ("federated", "centralized")


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str        # the method variant's name in the sweep file (e.g. flasc-1/16)
    partition: str
    seed: int
    mode: str
    raw: dict = field(hash=False, compare=False)  # the run config as TOML tables

    def config(self) -> RunConfig:
        return load_config(self.raw)


@dataclass
class Sweep:
    name: str
    path: Path
    runs: list[RunSpec]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = read_toml(path, "sweep:")
    unknown = sorted(set(raw) - {"sweep", "methods", "partitions", "grid", "report"})
    if unknown:
        raise ConfigError(f"sweep: unknown section(s) {unknown}; allowed: sweep, methods, partitions, grid, report")
    head = raw.get("sweep", {})
    bad = sorted(set(head) - {"name", "base", "seeds", "set"})
    if bad:
        raise ConfigError(f"sweep: unknown key(s) {bad} in [sweep]; allowed: base, name, seeds, set")
    if "base" not in head:
        raise ConfigError("sweep.base: required (the run config every run starts from)")
    base = read_run_toml((path.parent / head["base"]).resolve(), "sweep.base:")
    methods, partitions = raw.get("methods", {}), raw.get("partitions", {"default": {}})
    grids = raw.get("grid") or [{"methods": list(methods), "partitions": list(partitions)}]
    seeds = head.get("seeds", [0])
    runs: dict[str, RunSpec] = {}
    for i, g in enumerate(grids):
        where = f"grid[{i}]"
        bad = sorted(set(g) - {"methods", "partitions", "seeds"})
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; allowed: methods, partitions, seeds")
        for m in g.get("methods", list(methods)):
            if m not in methods:
                raise ConfigError(f"{where}.methods: {m!r} is not a [methods.X] table; have {sorted(methods)}")
            for p in g.get("partitions", list(partitions)):
                if p not in partitions:
                    raise ConfigError(f"{where}.partitions: {p!r} is not a [partitions.X] table; have "
                                      f"{sorted(partitions)}")
                for s in g.get("seeds", seeds):
                    if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                        raise ConfigError(f"{where}.seeds: {s!r} is not an integer >= 0")
                    spec = _run_spec(base, head.get("set", {}), m, methods[m], p, partitions[p], s)
                    runs.setdefault(spec.name, spec)
    return Sweep(head.get("name", path.stem), path, list(runs.values()))  # [report] is read by edgelora.experiments.report


def _run_spec(base: dict, common: dict, method: str, method_set: dict, partition: str, partition_set: dict,
              seed: int) -> RunSpec:
    raw = json.loads(json.dumps(base))  # a deep copy of plain TOML data
    method_set = dict(method_set)
    mode = method_set.pop("mode", "federated")
    if mode not in MODES:
        raise ConfigError(f"methods.{method}.mode: {mode!r} is not one of {list(MODES)}")
    groups = (("sweep.set", common), (f"methods.{method}", method_set), (f"partitions.{partition}", partition_set))
    # "method.*" keys replace the base's [method] table (method configs differ), once: a method block's
    # "method.name" must not wipe the "method.lora" that [sweep.set] gives every run
    if any(k.startswith("method.") for _, overrides in groups for k in overrides):
        raw["method"] = {}
    for where, overrides in groups:
        for key, value in overrides.items():
            _set(raw, key, value, where)
    for key in SEED_KEYS:
        _set(raw, key, seed, "seeds")
    name = f"{method}-{partition}-s{seed}".replace("/", "_")
    spec = RunSpec(name, method, partition, seed, mode, raw)
    try:
        spec.config()  # validate every run before the first one starts
    except ConfigError as e:
        raise ConfigError(f"run {name}: {e}") from None
    return spec


def _set(raw: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"{where}: {dotted!r} is not a dotted run-config key like \"train.lr\"")
    table = raw
    for p in parts[:-1]:
        table = table.setdefault(p, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {dotted!r}: {p} is not a table")
    table[parts[-1]] = value


# -- running -------------------------------------------------------------------------------------------------
def run_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.name


def rounds_done(folder: Path) -> int:
    rows = read_records(folder / "metrics.jsonl")
    return max((r["round"] for r in rows), default=0)


def is_finished(folder: Path, run: RunConfig) -> bool:
    return rounds_done(folder) >= run.server.rounds


def check_same_config(folder: Path, run: RunConfig, name: str) -> None:
    """Refuse a run folder that holds another config than `run`, except for the round count: more rounds
    extend a run, and its config.toml then says the new count."""
    saved = folder / "config.toml"
    if not saved.exists():
        return
    old, new = load_config(saved), with_num_labels(run)
    rounds = old.server.rounds
    if old.replace(server=dataclasses.replace(old.server, rounds=new.server.rounds)).to_toml() != new.to_toml():
        raise ConfigError(f"run {name}: {saved} holds another config than the sweep asks for now; move that "
                          f"folder away (or give the changed variant a new name) and run the sweep again")
    if new.server.rounds > rounds:
        saved.write_text(new.to_toml())


class Budget:
    """--max-minutes, as a wall-clock deadline (time.time(): it travels to a sweep's Ray workers)."""

    def __init__(self, max_minutes: float | None = None, deadline: float | None = None) -> None:
        self.deadline = time.time() + max_minutes * 60 if max_minutes else deadline

    def spent(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def run_sweep(sweep: Sweep, out: Path, max_minutes: float | None = None, progress: bool = True,
              only: list[str] | None = None, device: str = "cpu", tensorboard: bool = False,
              backend: str = "sequential", ray_address: str = "", run_cpus: float = 1.0,
              max_rounds: int | None = None) -> dict[str, str]:
    """Run (or continue) every run of the sweep; returns {run name: finished | stopped | skipped}.
    backend = "ray": the runs that are left run as Ray tasks of run_cpus CPUs each, across the cluster.
    max_rounds: run each to at most this many rounds (a cheap screen); a later sweep without it extends the
    same runs exactly to their full length."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.toml").write_text(sweep.path.read_text())
    (out / "plan.json").write_text(json.dumps(
        [{"run": s.name, "method": s.method, "partition": s.partition, "seed": s.seed, "mode": s.mode}
         for s in sweep.runs], indent=1) + "\n")
    specs = [s for s in sweep.runs if not only or s.name in only]
    configs = {s.name: _capped(s.config(), max_rounds) for s in specs}
    budget = Budget(max_minutes)
    total = sum(c.server.rounds for c in configs.values())
    done = sum(min(rounds_done(run_dir(out, s)), configs[s.name].server.rounds) for s in specs)
    bar = tqdm(total=total, initial=done, desc=f"sweep {sweep.name}", unit="round", disable=not progress,
               dynamic_ncols=True)
    status: dict[str, str] = {}
    try:
        left = []
        for i, spec in enumerate(specs, 1):
            run, folder = configs[spec.name], run_dir(out, spec)
            check_same_config(folder, run, spec.name)
            if is_finished(folder, run):
                status[spec.name] = "skipped"
                continue
            if budget.spent():
                status[spec.name] = "stopped"
                continue
            if backend == "ray":
                left.append(spec)
                continue
            bar.write(f"[{i}/{len(specs)}] {spec.name} ({spec.mode}, {run.server.rounds} rounds) -> {folder}")
            status[spec.name] = _run_one(spec, run, folder, budget, bar, device, tensorboard)
        if left:
            status.update(_run_on_ray(sweep, left, out, budget, bar, device, ray_address, run_cpus, max_rounds))
    finally:
        bar.close()
    return status


def _capped(run: RunConfig, max_rounds: int | None) -> RunConfig:
    if max_rounds is None or run.server.rounds <= max_rounds:
        return run
    return run.replace(server=dataclasses.replace(run.server, rounds=max_rounds))


def _run_one(spec: RunSpec, run: RunConfig, folder: Path, budget: Budget, bar, device: str,
             tensorboard: bool) -> str:
    if spec.mode == "centralized":
        before = rounds_done(folder)
        train_centralized(run, folder, device=device, echo=bar.write, tensorboard=tensorboard,
                          resume=has_state(folder), stop=budget.spent)
        bar.update(rounds_done(folder) - before)
        return "finished" if is_finished(folder, run) else "stopped"

    sim = Simulator(run, folder, resume=has_state(folder), progress=False, torch_device=device)
    sim.folder.echo = bar.write
    if tensorboard:
        sim.folder.log_to_tensorboard()
    sim.run_rounds(stop=budget.spent, on_round=lambda: bar.update(1))
    return "finished" if sim.state.finished else "stopped"


class _Quiet:
    """A progress bar's write/update for a run inside a Ray worker: its round table goes to the worker's log."""

    def write(self, line: str) -> None:
        logging.getLogger("edgelora.experiments.sweep").info("%s", line)

    def update(self, n: int = 1) -> None:
        pass


def _run_remote(sweep_path: str, name: str, out: str, deadline: float | None, device: str, threads: int,
                max_rounds: int | None = None) -> str:
    """One run of a sweep, in a Ray worker: the sweep file and the out folder must be at the same paths there
    (one machine, or a shared filesystem)."""
    import torch

    torch.set_num_threads(threads)
    sweep = load_sweep(sweep_path)
    spec = next(s for s in sweep.runs if s.name == name)
    return _run_one(spec, _capped(spec.config(), max_rounds), run_dir(Path(out), spec), Budget(deadline=deadline),
                    _Quiet(), device, False)


def _run_on_ray(sweep: Sweep, specs: list[RunSpec], out: Path, budget: Budget, bar, device: str, ray_address: str,
                run_cpus: float, max_rounds: int | None = None) -> dict[str, str]:
    """Every run left as a Ray task (resources: run_cpus CPUs; its torch threads, rounded down, at least 1);
    the bar moves as runs finish. Each run is still an ordinary run folder, resumable as before."""
    from edgelora.simulation.ray_devices import start_ray

    ray, owns = start_ray(ray_address)
    try:
        task = ray.remote(num_cpus=run_cpus, num_gpus=1 if device == "cuda" else 0)(_run_remote)
        threads = max(1, int(run_cpus))
        refs = {task.remote(str(sweep.path.resolve()), s.name, str(out.resolve()), budget.deadline, device, threads,
                            max_rounds): s for s in specs}
        bar.write(f"ray: {len(refs)} runs as tasks of {run_cpus:g} CPUs "
                  f"({ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster)")
        status = {}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            spec = refs.pop(ready[0])
            status[spec.name] = ray.get(ready[0])
            bar.update(min(rounds_done(run_dir(out, spec)), _capped(spec.config(), max_rounds).server.rounds)
                       if status[spec.name] == "finished" else 0)
            bar.write(f"{spec.name}: {status[spec.name]} ({rounds_done(run_dir(out, spec))} rounds)")
        return status
    finally:
        if owns:
            ray.shutdown()


def main_sweep(config: str, out: str | None, max_minutes: float | None, progress: bool = True,
               device: str = "cpu", tensorboard: bool = False, backend: str = "sequential",
               ray_address: str = "", run_cpus: float = 1.0, max_rounds: int | None = None,
               only: list[str] | None = None) -> int:
    sweep = load_sweep(config)
    unknown = sorted(set(only or ()) - {s.name for s in sweep.runs})
    if unknown:
        raise ConfigError(f"--only: {unknown} are not runs of sweep {sweep.name} "
                          f"(its runs: {', '.join(s.name for s in sweep.runs)})")
    out_dir = Path(out) if out else Path("runs") / "sweeps" / sweep.name
    print(f"edgelora sweep {sweep.name}: {len(sweep.runs)} runs -> {out_dir}"
          + (f" (stops after {max_minutes:g} min)" if max_minutes else "")
          + (f" (each to at most {max_rounds} rounds)" if max_rounds else ""), flush=True)
    # SIGTERM ends a sweep like Ctrl-C: the round under way is lost, every completed round is on disk.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        status = run_sweep(sweep, out_dir, max_minutes, progress, device=device, tensorboard=tensorboard,
                           backend=backend, ray_address=ray_address, run_cpus=run_cpus, only=only,
                           max_rounds=max_rounds)
    except KeyboardInterrupt:
        print(f"interrupted; finished rounds are saved in {out_dir} (run the same command to continue)",
              flush=True)
        return 130
    counts = {k: sum(1 for v in status.values() if v == k) for k in ("finished", "skipped", "stopped")}
    print(f"sweep {sweep.name}: {counts['finished']} finished now, {counts['skipped']} already done, "
          f"{counts['stopped']} left for later; report: edgelora sweep --report {out_dir}", flush=True)
    return 0
