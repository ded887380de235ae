"""`edgelora simulate | sweep | centralized | evaluate | methods`: experiments on one machine (or a Ray cluster)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..configtools import ConfigError
from .common import _tensorboard_flag, _torch_device, _verbose_flag, default_run_dir


def cmd_methods(args) -> int:
    from edgelora.methods import describe_method_fields, describe_methods

    if args.name:
        summary = dict(describe_methods()).get(args.name)
        rows = describe_method_fields(args.name)
        print(f"{args.name}: {summary}\n[method] fields (key = default: help):")
        width = max(len(k) + len(d) for k, d, _ in rows) + 3
        for key, default, text in rows:
            print(f"  {f'{key} = {default}':{width}s} {text}")
        return 0
    for name, summary in describe_methods():
        print(f"{name:10s} {summary}")
    print("\nedgelora methods NAME lists a method's config fields")
    return 0

def cmd_simulate(args) -> int:
    """Many virtual devices in one process (edgelora.simulation.simulator): same engine, codec and protobuf bytes."""
    from edgelora.config import load_config, read_run_toml
    from edgelora.server.checkpoint import has_state
    from edgelora.simulation.simulator import simulate

    run_dir = Path(args.resume or args.out or default_run_dir())
    resume = bool(args.resume) or has_state(run_dir)
    source = run_dir / "config.toml" if resume else args.config
    if source is None:
        raise ConfigError("simulate: give --config RUN.toml (see examples/), or --resume RUN_DIR")
    raw = read_run_toml(source)
    server, data, model, sim = (raw.setdefault(k, {}) for k in ("server", "data", "model", "simulate"))
    for value, table, key in ((args.model, model, "name"), (args.rounds, server, "rounds"),
                              (args.devices, data, "num_devices"), (args.per_round, server, "devices_per_round"),
                              (args.backend, sim, "backend"), (args.ray_address, sim, "ray_address"),
                              (args.workers, sim, "workers")):
        if value is not None:
            table[key] = value
    # The simulator's defaults, 100 devices and 10 a round, give way to a smaller fleet; a K the user set
    # (config or --per-round) above the fleet is refused by load_config, as the server refuses it.
    data.setdefault("num_devices", 100)
    server.setdefault("devices_per_round", min(10, data["num_devices"]))
    server.setdefault("min_devices", 1)
    run = load_config(raw)
    print(f"edgelora simulate: {run.method.name}, {run.server.rounds} rounds, {run.server.devices_per_round} of "
          f"{run.data.num_devices} devices per round, {run.model.name}"
          + (f", on Ray ({run.simulate.ray_address or 'local'})" if run.simulate.backend == "ray" else "")
          + f"; run folder {run_dir}"
          + (" (resumed)" if resume else ""), flush=True)
    try:
        state = simulate(run, run_dir, resume=resume, progress=not args.quiet, tensorboard=args.tensorboard)
    except KeyboardInterrupt:
        print(f"\nedgelora simulate: interrupted; finished rounds are saved in {run_dir} (continue with "
              f"--resume {run_dir})", file=sys.stderr, flush=True)
        return 130
    print(f"finished {state.round} rounds; run folder {run_dir}", flush=True)
    return 0

def cmd_sweep(args) -> int:
    """A grid of simulator runs that stops and resumes (edgelora.experiments.sweep), or its report (edgelora.experiments.report)."""
    if bool(args.config) == bool(args.report):
        raise ConfigError("sweep: give --config SWEEP.toml to run a sweep, or --report DIR to summarise one")
    if args.report:
        from edgelora.experiments.report import write_report

        try:
            written = write_report(Path(args.report))
        except FileNotFoundError as e:
            raise ConfigError(f"sweep --report: {e}") from None
        for p in written:
            print(p)
        return 0
    from edgelora.experiments.sweep import main_sweep

    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ConfigError(f"--max-minutes: must be > 0, got {args.max_minutes}")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds: must be >= 1, got {args.rounds}")
    return main_sweep(args.config, args.out, args.max_minutes, progress=not args.quiet,
                      device=_torch_device(args.device), tensorboard=args.tensorboard, backend=args.backend,
                      ray_address=args.ray_address, run_cpus=args.run_cpus, max_rounds=args.rounds,
                      only=[n for n in args.only.split(",") if n] if args.only else None)

def cmd_centralized(args) -> int:
    """The ceiling for a run config: its structure trained on the union of the devices' data in one place."""
    from edgelora.config import load_config
    from edgelora.experiments.centralized import train_centralized
    from edgelora.experiments.sweep import check_same_config
    from edgelora.server.checkpoint import has_state

    run = load_config(args.config)
    device = _torch_device(args.device)
    run_dir = Path(args.out) if args.out else default_run_dir()
    resume = has_state(run_dir)
    if resume:
        check_same_config(run_dir, run, str(run_dir))
    print(f"edgelora centralized: {run.method.name} on the union of {run.data.num_devices} partitions, the "
          f"examples of {run.server.rounds} rounds x {run.server.devices_per_round} devices; run folder {run_dir}"
          + (" (resumed)" if resume else ""), flush=True)
    recs = train_centralized(run, run_dir, device=device, tensorboard=args.tensorboard, resume=resume)
    last = recs[-1]
    score = (f"perplexity {last['perplexity']:.3f}, token accuracy {last['accuracy']:.4f}"
             if last.get("perplexity") is not None else f"accuracy {last['accuracy']:.4f}")
    print(f"finished; final {score}; run folder {run_dir}", flush=True)
    return 0

def cmd_evaluate(args) -> int:
    """Held-out accuracy of finished runs, e.g. on the whole test split where the runs scored a subsample."""
    from edgelora.experiments.evaluate import evaluate_run

    if args.max_examples is not None and args.max_examples < 0:
        raise ConfigError("evaluate: --max-examples must be >= 0 (0 = the whole split)")
    device = _torch_device(args.device)
    rows = []
    print(f"{'run':<32} {'rounds':>6} {'examples':>8} {'accuracy':>9} {'loss':>8} {'recorded':>9}", flush=True)
    for d in args.run_dirs:
        r = evaluate_run(Path(d), args.max_examples, device)
        rec = "-" if r["recorded_accuracy"] is None else f"{r['recorded_accuracy']:.4f}"
        print(f"{r['run']:<32} {r['rounds']:>6} {r['examples']:>8} {r['accuracy']:>9.4f} {r['loss']:>8.4f} "
              f"{rec:>9}", flush=True)
        rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def add_commands(sub) -> None:
    m = sub.add_parser("methods", help="list the methods, or one method's config fields")
    m.add_argument("name", nargs="?", help="a method: print its [method] fields with defaults and help")
    m.set_defaults(fn=cmd_methods)

    sim = sub.add_parser("simulate", help="run many virtual devices in one process (no sockets, real wire bytes)")
    sim.add_argument("--config", help="run config (TOML), e.g. examples/slora.toml")
    sim.add_argument("--out", help="run folder (default runs/<timestamp>); an existing run there is resumed")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last completed round")
    sim.add_argument("--model", help="override model.name (e.g. tiny-bert)")
    sim.add_argument("--rounds", type=int, help="override server.rounds")
    sim.add_argument("--devices", type=int, help="override data.num_devices (default 100)")
    sim.add_argument("--per-round", type=int, help="override server.devices_per_round (default 10)")
    sim.add_argument("--backend", choices=("sequential", "ray"), help="override simulate.backend: train the devices "
                     "one after another here, or in Ray actors (same results)")
    sim.add_argument("--ray-address", help="override simulate.ray_address: join this Ray cluster (default: a local Ray)")
    sim.add_argument("--workers", type=int, help="override simulate.workers (Ray actors)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    _verbose_flag(sim)
    _tensorboard_flag(sim)
    sim.set_defaults(fn=cmd_simulate)

    sw = sub.add_parser("sweep", help="run a resumable grid of simulator runs, or report on one")
    sw.add_argument("--config", help="sweep file (TOML), e.g. examples/sweeps/smoke.toml")
    sw.add_argument("--out", help="sweep folder (default runs/sweeps/<name>); run again to continue it")
    sw.add_argument("--max-minutes", type=float, help="stop cleanly between rounds after this many minutes")
    sw.add_argument("--rounds", type=int, metavar="N",
                    help="screen: run each run to at most N rounds (run again without it to extend them exactly)")
    sw.add_argument("--only", metavar="RUN,...", help="run only these runs of the sweep (by run name)")
    sw.add_argument("--report", metavar="DIR", help="write DIR/summary.csv, summary.md and plots from finished rounds")
    sw.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the virtual devices train")
    sw.add_argument("--backend", choices=("sequential", "ray"), default="sequential",
                    help="ray: the runs left run as Ray tasks across a cluster (the out folder and the sweep file at "
                         "the same paths on every node: a shared filesystem)")
    sw.add_argument("--ray-address", default="", help="the Ray cluster to join (default: a local Ray)")
    sw.add_argument("--run-cpus", type=float, default=1.0, help="ray: CPUs (and torch threads) per run")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    _verbose_flag(sw)
    _tensorboard_flag(sw)
    sw.set_defaults(fn=cmd_sweep)

    ce = sub.add_parser("centralized", help="train a run config's structure on all devices' data in one place")
    ce.add_argument("--config", required=True, help="run config (TOML)")
    ce.add_argument("--out", help="run folder (default runs/<timestamp>); an unfinished run there is continued")
    ce.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    _verbose_flag(ce)
    _tensorboard_flag(ce)
    ce.set_defaults(fn=cmd_centralized)

    ev = sub.add_parser("evaluate", help="score run folders' models on their held-out split (e.g. all of it)")
    ev.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (simulate, server, sweep or centralized)")
    ev.add_argument("--max-examples", type=int, metavar="N",
                    help="held-out examples to score, seeded subsample (0 = the whole split; default: the run's "
                         "data.test_max_examples, which reproduces its last recorded accuracy)")
    ev.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    ev.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ev.add_argument("--quiet", action="store_true", help="no model-loading bars")
    _verbose_flag(ev)
    ev.set_defaults(fn=cmd_evaluate)
