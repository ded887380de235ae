"""`edgelora server | client | status | demo`: the coordinator and the devices on real machines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..configtools import ConfigError
from ..launch import Client, LaunchError, Launcher, gone_after
from .common import _replace, _tensorboard_flag, _torch_device, _verbose_flag, default_run_dir, parse_device_ids


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
    if args.memory_mb is not None and not args.memory_mb > 0:
        raise ConfigError(f"--memory-mb: must be > 0 MB, got {args.memory_mb}")
    client = EdgeClient(ClientOptions(server=args.server, device_ids=ids, torch_device=device,
                                      give_up_s=args.give_up_s, progress=not args.quiet, tier=args.tier,
                                      data=args.data, text_column=args.text_column, label_column=args.label_column,
                                      eval_fraction=args.eval_fraction, memory_mb=args.memory_mb,
                                      throttle=LinkThrottle(args.uplink_mbps, args.downlink_mbps)
                                      if args.uplink_mbps or args.downlink_mbps else None,
                                      **_client_security(args, ids)))
    try:
        return client.run()
    finally:
        client.close()

def _print_rounds(rows: list[dict]) -> None:
    from edgelora.runlog import round_table_header, round_table_row

    task = "causal-lm" if any(r.get("perplexity") is not None for r in rows) else "classification"
    exact = any(r.get("exact_match") is not None for r in rows)
    print("\n".join(round_table_header(task, exact) + [round_table_row(r, task, exact) for r in rows]))

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

DEMO_CONFIG = {
    "server": {"rounds": 3, "devices_per_round": 4, "min_devices": 2, "round_deadline_s": 240.0},
    "data": {"dataset": "20newsgroups", "num_devices": 4, "partition": "dirichlet", "alpha": 0.5,
             "max_examples_per_device": 200, "test_max_examples": 400},
    "model": {"name": "minilm", "max_seq_len": 64},
    "train": {"batch_size": 16, "lr": 2e-3, "optimizer": "adamw"},
    "method": {"name": "lora", "lora": {"rank": 8, "alpha": 16.0}},
}

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
    from edgelora.schema import shared_dataset

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
    print(f"edgelora demo: 1 server + {run.data.num_devices} clients, {run.server.rounds} rounds of "
          f"{run.method.name} on {run.data.dataset} ({run.model.name}); run folder {run_dir}", flush=True)
    client_args = ["--quiet", "--verbose", "--give-up-s", "60", "--insecure"]
    try:  # the server's output is the demo's: the round table in this terminal
        with Launcher(run_dir, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}) as fleet:
            fleet.start_server(cfg_path, args=["--insecure"], timeout_s=300)
            fleet.start_clients(Client(device_id=str(i), args=client_args, log=logs / f"client_{i}.log")
                                for i in range(run.data.num_devices))
            rc = fleet.wait_server(clients_gone_s=gone_after(raw))  # every device gone: nothing to wait for
            codes = fleet.wait_clients(timeout_s=30)  # a client still running then is stopped, not counted
    except LaunchError as e:
        print(f"edgelora demo: {e}", file=sys.stderr)
        return 1
    bad = [i for i, c in enumerate(codes) if c not in (0, None)]
    if bad:
        print(f"clients {bad} exited with errors; see {logs}", file=sys.stderr)
    plot = run_dir / ("perplexity.png" if lm else "accuracy.png")
    print(f"demo finished: metrics {run_dir / 'metrics.jsonl'}, plot {plot}, adapter {run_dir / 'adapter'}"
          + (f", samples {run_dir / 'samples.md'}" if lm else ""), flush=True)
    return rc or (1 if bad else 0)


def add_commands(sub) -> None:
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
    c.add_argument("--memory-mb", type=float, help="the most memory this process may use, MB: the coordinator fits "
                                                   "each task to it (micro-batches, chunked loss, checkpointing, a "
                                                   "smaller frozen base) or refuses the device at Register; default: "
                                                   "what the OS says is available")
    c.add_argument("--allocator", choices=("system", "jemalloc"), default="system",
                   help="the process's memory allocator: jemalloc (a system library, apt install libjemalloc2) "
                        "frees a training step's memory back to the OS and fragments less; the client starts "
                        "itself again with it preloaded")
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
