"""How many connected devices one coordinator holds: heartbeat latency with N devices idle in FetchTask.

    python -m benchmarks.fleet --devices 100 500 2000 [--procs 4] [--seconds 40] [--pace-s S] [--json PATH]

For each N: a real `edgelora server` process (tiny-bert, N + 1 partitions, waiting for N + 1 registrations so no
round starts) on 127.0.0.1, and a load generator of raw stub clients in `--procs` processes. Every client has its
own channel (its own TCP connection), registers, then long-polls FetchTask (wait_s 30), as a single-device client
does, and sends a Heartbeat every 5 s (timeout 5 s), recording the latency; each process runs its clients as
coroutines on one asyncio event loop (grpc.aio), so the generator is not what saturates. After all N are registered
and have waited once, heartbeats are measured for `--seconds`. One JSON record per N: `devices`,
`heartbeat_p50_ms`, `heartbeat_p99_ms`, `heartbeats`, `failed` (heartbeats that errored or timed out, and clients
that never registered), `failed_by_status` (the failed heartbeats by gRPC status), `server_rss_mb` (VmRSS at the
end), `server_threads` (its threads at the end: under the old thread-pool servicer a long-polling device held a
handler thread; under grpc.aio it holds a coroutine), `server_cpu` (the server's CPU seconds over the measured
window / its length: 1.0 is one core busy), `load_cpu` (the same for the load generator's processes together) and
`pace_s`. With
--pace-s S the server runs pace steering (server.pace_s = S): an idle device is answered WAIT at once with a
retry_after_s, which the clients honour before polling again, and heartbeats at the interval its heartbeat replies
give. With --tokens the server checks a per-device token on every call (`edgelora server --tokens FILE`,
server.auth), as a deployment does, and every client sends its own. Goal (issue 29): 10,000 devices with p99
under 200 ms and server RSS under 1.5 GB on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from edgelora.launch import Launcher

HEARTBEAT_S = 5.0


def _client_proc(addr: str, ids: list[str], fps: tuple[str, str], seconds: float, ready, go, out,
                 sizes: dict[str, int] | None = None, tokens: dict[str, str] | None = None) -> None:
    """One load-generator process: its devices on one asyncio event loop (grpc.aio), so a waiting device costs
    a coroutine, not a thread, and the generator is not what saturates."""
    import asyncio

    asyncio.run(_devices(addr, ids, fps, seconds, ready, go, out, sizes, tokens))


async def _devices(addr: str, ids: list[str], fps: tuple[str, str], seconds: float, ready, go, out,
                   sizes: dict[str, int] | None = None, tokens: dict[str, str] | None = None) -> None:
    """sizes (round mode): each device's partition size; a device handed a task uploads a zero update of the
    download's tensors (what a device that learned nothing sends), and every device runs until it is told the
    run is over, instead of for `seconds`. tokens: each device's token, sent with every call."""
    import asyncio
    import gc
    import resource

    import grpc
    import numpy as np

    import codec
    from edgelora.protos import edgelora_pb2 as pb
    from edgelora.protos import edgelora_pb2_grpc as pb_grpc
    from edgelora.protos.channel import CLIENT_OPTIONS

    stop = asyncio.Event()
    md = {d: (("x-device-id", d), ("authorization", f"Bearer {tokens[d]}")) if tokens else None for d in ids}
    told: set[str] = set()  # round mode: devices that heard the run is over
    zeros: dict[bytes, bytes] = {}  # a zero update per distinct download

    async def upload(stub, d: str, header, payload: bytes) -> None:
        if payload not in zeros:
            shapes = {n: t.shape for n, t in codec.decode_bundle(payload).items()}
            zeros[payload] = codec.encode_bundle({n: codec.Dense(np.zeros(s, np.float32)) for n, s in shapes.items()})
        body = zeros[payload]

        async def msgs():
            yield pb.UpdateChunk(header=pb.UpdateHeader(device_id=d, round=header.round, num_examples=sizes[d],
                                                        payload_bytes=len(body), task_id=header.task_id))
            for at in range(0, len(body), 64 * 1024):
                yield pb.UpdateChunk(data=body[at:at + 64 * 1024])
        await stub.SubmitUpdate(msgs(), timeout=120, metadata=md[d])
    stubs, channels = {}, []
    gate = asyncio.Semaphore(64)  # registrations in flight at once

    async def register(d: str) -> None:
        # own subchannel pool: a TCP connection per device, as separate devices have
        ch = grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1), *CLIENT_OPTIONS])
        channels.append(ch)
        stub = pb_grpc.CoordinatorStub(ch)
        async with gate:
            try:
                await stub.Register(pb.RegisterRequest(device_id=d, hardware="fleet", model_fingerprint=fps[0],
                                                       tokenizer_fingerprint=fps[1]), timeout=120,
                                     metadata=md[d])
                stubs[d] = stub
            except grpc.RpcError:
                pass

    async def poll(stub, d: str) -> None:
        while not stop.is_set() and d not in told:
            try:
                header, data = None, []
                async for chunk in stub.FetchTask(pb.FetchTaskRequest(device_id=d, wait_s=30.0), timeout=60,
                                                  metadata=md[d]):
                    if chunk.HasField("header"):
                        header = chunk.header
                    else:
                        data.append(chunk.data)
                retry = header.retry_after_s if header is not None else 0.0
                if sizes is not None and header is not None and header.kind == pb.TaskHeader.TRAIN:
                    await upload(stub, d, header, b"".join(data))
                elif sizes is not None and header is not None and header.kind == pb.TaskHeader.STOP:
                    told.add(d)
                elif retry:  # pace steering: not before the server said
                    await asyncio.wait_for(stop.wait(), retry)
            except asyncio.TimeoutError:
                pass
            except grpc.RpcError:
                await asyncio.sleep(1.0)

    lat, errors = [], 0
    why: dict[str, int] = {}  # failed heartbeats by gRPC status

    async def beat(stub, d: str, first: float, t_end: float) -> None:
        nonlocal errors
        at = first
        while d not in told:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if time.monotonic() >= t_end or d in told:
                return
            t0 = time.monotonic()
            interval = HEARTBEAT_S
            try:
                reply = await stub.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=5.0, metadata=md[d])
                if not told:  # round mode: the heartbeats while the run goes on (not its end, telling every device)
                    lat.append((time.monotonic() - t0) * 1000)
                interval = reply.next_heartbeat_s or HEARTBEAT_S
                if sizes is not None and reply.run_finished:
                    told.add(d)
            except grpc.RpcError as e:
                if not told:
                    errors += 1
                    why[e.code().name] = why.get(e.code().name, 0) + 1
            at += interval

    # Round mode holds one device back until every process is registered and polling: its registration (the
    # fleet's last) opens the round on a settled fleet, as a round opens on devices connected long before.
    held = ids[-1:] if sizes is not None else []
    await asyncio.gather(*(register(d) for d in ids if d not in held))
    polls = [asyncio.create_task(poll(stub, d)) for d, stub in stubs.items()]
    ready.put(len(stubs) + len(held))
    # The generator's own collector pauses (every device's channel and coroutines are tracked objects) would
    # read as the server's latency: what exists now is kept out of its scans, as the server keeps its start-up
    gc.collect()
    gc.freeze()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    await asyncio.gather(*(register(d) for d in held))
    polls += [asyncio.create_task(poll(stubs[d], d)) for d in held if d in stubs]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    t_end = start + seconds if sizes is None else float("inf")
    # each device's first heartbeat spread over one interval, then as its replies say (or every 5 s)
    await asyncio.gather(*(beat(stub, d, start + i * HEARTBEAT_S / max(1, len(stubs)), t_end)
                           for i, (d, stub) in enumerate(stubs.items())))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    for task in polls:
        task.cancel()
    await asyncio.gather(*polls, return_exceptions=True)
    for ch in channels:
        await ch.close()
    out.put({"lat": lat, "errors": errors + len(ids) - len(stubs), "why": why,
             "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime})


def _proc_status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_stats(pid: int, cpu0: float, t0: float) -> tuple[float, float, int]:
    """(its CPU share since t0, when it had used cpu0 CPU seconds; its RSS in MB; its threads) now."""
    return ((_cpu_s(pid) - cpu0) / (time.monotonic() - t0), _proc_status(pid, "VmRSS") / 1024,
            int(_proc_status(pid, "Threads")))


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus` (threads it starts later inherit their creator's)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:  # the thread ended
            pass


def measure(n: int, procs: int, seconds: float, fps: tuple[str, str], pace_s: float = 0.0, round_k: int = 0,
            pin: bool = False, tokens: bool = False, max_connections: int = 0) -> dict:
    """round_k > 0: instead of idling for `seconds`, one round samples round_k of the n devices, which answer
    with zero updates; reports the round's seconds beside the heartbeats during it. pin: the server on CPU 0,
    the load generator on the others (devices stand on machines of their own). tokens: a token per device,
    checked on every call. max_connections: server.max_connections (0: 3 n + 256, room for every device's long
    poll and its other calls)."""
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix=f"fleet-{n}-"))
    total = n if round_k else n + 1  # idle: one partition more than devices, so no round ever starts
    raw = {"server": {"rounds": 1, "devices_per_round": round_k or 1, "min_registered": total,
                      "min_devices": round_k or 1, "registration_timeout_s": 3600.0, "round_deadline_s": 600.0,
                      "heartbeat_s": HEARTBEAT_S, "device_timeout_s": 60.0,
                      "max_connections": max_connections or 3 * n + 256, "pace_s": pace_s},
           "model": {"name": "tiny-bert", "max_seq_len": 32},
           "data": {"num_devices": total, "max_examples_per_device": 4, "test_max_examples": 8, "partition": "iid"},
           "method": {"name": "lora"}}
    ids = [str(i) for i in range(n)]
    sizes = None
    if round_k:
        from edgelora.config import load_config
        from edgelora.data import partition_sizes

        run = load_config(raw)
        sizes = dict(zip(ids, partition_sizes(run.data, run.model.task)))
    token_of = None
    args = ["--insecure"]
    if tokens:
        from edgelora.server.auth import load_tokens, make_tokens

        (tmp / "tokens.toml").write_text(make_tokens(ids))
        token_of = load_tokens(tmp / "tokens.toml")
        args += ["--tokens", str(tmp / "tokens.toml")]
    with Launcher(tmp) as launch:  # the server only: the devices are the raw stub clients above
        addr = launch.start_server(raw, args=args, log=tmp / "server.log")
        ctx = mp.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()  # go: every process registered its devices
        workers = [ctx.Process(target=_client_proc, args=(addr, ids[k::procs], fps, seconds, ready, go, out,
                                                          sizes and {d: sizes[d] for d in ids[k::procs]},
                                                          token_of and {d: token_of[d] for d in ids[k::procs]}))
                   for k in range(procs)]
        for w in workers:
            w.start()
        if pin:
            cpus = sorted(os.sched_getaffinity(0))
            _pin(launch.server.pid, {cpus[0]})
            for w in workers:
                _pin(w.pid, set(cpus[1:]))
        registered = sum(ready.get(timeout=600) for _ in workers)
        time.sleep(3.0)  # every client is now inside its first FetchTask (or, paced, told when to come back)
        cpu0, t0 = _cpu_s(launch.server.pid), time.monotonic()
        go.set()
        cpu, rss, threads = 0.0, 0.0, 0
        if round_k:  # the server exits once the round is done and every device heard so: sample it until then
            while launch.server.poll() is None:
                try:
                    cpu, now_rss, now_threads = _server_stats(launch.server.pid, cpu0, t0)
                except (OSError, ValueError):
                    break
                rss, threads = max(rss, now_rss), max(threads, now_threads)
                time.sleep(0.5)
        results = [out.get(timeout=seconds + 600) for _ in workers]
        if not round_k:
            cpu, rss, threads = _server_stats(launch.server.pid, cpu0, t0)
        for w in workers:
            w.join(timeout=60)
    lat = np.array([x for r in results for x in r["lat"]])
    rec = {"devices": n, "registered": registered, "heartbeats": int(lat.size),
           "heartbeat_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
           "heartbeat_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
           "failed": sum(r["errors"] for r in results) + (n - registered),
           "failed_by_status": dict(sum((Counter(r["why"]) for r in results), Counter())),
           "server_rss_mb": round(rss, 1), "server_threads": threads, "server_cpu": round(cpu, 3),
           "load_cpu": round(sum(r["cpu_s"] for r in results) / seconds, 3), "pace_s": pace_s, "pinned": pin,
           "tokens": tokens, "max_connections": raw["server"]["max_connections"]}
    if round_k:
        row = json.loads((tmp / "metrics.jsonl").read_text().splitlines()[0])
        rec.update(sampled=row["sampled"], completed=row["completed"], round_s=round(row["seconds"], 3),
                   load_cpu=None)  # (no fixed window)
    return rec


def fingerprints() -> tuple[str, str]:
    from edgelora.config import ModelConfig
    from edgelora.edge_client.trainer import DeviceHost
    from edgelora.models import fingerprint_model, fingerprint_tokenizer

    host = DeviceHost(ModelConfig(name="tiny-bert", num_labels=20, max_seq_len=32))
    return fingerprint_model(host.base), fingerprint_tokenizer(host.tokenizer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 500, 2000])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--pace-s", type=float, default=0.0, help="server.pace_s (0: pace steering off)")
    ap.add_argument("--round", type=int, default=0, metavar="K",
                    help="instead of idling: one round that samples K of the N devices (they upload zero updates)")
    ap.add_argument("--pin", action="store_true",
                    help="the server on one CPU, the load generator on the others (Linux)")
    ap.add_argument("--tokens", action="store_true", help="a token per device, checked on every call (--tokens FILE)")
    ap.add_argument("--max-connections", type=int, default=0,
                    help="server.max_connections (default: 3 N + 256, room for every device)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    fps = fingerprints()
    rows = []
    for n in a.devices:
        rec = measure(n, a.procs, a.seconds, fps, a.pace_s, a.round, a.pin, a.tokens, a.max_connections)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    if a.json:
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
