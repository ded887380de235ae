"""The application-level throttle: token-bucket arithmetic by hand, then a real upload over gRPC that takes as
long as the link says."""
from __future__ import annotations

import json
import threading
import time

import pytest

from edgelora.config import load_config
from edgelora.edge_client.throttle import LinkThrottle, TokenBucket

from .conftest import drive_rounds, tiny_raw


def serve_one_client(run, run_dir, throttle: LinkThrottle, connect=lambda port: f"127.0.0.1:{port}"):
    """A real server in this process driving every round, and one EdgeClient (device 0) behind `throttle`,
    reaching the server at `connect(port)`; returns the client once the run is over."""
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.server.app import run_server

    with run_server(run, run_dir) as (coord, port):
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        client = EdgeClient(ClientOptions(connect(port), ["0"], progress=False, poll_s=2.0, throttle=throttle))
        try:
            assert client.run() == 0
        finally:
            client.close()
        driver.join(timeout=30)
    return client


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_token_bucket_waits_bytes_over_rate():
    clock = FakeClock()
    b = TokenBucket(1000.0, burst_bytes=100, clock=clock, sleep=clock.sleep)
    assert b.take(100) == 0.0                 # the burst is free
    assert b.take(500) == pytest.approx(0.5)  # 500 B at 1000 B/s
    clock.t += 2.0                            # idle: refills, but only up to the burst
    assert b.take(100) == 0.0
    assert b.take(250) == pytest.approx(0.25)
    assert clock.t == pytest.approx(2.75)     # 950 B in total, 100 + 100 of them from two full bursts


def test_paced_upload_keeps_order_and_rate():
    class Msg:
        def __init__(self, n):
            self.n = n

        def ByteSize(self):
            return self.n

    clock = FakeClock()
    t = LinkThrottle(uplink_mbps=0.008)  # 1000 B/s
    t.up = TokenBucket(1000.0, burst_bytes=0, clock=clock, sleep=clock.sleep)
    out = [m.n for m in t.paced_upload(Msg(n) for n in (200, 300, 500))]
    assert out == [200, 300, 500] and clock.t == pytest.approx(1.0)
    assert t.upload_chunk_bytes(1 << 20) == 16 * 1024 and LinkThrottle().upload_chunk_bytes(1 << 20) == 1 << 20
    with pytest.raises(ValueError, match="uplink-mbps"):
        LinkThrottle(uplink_mbps=0)


@pytest.mark.slow
def test_throttled_device_uploads_at_the_link_rate(tiny_config, tmp_path):
    up_mbps, down_mbps = 0.4, 2.0
    run = tiny_config(server={"rounds": 1, "devices_per_round": 1, "min_registered": 1},
                      method={"name": "lora", "lora": {"rank": 32, "alpha": 32.0}})  # ~100 kB each way
    serve_one_client(run, tmp_path / "run", LinkThrottle(up_mbps, down_mbps))
    dev = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["devices"][0]
    assert dev["status"] == "completed" and dev["bytes_up"] > 80_000
    # the bucket starts with one 16 KiB chunk of credit; the rest goes at the rate (server-side clock)
    assert dev["upload_s"] == pytest.approx((dev["bytes_up"] - 16384) * 8 / (up_mbps * 1e6), rel=0.15)
    assert dev["download_s"] == pytest.approx((dev["bytes_down"] - 16384) * 8 / (down_mbps * 1e6), rel=0.25)


def test_a_device_past_its_tasks_deadline_lets_the_round_go_instead_of_uploading(tiny_config, tmp_path):
    """Task.deadline_s is honoured on the device: a download slowed past the round's deadline (~52 kB at
    0.08 Mbit/s, ~3.6 s after the first 16 KiB of credit, against a 2.5 s deadline) means no upload at all,
    not a late one the server refuses. The round is abandoned (max_abandoned_rounds = 1: the run stops)."""
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.server.app import run_server

    run = tiny_config(server={"rounds": 1, "devices_per_round": 1, "min_registered": 1, "round_deadline_s": 2.5,
                              "chunk_bytes": 16384, "max_abandoned_rounds": 1},  # paced chunk by chunk
                      method={"name": "lora", "lora": {"rank": 32, "alpha": 32.0}})
    with run_server(run, tmp_path / "run") as (coord, port):
        driver, stopped = drive_rounds(coord)
        client = EdgeClient(ClientOptions(f"127.0.0.1:{port}", ["0"], progress=False, poll_s=2.0,
                                          throttle=LinkThrottle(downlink_mbps=0.08)))
        threading.Thread(target=client.run, daemon=True).start()
        try:
            driver.join(timeout=60)
            deadline = time.monotonic() + 30
            while client.late < 1 and time.monotonic() < deadline:  # the device gives up its task once trained
                time.sleep(0.1)
        finally:
            client.close()
    assert stopped and "abandoned 1 times in a row" in stopped[0]
    assert client.late == 1
    row = json.loads((tmp_path / "run" / "abandoned.jsonl").read_text().splitlines()[0])
    dev = row["devices"][0]
    assert dev["status"] == "dropped" and dev["bytes_up"] == 0 and not row["aggregated"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_deadline_policy_gives_a_1_mbit_uplink_an_eighth_of_an_8_mbit_uplinks_density(tiny_config, tmp_path):
    """Two clients behind app-throttled uplinks of 1 and 8 Mbit/s (declared at Register): their uploads carry
    ceil(d x N) entries at the densities the deadline policy implies, 1 : 8 within one rounding, and both
    arrive inside the round's deadline; the server then holds its measured rates for the next round."""
    import math

    from edgelora import codec
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.methods import ModelHost, make_method
    from edgelora.models import load_base_model
    from edgelora.server.app import run_server
    from edgelora.server.checkpoint import load_state
    from edgelora.tasks import Stage

    method = {"name": "flasc", "lora": {"rank": 32, "alpha": 32.0}, "density_policy": "deadline",
              "min_density": 0.001, "max_density": 1.0, "transfer_fraction": 0.05}
    probe = tiny_config(method=method, server={"value_type": "float32"})
    n = sum(v.size for v in make_method(probe).init_params(
        ModelHost(load_base_model("tiny-bert", 20, 0)), Stage.DENSE).values())
    budget_s = 0.8 * n * 6.0 / 8e6 * 8  # the budget in which 8 Mbit/s moves 80 % of the entries at 6 B each
    deadline_s = 2 * budget_s / 0.05
    run = tiny_config(server={"rounds": 1, "devices_per_round": 2, "min_registered": 2, "save_updates": True,
                              "round_deadline_s": deadline_s, "value_type": "float32"},  # the 6 B an entry above
                      method={**method, "error_feedback": False})
    with run_server(run, tmp_path / "run") as (coord, port):
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        clients = [EdgeClient(ClientOptions(f"127.0.0.1:{port}", [d], progress=False, poll_s=2.0,
                                            throttle=LinkThrottle(uplink_mbps=mbps)))
                   for d, mbps in (("0", 1.0), ("1", 8.0))]
        threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for c in clients:
            c.close()
        driver.join(timeout=30)
    saved = tmp_path / "run" / "updates" / "round_0001"
    nnz = {d: sum(len(t.indices) for t in codec.decode_bundle((saved / f"device_{d}.elb").read_bytes()).values())
           for d in ("0", "1")}
    for d, mbps in (("0", 1.0), ("1", 8.0)):
        assert nnz[d] == math.ceil(min(1.0, mbps * 1e6 / 8 * budget_s / (n * 6.0)) * n), d
    assert abs(nnz["1"] - 8 * nnz["0"]) <= 8  # 1 : 8, within one rounding of the slow side
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert [x["status"] for x in row["devices"]] == ["completed", "completed"]
    assert all(x["upload_done_at"] < deadline_s for x in row["devices"])
    measured = load_state(tmp_path / "run").devices
    assert all(measured[d]["uplink_bps"] > 0 and measured[d]["up_bytes_per_entry"] > 0 for d in ("0", "1"))


class CuttingProxy:
    """A TCP proxy in front of the server that kills the first connection (both sockets, as a dropped link
    does) once `cut_after` client bytes have passed it; later connections pass untouched."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        import socket

        self.target, self.cut_after, self.cut = target_port, cut_after, False
        self.dropped = False  # the first connection was killed after cut_after bytes (not closed by its ends)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            cut_this = not self.cut
            self.cut = True
            for src, dst, count in ((client, server, cut_this), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, count, (client, server)), daemon=True).start()

    def _pipe(self, src, dst, count: bool, pair) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if count and sent > self.cut_after:
                    self.dropped = True
                    break
        except OSError:
            pass
        import socket

        for s in pair:  # the link is gone both ways (shutdown also wakes the other direction's recv)
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_a_broken_upload_resumes_from_what_the_server_holds_without_retraining(tmp_path, monkeypatch):
    """The device's link drops halfway through its upload (a proxy kills the TCP connection); the device
    reconnects, asks UploadOffset, sends only the rest and is accepted: it trained once, and the payload bytes
    it sent are at most 1.1x the update's size."""
    from edgelora.edge_client import runtime
    from edgelora.edge_client.trainer import DeviceTrainer
    trainings, sizes = [], []
    honest = DeviceTrainer.run

    def run_once(self, task, payload, download_s=0.0, **kw):
        trainings.append(task.round)
        update = honest(self, task, payload, download_s, **kw)
        sizes.append(len(update.payload))
        return update

    monkeypatch.setattr(DeviceTrainer, "run", run_once)
    monkeypatch.setattr(runtime.Backoff, "failed", lambda self, what: time.sleep(0.2))
    # LoRA r = 256 on tiny-bert: a ~700 kB update, so what the cut loses in flight (gRPC's and TCP's buffers,
    # tens of kB) is small beside it
    # (a resume starts after the last whole chunk the server received: 16 KiB chunks here)
    run = load_config(tiny_raw(server={"rounds": 1, "devices_per_round": 1, "min_registered": 1,
                                       "chunk_bytes": 16384},
                               method={"name": "lora", "lora": {"rank": 256, "alpha": 256.0}}))
    proxies = []

    def via_proxy(port):  # before the upload the device sends a few kB (spec, register, heartbeats): the cut
        proxies.append(CuttingProxy(port, cut_after=400_000))  # falls mid-upload
        return f"127.0.0.1:{proxies[-1].port}"

    try:  # an 8 Mbit/s uplink, paced before gRPC as a real link is: little sits in buffers when the link drops
        client = serve_one_client(run, tmp_path / "run", LinkThrottle(uplink_mbps=8.0), connect=via_proxy)
    finally:
        for proxy in proxies:
            proxy.close()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["devices"][0]["status"] == "completed" and row["aggregated"]
    assert trainings == [1] and sizes[0] > 600_000  # trained once
    assert any(p.dropped for p in proxies), "the link dropped mid-upload"
    # resent little: the rest, not all of it (equal when nothing sent before the cut was lost in flight)
    assert sizes[0] <= client.payload_bytes_sent["0"] <= 1.1 * sizes[0]
