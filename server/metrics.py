"""Prometheus metrics of a coordinator (`edgelora server --metrics-port P`, the prometheus_client library).

Counters and histograms are fed when a round closes and when a request is refused; the device gauges are read
from the registry at scrape time, so they are never stale. Each coordinator has its own CollectorRegistry.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

PHASES = ("download", "train", "encode", "upload")


class _Devices:
    """registered / live / sampled, read at scrape time."""

    def __init__(self, coord) -> None:
        self.coord = coord

    def collect(self):
        c = self.coord
        g = GaugeMetricFamily("edgelora_devices", "devices by state: registered, live (heartbeating), "
                                                  "sampled (in the open round)", labels=["state"])
        r = c.round
        g.add_metric(["registered"], len(c.registry))
        g.add_metric(["live"], len(c.registry.live()))
        g.add_metric(["sampled"], len(r.sampled) if r is not None and r.open else 0)
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


def serve_metrics(metrics: CoordinatorMetrics, host: str, port: int):
    """Start the /metrics HTTP endpoint in a daemon thread; returns the HTTP server (`.server_port`,
    `.shutdown()`)."""
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    return server
