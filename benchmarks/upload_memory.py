"""How much a large upload raises the coordinator's peak memory.

    python -m benchmarks.upload_memory [--mib 250] [--json PATH]

Starts `edgelora server` (tiny-bert, one device) as its own process, registers device 0, fetches its task,
sends a 1 KiB upload (the first upload's one-time costs), then uploads S MiB that are not a codec bundle (so
the server reads all of it, then refuses it at decode, as in the issue's probe). Reads the server's peak RSS
(VmHWM in /proc/PID/status) before and after the large one. One JSON
record: `upload_mib`, `peak_before_mib`, `peak_after_mib`, `peak_rise_mib`, `rise_over_upload` (goal: about
1.1 or less).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main(argv=None) -> int:
    import grpc

    from edgelora.launch import Launcher
    from edgelora.protos import edgelora_pb2 as pb
    from edgelora.protos import edgelora_pb2_grpc as pb_grpc

    ap = argparse.ArgumentParser(prog="python -m benchmarks.upload_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=250)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="upload-memory-"))
    raw = {"server": {"rounds": 1, "devices_per_round": 1, "min_registered": 1, "round_deadline_s": 300.0,
                      "max_upload_bytes": (a.mib + 1) << 20},
           "model": {"name": "tiny-bert", "max_seq_len": 32},
           "data": {"num_devices": 1, "max_examples_per_device": 8, "test_max_examples": 8},
           "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8.0}}}
    with Launcher(tmp) as launch:
        addr = launch.start_server(raw, args=["--insecure"], log=tmp / "server.log")
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 8 << 20)]))
        spec = stub.GetRunSpec(pb.RunSpecRequest(), timeout=30)
        # the server checks the fingerprints: the device's are the server's own, read from a real device host
        from edgelora.edge_client.trainer import DeviceHost
        from edgelora.models import fingerprint_model, fingerprint_tokenizer
        from edgelora.protos import serde

        host = DeviceHost(serde.model_from_proto(spec.model))
        stub.Register(pb.RegisterRequest(device_id="0", model_fingerprint=fingerprint_model(host.base),
                                         tokenizer_fingerprint=fingerprint_tokenizer(host.tokenizer)), timeout=30)
        header = next(c.header for c in stub.FetchTask(pb.FetchTaskRequest(device_id="0", wait_s=60), timeout=120)
                      if c.WhichOneof("part") == "header")
        chunk = spec.chunk_bytes

        def msgs(size):
            yield pb.UpdateChunk(header=pb.UpdateHeader(device_id="0", round=header.round, num_examples=8,
                                                        payload_bytes=size, task_id=header.task_id))
            piece = bytes(chunk)
            for _ in range(size // chunk):
                yield pb.UpdateChunk(data=piece)
            if size % chunk:
                yield pb.UpdateChunk(data=bytes(size % chunk))

        def upload(size):
            try:
                stub.SubmitUpdate(msgs(size), timeout=600)
                return "accepted"
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        # A 1 KiB upload first pays the one-time costs of the first upload (the server then loads the
        # partition sizes it checks example counts against, ~90 MB for 20 Newsgroups), so the figure below is
        # what the upload's size costs.
        upload(1024)
        time.sleep(1.0)
        before = vm_hwm_mib(launch.server.pid)
        outcome = upload(a.mib << 20)
        time.sleep(1.0)
        after = vm_hwm_mib(launch.server.pid)
    rec = {"upload_mib": a.mib, "peak_before_mib": round(before, 1), "peak_after_mib": round(after, 1),
           "peak_rise_mib": round(after - before, 1), "rise_over_upload": round((after - before) / a.mib, 3),
           "outcome": outcome}
    print(json.dumps(rec))
    if a.json:
        Path(a.json).write_text(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
