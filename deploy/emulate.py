"""Network emulation with real processes and real `tc`: a coordinator and N edge devices, each device in its own
Linux network namespace, every device link shaped (uplink/downlink rate by tbf, delay/jitter/loss by netem).

    sudo python -m deploy.emulate --config deploy/examples/slow-uplink.toml [--out RUN_DIR]

Topology (all of it inside namespaces this tool creates; the root namespace is not touched):

    netns el<tag>hub:  br0 10.213.0.1/24  <- the coordinator listens here
                        |-- d0 ==veth== eth0 10.213.0.10  netns el<tag>d0  (device 0)
                        |-- d1 ==veth== eth0 10.213.0.11  netns el<tag>d1  (device 1) ...

tbf shapes egress only, so a device's uplink is shaped on its own eth0 and its downlink on the hub's d<i>.
Every namespace (and with it every veth) is deleted on exit, on Ctrl-C, on SIGTERM, and at interpreter exit.

After the run, RUN_DIR/emulation.json compares the bytes edgelora recorded per device (metrics.jsonl) with
the kernel's counters of the device's eth0 and says what the difference is made of.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

from edgelora.launch import Client, LaunchError, Launcher, gone_after

SUBNET = "10.213.0"          # private, and it exists only inside the namespaces made here
HUB_IP = f"{SUBNET}.1"
PORT = 50051
# Per packet on the wire below gRPC: Ethernet 14 + IPv4 20 + TCP 20 + timestamps option 12 (Linux default).
HEADER_BYTES = 14 + 20 + 32


class EmulationError(RuntimeError):
    pass


@dataclass
class LinkSpec:
    uplink_mbit: float = 0.0     # 0 = not shaped
    downlink_mbit: float = 0.0
    delay_ms: float = 0.0        # one way, added in each direction
    jitter_ms: float = 0.0
    loss_pct: float = 0.0        # each direction

    def validate(self, where: str) -> "LinkSpec":
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v < 0:
                raise EmulationError(f"{where}.{f.name}: must be a number >= 0, got {v!r}")
        if self.loss_pct > 100:
            raise EmulationError(f"{where}.loss_pct: must be <= 100, got {self.loss_pct}")
        return self


@dataclass
class EmulationConfig:
    devices: int
    run: dict                                            # an edgelora run config (server/model/data/... sections)
    links: dict[str, LinkSpec] = field(default_factory=dict)  # device id -> its link
    tls: bool = False                                    # TLS + per-device tokens (deploy/make_certs.py)
    timeout_s: float = 1800.0

    @staticmethod
    def from_toml(raw: dict, base_dir: Path = Path(".")) -> "EmulationConfig":
        known = {"emulation", "run", "link", "tiers", "device"}
        unknown = set(raw) - known
        if unknown:
            raise EmulationError(f"unknown sections {sorted(unknown)}; allowed: {sorted(known)}")
        em = dict(raw.get("emulation", {}))
        n = em.pop("devices", None)
        if not isinstance(n, int) or n < 1:
            raise EmulationError(f"emulation.devices: must be an integer >= 1, got {n!r}")
        tls, timeout_s = bool(em.pop("tls", False)), float(em.pop("timeout_s", 1800.0))
        run = raw.get("run", {})
        if "config" in em:  # a run config file instead of an inline [run] table
            run = tomllib.loads((base_dir / em.pop("config")).read_text())
        if em:
            raise EmulationError(f"emulation: unknown keys {sorted(em)}; allowed: devices, tls, timeout_s, config")

        def link(d: dict, where: str) -> LinkSpec:
            bad = set(d) - {f.name for f in fields(LinkSpec)} - {"tier"}
            if bad:
                raise EmulationError(f"{where}: unknown keys {sorted(bad)}; allowed: "
                                     f"{[f.name for f in fields(LinkSpec)]}")
            return LinkSpec(**{k: v for k, v in d.items() if k != "tier"}).validate(where)

        default = raw.get("link", {})
        tiers = raw.get("tiers", {})
        links = {}
        for i in range(n):
            own = raw.get("device", {}).get(str(i), {})
            tier = own.get("tier")
            if tier is not None and tier not in tiers:
                raise EmulationError(f"device.{i}.tier: {tier!r} is not one of the tiers {sorted(tiers)}")
            # precedence: [link] < [tiers.<name>] < [device.<id>]
            links[str(i)] = link({**default, **(tiers.get(tier, {}) if tier else {}), **own}, f"device.{i}")
        return EmulationConfig(devices=n, run=run, links=links, tls=tls, timeout_s=timeout_s)

    @staticmethod
    def load(path: str | Path) -> "EmulationConfig":
        path = Path(path)
        return EmulationConfig.from_toml(tomllib.loads(path.read_text()), path.parent)


def check_host() -> None:
    """Say plainly what is missing for real shaping."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise EmulationError(f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2). "
                             f"Without it, throttle in the application: edgelora client --uplink-mbps X")
    if os.geteuid() != 0:
        raise EmulationError("network namespaces and tc need root (run with sudo). Without root, throttle in the "
                             "application: edgelora client --uplink-mbps X --downlink-mbps Y")


def _sh(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise EmulationError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
    return r.stdout


def has_netem(ns: str) -> bool:
    """Some kernels (minimal VM kernels) ship tbf but not sch_netem; probe on the namespace's loopback."""
    r = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                       capture_output=True, timeout=30)
    subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"], capture_output=True, timeout=30)
    return r.returncode == 0


def shape(ns: str, dev: str, rate_mbit: float, link: LinkSpec, netem: bool = True) -> list[str]:
    """tc commands for one direction: tbf (rate) at the root, netem (delay/loss) as its child."""
    cmds, parent = [], "root"
    if rate_mbit > 0:
        rate_bytes = rate_mbit * 1e6 / 8
        burst = max(3200, int(rate_bytes / 100))      # 10 ms of link time, at least two full frames
        # A generous queue: TCP backs off on its own (TSQ), and drops here would show up as retransmits.
        limit = max(4 * burst, int(rate_bytes * 0.5))
        cmds.append(f"tc -n {ns} qdisc add dev {dev} root handle 1: tbf rate {rate_mbit * 1000:.0f}kbit "
                    f"burst {burst} limit {limit}")
        parent = "parent 1:1 handle 10:"
    if netem and (link.delay_ms or link.loss_pct):
        jitter = f" {link.jitter_ms:g}ms distribution normal" if link.jitter_ms else ""
        cmds.append(f"tc -n {ns} qdisc add dev {dev} {parent} netem delay {link.delay_ms:g}ms{jitter}"
                    f" loss {link.loss_pct:g}% limit 100000")
    return cmds


def link_counters(ns: str, dev: str) -> dict:
    stats = json.loads(_sh("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev))[0]["stats64"]
    return {"tx_bytes": stats["tx"]["bytes"], "tx_packets": stats["tx"]["packets"],
            "rx_bytes": stats["rx"]["bytes"], "rx_packets": stats["rx"]["packets"]}


def tcp_retransmits(ns: str) -> int:
    lines = [l.split() for l in _sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").splitlines()
             if l.startswith("Tcp:")]
    return int(dict(zip(lines[0], lines[1]))["RetransSegs"])


class Network:
    """The namespaces and links of one emulation; `close()` removes all of them and may be called any time."""

    def __init__(self, devices: int, tag: str | None = None) -> None:
        self.tag = tag or f"{os.getpid() % 100000}"
        self.hub = f"el{self.tag}hub"
        self.device_ns = [f"el{self.tag}d{i}" for i in range(devices)]
        self.made: list[str] = []
        self.netem = True

    def device_ip(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def up(self, links: dict[str, LinkSpec]) -> None:
        existing = set(_sh("ip", "netns", "list").split())
        clash = [n for n in [self.hub, *self.device_ns] if n in existing]
        if clash:
            raise EmulationError(f"namespaces {clash} already exist (another emulation?); pick another tag")
        self._ns(self.hub)
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        self.netem = has_netem(self.hub)
        if not self.netem and any(l.delay_ms or l.loss_pct for l in links.values()):
            print("emulate: WARNING: this kernel has no sch_netem qdisc: delay, jitter and loss are NOT applied "
                  "(rates are, by tbf)", file=sys.stderr, flush=True)
        for i, ns in enumerate(self.device_ns):
            self._ns(ns)
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"d{i}", "netns", self.hub)
            _sh("ip", "-n", ns, "addr", "add", f"{self.device_ip(i)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", self.hub, "link", "set", f"d{i}", "master", "br0", "up")
            link = links[str(i)]
            for cmd in shape(ns, "eth0", link.uplink_mbit, link, self.netem) + \
                    shape(self.hub, f"d{i}", link.downlink_mbit, link, self.netem):
                _sh(*cmd.split())

    def _ns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self.made.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        while self.made:  # deleting a namespace deletes the veth ends inside it, and so both ends
            ns = self.made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


class Emulation:
    def __init__(self, cfg: EmulationConfig, run_dir: Path, tag: str | None = None, python: str = sys.executable):
        self.cfg, self.run_dir, self.python = cfg, Path(run_dir), python
        self.net = Network(cfg.devices, tag)
        self.fleet: Launcher | None = None

    def run(self) -> dict:
        check_host()
        atexit.register(self.close)
        old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        finally:
            self.close()
            for s, h in old.items():
                signal.signal(s, h)
            atexit.unregister(self.close)

    def close(self) -> None:
        if self.fleet is not None:  # the processes first: a namespace goes when nothing runs in it
            self.fleet.stop()
        self.net.close()

    def _security(self) -> tuple[list[str], list[list[str]]]:
        if not self.cfg.tls:
            return ["--insecure"], [["--insecure"] for _ in range(self.cfg.devices)]
        from deploy.make_certs import make_certs

        pki = make_certs(self.run_dir / "pki", self.cfg.devices, sans=(HUB_IP,))
        server = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                  "--tls-client-ca", str(pki / "ca.pem"), "--tokens", str(pki / "tokens.toml")]
        clients = [["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / f"device-{i}.pem"),
                    "--tls-key", str(pki / f"device-{i}.key"), "--tokens", str(pki / "tokens.toml")]
                   for i in range(self.cfg.devices)]
        return server, clients

    def _run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        cfg_path = self.run_dir / "emulated-run.toml"
        cfg_path.write_text(tomli_w.dumps(self.cfg.run))
        self.net.up(self.cfg.links)
        before = {i: link_counters(ns, "eth0") for i, ns in enumerate(self.net.device_ns)}
        retrans0 = {i: tcp_retransmits(ns) for i, ns in enumerate(self.net.device_ns)}
        server_sec, client_sec = self._security()
        self.fleet = Launcher(self.run_dir, verbose=True, python=self.python,
                              env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        with self.fleet:
            try:
                addr = self.fleet.start_server(cfg_path, port=PORT, args=["--host", HUB_IP, *server_sec],
                                               log=logs / "server.log", prefix=self.net.exec(self.net.hub))
                self.fleet.start_clients(Client(device_id=str(i), args=["--quiet", "--give-up-s", "120",
                                                                          *client_sec[i]],
                                                log=logs / f"client_{i}.log", prefix=self.net.exec(ns))
                                         for i, ns in enumerate(self.net.device_ns))
                print(f"emulation: coordinator {addr} in netns {self.net.hub}; {self.cfg.devices} devices in "
                      f"{', '.join(self.net.device_ns)}; run folder {self.run_dir}", flush=True)
                rc = self.fleet.wait_server(self.cfg.timeout_s, clients_gone_s=gone_after(self.cfg.run))
            except LaunchError as e:
                raise EmulationError(f"coordinator: {e}") from None
            client_codes = self.fleet.wait_clients(timeout_s=60)
        after = {i: link_counters(ns, "eth0") for i, ns in enumerate(self.net.device_ns)}
        retrans = {i: tcp_retransmits(ns) - retrans0[i] for i, ns in enumerate(self.net.device_ns)}
        if rc != 0:
            raise EmulationError(f"coordinator exited with {rc}; see {logs / 'server.log'}")
        report = bytes_report(self.run_dir / "metrics.jsonl", before, after, retrans, self.cfg)
        report["client_exit_codes"] = client_codes
        report["netem_applied"] = self.net.netem
        report["qdiscs"] = {ns: _sh("tc", "-n", ns, "qdisc", "show").strip().splitlines()
                            for ns in [self.net.hub, *self.net.device_ns]}
        (self.run_dir / "emulation.json").write_text(json.dumps(report, indent=1))
        return report


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")




def bytes_report(metrics: Path, before: dict, after: dict, retrans: dict, cfg: EmulationConfig) -> dict:
    """edgelora's per-device bytes (gRPC messages of task downloads and update uploads) against the kernel's
    interface counters. What the kernel sees on top: per-packet Ethernet/IP/TCP headers (every data segment
    and every pure ACK), HTTP/2 frame headers and HPACK headers, gRPC's 5-byte message prefixes, the other
    RPCs (GetRunSpec, Register, Heartbeat, long-poll FetchTask replies that carry no task), TLS records when
    on, and retransmitted segments (counted again by the kernel, RetransSegs)."""
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    out = {"links": {d: asdict(l) for d, l in cfg.links.items()}, "devices": {}}
    for i in before:
        dev = str(i)
        k = {key: after[i][key] - before[i][key] for key in after[i]}
        app_up = sum(d["bytes_up"] for r in recs for d in r["devices"] if d["device_id"] == dev)
        app_down = sum(d["bytes_down"] for r in recs for d in r["devices"] if d["device_id"] == dev)
        row = {"edgelora_bytes_up": app_up, "kernel_tx_bytes": k["tx_bytes"], "kernel_tx_packets": k["tx_packets"],
               "edgelora_bytes_down": app_down, "kernel_rx_bytes": k["rx_bytes"],
               "kernel_rx_packets": k["rx_packets"], "tcp_retransmitted_segments": retrans[i]}
        for way, app, kb, kp in (("up", app_up, k["tx_bytes"], k["tx_packets"]),
                                 ("down", app_down, k["rx_bytes"], k["rx_packets"])):
            headers = kp * HEADER_BYTES
            row[f"{way}_diff_pct"] = round(100.0 * (kb - app) / app, 2) if app else None
            row[f"{way}_tcpip_headers_bytes"] = headers
            # left after the headers: HTTP/2 + gRPC framing, the other RPCs, TLS, retransmitted payload
            row[f"{way}_http2_grpc_other_bytes"] = kb - headers - app
        out["devices"][dev] = row
    return out


def print_report(report: dict) -> None:
    print(f"{'device':>6} {'dir':>4} {'edgelora B':>11} {'kernel B':>10} {'diff':>7} {'TCP/IP+eth B':>12} "
          f"{'HTTP/2+other B':>14} {'retrans':>7}")
    for dev, r in report["devices"].items():
        for way, app, kern in (("up", "edgelora_bytes_up", "kernel_tx_bytes"),
                               ("down", "edgelora_bytes_down", "kernel_rx_bytes")):
            diff = r[f"{way}_diff_pct"]
            print(f"{dev:>6} {way:>4} {r[app]:>11} {r[kern]:>10} {'-' if diff is None else f'{diff:+.1f}%':>7} "
                  f"{r[f'{way}_tcpip_headers_bytes']:>12} {r[f'{way}_http2_grpc_other_bytes']:>14} "
                  f"{r['tcp_retransmitted_segments'] if way == 'up' else '':>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.emulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="emulation config (TOML), e.g. deploy/examples/slow-uplink.toml")
    ap.add_argument("--out", help="run folder (default runs/emulate-<timestamp>)")
    ap.add_argument("--tag", help="namespace name tag (default: this process id)")
    a = ap.parse_args(argv)
    try:
        cfg = EmulationConfig.load(a.config)
        out = Path(a.out or f"runs/emulate-{time.strftime('%Y%m%d-%H%M%S')}")
        report = Emulation(cfg, out, a.tag).run()
    except EmulationError as e:
        print(f"emulate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emulate: interrupted; namespaces removed", file=sys.stderr)
        return 130
    print_report(report)
    print(f"report {out / 'emulation.json'}, metrics {out / 'metrics.jsonl'}, plot {out / 'round_time.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
