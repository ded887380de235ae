"""Prometheus metrics of a coordinator (`edgelora server --metrics-port P`, the prometheus_client library),
and its status as JSON (`/status`: the round table and every device's state, for `edgelora status HOST:PORT`).

Counters and histograms are fed when a round closes and when a request is refused; the device gauges are read
from the registry at scrape time, so they are never stale. Each coordinator has its own CollectorRegistry.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .engine import DeviceState
from .sampling import device_sort_key

PHASES = ("download", "train", "encode", "upload")
# /status's word for a device in the open round (DeviceState), where it is not the state's own name
_STATUS_NAMES = {DeviceState.TASKED: "training", DeviceState.ACCEPTED: "uploaded"}


class _Devices:
    """registered / live / sampled, read at scrape time."""

    def __init__(self, coord) -> None:
        self.coord = coord

    def collect(self):
        c = self.coord
        g = GaugeMetricFamily("edgelora_devices", "devices by state: registered, live (heartbeating), "
                                                  "sampled (in the open round), waiting (long-polling for a task)",
                              labels=["state"])
        r = c.round
        g.add_metric(["registered"], len(c.registry))
        g.add_metric(["live"], c.registry.live_count())
        g.add_metric(["sampled"], len(r.sampled) if r is not None and r.open else 0)
        g.add_metric(["waiting"], c.polls_held)
        yield g


class CoordinatorMetrics:
    def __init__(self, coord) -> None:
        self.registry = reg = CollectorRegistry()
        self.rounds = Counter("edgelora_rounds_completed", "rounds completed by this coordinator process",
                              registry=reg)
        self.round = Gauge("edgelora_round", "rounds completed in the run (the open round is this + 1)", registry=reg)
        self.stage = Gauge("edgelora_stage", "1 for the run's current stage", ["stage"], registry=reg)
        self.bytes = Counter("edgelora_bytes", "wire bytes of finished rounds, by direction", ["direction"],
                             registry=reg)
        self.refusals = Counter("edgelora_refusals", "requests refused, by refusal code", ["code"], registry=reg)
        self.phase = Histogram("edgelora_phase_seconds", "seconds of each device phase in finished rounds",
                               ["phase"], registry=reg,
                               buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900))
        reg.register(_Devices(coord))
        self.set_state(coord.state)

    def set_state(self, state) -> None:
        self.round.set(state.round)
        self.stage.clear()
        self.stage.labels(stage=state.stage.name.lower()).set(1)

    def round_closed(self, rec, state) -> None:
        self.rounds.inc()
        self.set_state(state)
        self.bytes.labels(direction="down").inc(rec.bytes_down)
        self.bytes.labels(direction="up").inc(rec.bytes_up)
        for d in rec.devices.values():
            if d.status == "completed":
                for p in PHASES:
                    self.phase.labels(phase=p).observe(getattr(d, f"{p}_s"))

    def refused(self, code: str) -> None:
        self.refusals.labels(code=code).inc()


def status(coord) -> dict:
    """The finished rounds' rows and every registered device's state, read now (under the coordinator's
    lock, so a round that opens or closes meanwhile is seen whole or not at all)."""
    with coord.cond:
        now = coord.registry.clock()
        r, state = coord.round, coord.state
        devices = []
        for d in sorted(coord.registry.entries(), key=lambda e: device_sort_key(e.device_id)):
            mode = "live" if now - d.last_seen <= coord.registry.timeout_s else "offline"
            state_in_round = r.state_of(d.device_id) if r is not None and r.open else None
            if state_in_round is not None:
                mode = _STATUS_NAMES.get(state_in_round, state_in_round.value)
            devices.append({"device_id": d.device_id, "state": mode, "last_seen_s": round(now - d.last_seen, 1),
                            "tier": d.tier})
        open_round = r.number if r is not None and r.open else None
    return {"round": state.round, "stage": state.stage.name.lower(), "finished": state.finished,
            "open_round": open_round, "rows": coord.folder.records(), "devices": devices}


def serve_metrics(metrics: CoordinatorMetrics, coord, host: str, port: int) -> ThreadingHTTPServer:
    """/metrics (Prometheus text) and /status (JSON) in a daemon thread; returns the HTTP server
    (`.server_port`, `.shutdown()`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/metrics"):
                body, kind = generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif self.path.startswith("/status"):
                body, kind = json.dumps(status(coord)).encode(), "application/json"
            else:
                self.send_error(404, "try /metrics or /status")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # no per-scrape lines in the server log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
