"""A real coordinator on a real port, spoken to with raw gRPC stubs: every bad upload is refused with a
status that names the problem, nothing bad is aggregated, and the round and the server go on."""
from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from edgelora import codec
from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.protos.refusals import refusal_code
from edgelora.server.app import run_server

from .conftest import drive_rounds


@pytest.fixture
def server(tiny_config, tmp_path):
    started = []

    def start(**sections):
        run = tiny_config(**sections)
        ctx = run_server(run, tmp_path / "run")
        coord, port = ctx.__enter__()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((ctx, channel))
        return coord, pb_grpc.CoordinatorStub(channel), tmp_path / "run"

    yield start
    for ctx, channel in started:
        channel.close()
        ctx.__exit__(None, None, None)


def register(stub, coord, device_id, model_fp=None, tok_fp=None):
    return stub.Register(pb.RegisterRequest(device_id=device_id, hardware="test",
                                            model_fingerprint=model_fp or coord.model_fingerprint,
                                            tokenizer_fingerprint=tok_fp or coord.tokenizer_fingerprint), timeout=10)


TASK_IDS: dict[str, str] = {}  # the last task id handed to each device id: submit() answers it by default


def fetch(stub, device_id, wait_s=20.0):
    header, data = None, b""
    for chunk in stub.FetchTask(pb.FetchTaskRequest(device_id=device_id, wait_s=wait_s), timeout=60):
        if chunk.WhichOneof("part") == "header":
            header = chunk.header
        else:
            data += chunk.data
    TASK_IDS[device_id] = header.task_id
    return header, data


def submit(stub, device_id, round_id, payload, declared=None, num_examples=None, chunk=64 * 1024, task_id=None):
    num_examples = 24 if num_examples is None else num_examples  # the tiny config's partition size
    task_id = TASK_IDS.get(device_id, "") if task_id is None else task_id
    def msgs():
        yield pb.UpdateChunk(header=pb.UpdateHeader(device_id=device_id, round=round_id, num_examples=num_examples,
                                                    payload_bytes=len(payload) if declared is None else declared,
                                                    task_id=task_id))
        for s in range(0, len(payload), chunk):
            yield pb.UpdateChunk(data=payload[s:s + chunk])
    return stub.SubmitUpdate(msgs(), timeout=30)


def refused(fn, code, match, refusal=None):
    """The call fails with `code`, a message containing `match` and, when given, the typed refusal code the
    device decides by (a google.rpc.Status whose ErrorInfo reason is the code, domain "edgelora")."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    assert match in e.value.details(), e.value.details()
    if refusal is not None:
        assert refusal_code(e.value) == refusal
        from grpc_status import rpc_status

        status = rpc_status.from_call(e.value)  # the standard rich status, as any gRPC client reads it
        assert status.code == code.value[0] and status.message == e.value.details() and len(status.details) == 1


def start_rounds(coord, stub):
    """Register devices 0 and 1, then drive the rounds in a thread; returns (W0, the driver thread)."""
    register(stub, coord, "0")
    register(stub, coord, "1")
    w0 = {k: v.copy() for k, v in coord.state.params.items()}
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()
    return w0, driver


def delta_bundle(payload, value=0.5, **overrides):
    shapes = {n: t.shape for n, t in codec.decode_bundle(payload).items()}
    tensors = {n: codec.Dense(np.full(s, value, np.float32)) for n, s in shapes.items()}
    tensors.update(overrides)
    return codec.encode_bundle(tensors), shapes


def test_bad_inputs_are_refused_and_the_round_goes_on(server):
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 2, "min_devices": 1,
                                          "round_deadline_s": 6.0, "max_upload_bytes": 2_000_000,
                                          "chunk_bytes": 256 * 1024})
    refused(lambda: register(stub, coord, "9"), grpc.StatusCode.INVALID_ARGUMENT, "not a partition index")
    refused(lambda: register(stub, coord, "0", model_fp="ab" * 32), grpc.StatusCode.FAILED_PRECONDITION,
            "base model fingerprint differs")
    refused(lambda: register(stub, coord, "0", tok_fp="cd" * 32), grpc.StatusCode.FAILED_PRECONDITION,
            "tokenizer fingerprint differs")
    w0, driver = start_rounds(coord, stub)

    header, payload = fetch(stub, "0")
    assert header.kind == pb.TaskHeader.TRAIN and header.round == 1 and len(payload) == header.payload_bytes
    assert 0 < header.deadline_s <= 6.0  # the time left in the round
    good, shapes = delta_bundle(payload)
    name = next(iter(shapes))

    refused(lambda: submit(stub, "7", 1, good), grpc.StatusCode.FAILED_PRECONDITION, "not registered", "unknown")
    refused(lambda: submit(stub, "0", 5, good), grpc.StatusCode.FAILED_PRECONDITION, "open round is 1",
            "precondition")
    renamed = {("bert.not_a_weight" if n == name else n): codec.Dense(np.zeros(s, np.float32)) for n, s in shapes.items()}
    wrong_name = codec.encode_bundle(renamed)
    refused(lambda: submit(stub, "0", 1, wrong_name), grpc.StatusCode.INVALID_ARGUMENT, "unknown tensor name")
    wrong_shape, _ = delta_bundle(payload, **{name: codec.Dense(np.zeros((2, 2), np.float32))})
    refused(lambda: submit(stub, "0", 1, wrong_shape), grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name}: shape")
    refused(lambda: submit(stub, "0", 1, good, declared=3_000_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "exceeds the server's limit")
    refused(lambda: submit(stub, "0", 1, good[:-10], declared=len(good)), grpc.StatusCode.INVALID_ARGUMENT,
            "truncated upload")
    refused(lambda: submit(stub, "0", 1, good + b"xx", declared=len(good)), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "more than the declared")
    refused(lambda: submit(stub, "0", 1, b"not a codec bundle at all"), grpc.StatusCode.INVALID_ARGUMENT, "payload")

    def empty_chunks():
        yield pb.UpdateChunk(header=pb.UpdateHeader(device_id="0", round=1, num_examples=24, payload_bytes=len(good),
                                                    task_id=TASK_IDS["0"]))
        yield pb.UpdateChunk(data=b"")
    refused(lambda: stub.SubmitUpdate(empty_chunks(), timeout=30), grpc.StatusCode.INVALID_ARGUMENT, "empty data chunk")
    refused(lambda: submit(stub, "0", 1, good, chunk=len(good)) if len(good) > 300_000 else
            submit(stub, "0", 1, good + bytes(400_000), chunk=400_000, declared=len(good) + 400_000),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "")

    refused(lambda: submit(stub, "0", 1, good, num_examples=10_000), grpc.StatusCode.INVALID_ARGUMENT,
            "num_examples 10000 != 24")
    huge, _ = delta_bundle(payload, value=3e38)  # finite, but would wreck the global model
    refused(lambda: submit(stub, "0", 1, huge), grpc.StatusCode.INVALID_ARGUMENT, "max_update_abs")
    reply = submit(stub, "0", 1, good)
    assert reply.accepted and reply.round == 1
    refused(lambda: submit(stub, "0", 1, good), grpc.StatusCode.ALREADY_EXISTS, "already uploaded")
    # a device may fetch its task again (reconnects, refused uploads), but at most 3 times a round
    assert [fetch(stub, "1", wait_s=0.5)[0].kind for _ in range(4)] == [pb.TaskHeader.TRAIN] * 3 + [pb.TaskHeader.WAIT]

    driver.join(timeout=60)  # device 1 never reports: the deadline drops it, the round aggregates device 0
    assert not driver.is_alive()
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert (rec["sampled"], rec["completed"], rec["aggregated"]) == (2, 1, True)
    statuses = {d["device_id"]: d["status"] for d in rec["devices"]}
    assert statuses == {"0": "completed", "1": "dropped"}
    for k, v in coord.state.params.items():  # only the good upload was aggregated: W0 + 0.5
        np.testing.assert_allclose(v, w0[k] + 0.5, rtol=0, atol=1e-6)
    header, _ = fetch(stub, "0", wait_s=5)
    assert header.kind == pb.TaskHeader.STOP


def test_an_abandoned_round_runs_again_and_too_many_in_a_row_stop_the_run_with_its_state_saved(server):
    """A round with fewer than min_devices updates does not count as one of server.rounds: the same round runs
    again (a new sample, weights unchanged, no metrics row; abandoned.jsonl keeps its record), and after
    max_abandoned_rounds in a row the run stops with RoundsAbandoned, its state on disk."""
    from edgelora.server.checkpoint import load_state

    coord, stub, run_dir = server(server={"rounds": 2, "devices_per_round": 2, "min_devices": 2,
                                          "round_deadline_s": 2.0, "max_abandoned_rounds": 2})
    register(stub, coord, "0")
    register(stub, coord, "1")
    w0, rng0 = {k: v.copy() for k, v in coord.state.params.items()}, coord.state.rng
    driver, raised = drive_rounds(coord)
    header, payload = fetch(stub, "0")
    submit(stub, "0", 1, delta_bundle(payload)[0])
    # round 1 closes with 1 of 2 (< min_devices): abandoned, and round 1 opens again
    deadline = time.monotonic() + 30
    while not (run_dir / "abandoned.jsonl").exists():
        assert time.monotonic() < deadline, "round 1 was never abandoned"
        time.sleep(0.1)
    header, _ = fetch(stub, "1", wait_s=20)
    assert header.kind == pb.TaskHeader.TRAIN and header.round == 1
    driver.join(timeout=60)
    assert not driver.is_alive()
    assert raised and "round 1 was abandoned 2 times in a row (server.max_abandoned_rounds = 2)" in raised[0]
    assert (run_dir / "metrics.jsonl").read_text() == ""
    tries = [json.loads(l) for l in (run_dir / "abandoned.jsonl").read_text().splitlines()]
    assert [(t["round"], t["completed"], t["aggregated"]) for t in tries] == [(1, 1, False), (1, 0, False)]
    saved = load_state(run_dir)
    assert saved.round == 0 and not saved.finished and saved.rng != rng0  # the sampler moved on
    for k, v in saved.params.items():
        np.testing.assert_array_equal(v, w0[k])


def test_over_selection_closes_at_the_kth_upload_and_refuses_the_next(server):
    """13 sampled (K = 10, over_selection = 0.3): the round closes at the 10th accepted upload, the 11th is
    refused with FAILED_PRECONDITION saying so, and the new weights are W0 + the mean of exactly those 10."""
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 10, "over_selection": 0.3,
                                          "min_registered": 13, "round_deadline_s": 60.0},
                                  data={"num_devices": 13, "max_examples_per_device": 24})
    ids = [str(i) for i in range(13)]
    for d in ids:
        register(stub, coord, d)
    w0 = {k: v.copy() for k, v in coord.state.params.items()}
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()
    tasks = {d: fetch(stub, d) for d in ids}
    assert all(h.kind == pb.TaskHeader.TRAIN and h.round == 1 for h, _ in tasks.values())  # all 13 sampled
    sizes = coord.engine.partition_sizes
    for i, d in enumerate(ids[:10]):  # device i sends delta (i + 1) / 100 everywhere
        payload, _ = delta_bundle(tasks[d][1], value=(i + 1) / 100)
        submit(stub, d, 1, payload, num_examples=sizes[i])
    late, _ = delta_bundle(tasks["10"][1], value=5.0)
    refused(lambda: submit(stub, "10", 1, late, num_examples=sizes[10]), grpc.StatusCode.FAILED_PRECONDITION,
            "its 10 updates have arrived (over-selection)", "precondition")
    driver.join(timeout=60)
    assert coord.state.finished
    expect = sum(sizes[i] * (i + 1) / 100 for i in range(10)) / sum(sizes[:10])
    for k, v in coord.state.params.items():
        np.testing.assert_allclose(v, w0[k] + np.float32(expect), rtol=0, atol=1e-6, err_msg=k)
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    status = {x["device_id"]: x["status"] for x in row["devices"]}
    assert row["sampled"] == 13 and row["completed"] == 10
    assert [status[d] for d in ids[10:]] == ["late", "late", "late"]


def test_a_round_whose_outstanding_devices_all_went_offline_closes_early(server):
    """Both sampled devices stop heartbeating after fetching their task: the round closes once the registry
    sees them gone (device_timeout_s = 2), well before its 60 s deadline."""
    coord, stub, run_dir = server(server={"rounds": 2, "devices_per_round": 2, "min_devices": 1,
                                          "round_deadline_s": 60.0, "heartbeat_s": 0.5, "device_timeout_s": 2.0})
    _, driver = start_rounds(coord, stub)
    fetch(stub, "0")
    fetch(stub, "1")
    last_contact = time.monotonic()
    deadline = time.monotonic() + 30
    while not (run_dir / "abandoned.jsonl").exists():  # nobody delivered: the round is abandoned, to run again
        assert time.monotonic() < deadline, "round 1 never closed"
        time.sleep(0.1)
    closed_after = time.monotonic() - last_contact
    assert closed_after < 2 * 2.0 + 1.0  # within 2 x device_timeout_s (+1 s: the driver waits in 1 s steps)
    row = json.loads((run_dir / "abandoned.jsonl").read_text().splitlines()[0])
    assert [x["status"] for x in row["devices"]] == ["dropped", "dropped"] and not row["aggregated"]
    assert (run_dir / "metrics.jsonl").read_text() == "" and coord.state.round == 0
    coord.stop()
    driver.join(timeout=30)


def test_replayed_relabelled_and_foreign_uploads_are_refused_by_task_id(server, caplog):
    """The probe: device 1's round-1 upload re-sent as round 2 without fetching round 2's task was accepted.
    Now every upload must carry the single-use id of a task handed to its own device in the open round."""
    coord, stub, run_dir = server(server={"rounds": 2, "devices_per_round": 2, "min_devices": 2,
                                          "round_deadline_s": 20.0})
    _, driver = start_rounds(coord, stub)
    h0, p0 = fetch(stub, "0")
    h1, p1 = fetch(stub, "1")
    assert h0.task_id and h1.task_id and h0.task_id != h1.task_id
    up0, _ = delta_bundle(p0, value=0.01)
    up1, _ = delta_bundle(p1, value=0.01)
    refused(lambda: submit(stub, "1", 1, up1, task_id=h0.task_id), grpc.StatusCode.FAILED_PRECONDITION,
            "was not handed to device 1", "precondition")  # another device's id
    refused(lambda: submit(stub, "1", 1, up1, task_id=""), grpc.StatusCode.FAILED_PRECONDITION, "task id ''")
    submit(stub, "0", 1, up0)
    submit(stub, "1", 1, up1)
    # round 2 opens; device 1 replays its round-1 upload relabelled as round 2, without fetching round 2's task
    deadline = time.monotonic() + 30
    while coord.state.round < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    refused(lambda: submit(stub, "1", 2, up1, task_id=h1.task_id), grpc.StatusCode.FAILED_PRECONDITION,
            "was not handed to device 1 in this round")
    assert "refused" in caplog.text and "was not handed to device 1" in caplog.text  # logged, not only answered
    coord.stop()
    driver.join(timeout=30)


def test_between_rounds_the_coordinator_waits_for_devices_to_return(server, caplog):
    """Fewer live devices than min_devices after round 1: the coordinator neither exits nor times out
    (registration_timeout_s = 1 s applies before round 1 only); it logs live against registered and goes on
    when the device is back."""
    import logging

    caplog.set_level(logging.WARNING, logger="edgelora.server")
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 2, "min_devices": 2,
                                          "round_deadline_s": 20.0, "registration_timeout_s": 1.0,
                                          "heartbeat_s": 0.5, "device_timeout_s": 1.5})
    _, driver = start_rounds(coord, stub)
    quiet = {d: threading.Event() for d in ("0", "1")}

    def beat(device_id):  # what a client's heartbeat thread does, until the device goes quiet
        while not quiet[device_id].wait(0.3):
            stub.Heartbeat(pb.HeartbeatRequest(device_id=device_id), timeout=5)

    for d in quiet:
        threading.Thread(target=beat, args=(d,), daemon=True).start()
    tasks = {d: fetch(stub, d) for d in ("0", "1")}
    quiet["1"].set()  # device 1 goes quiet mid-round: round 1 closes early without it (and is abandoned)
    submit(stub, "0", 1, delta_bundle(tasks["0"][1], value=0.01)[0])
    deadline = time.monotonic() + 20
    while "1 devices live of 2 registered, 2 needed" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.1)
    time.sleep(1.5)
    assert driver.is_alive() and coord.state.round == 0  # still waiting, well past registration_timeout_s
    assert (run_dir / "metrics.jsonl").read_text() == ""  # the abandoned round 1 is not a round of the run
    assert json.loads((run_dir / "abandoned.jsonl").read_text())["completed"] == 1
    h, p = fetch(stub, "1")  # device 1 is back: any call counts as a heartbeat
    h0, p0 = fetch(stub, "0")
    assert h.kind == h0.kind == pb.TaskHeader.TRAIN and h.round == 1  # round 1 again
    for d, payload in (("0", p0), ("1", p)):
        submit(stub, d, 1, delta_bundle(payload, value=0.01)[0])
    driver.join(timeout=30)
    quiet["0"].set()
    assert coord.state.finished and coord.state.round == 1
    assert [json.loads(l)["aggregated"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()] == [True]


def test_an_oversized_chunk_is_refused_and_logged_with_the_real_reason(server, caplog):
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 1, "chunk_bytes": 4096,
                                          "round_deadline_s": 10.0})
    register(stub, coord, "0")
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()
    h, payload = fetch(stub, "0")
    big, _ = delta_bundle(payload, value=0.01)
    big += bytes(max(0, 200_000 - len(big)))
    refused(lambda: submit(stub, "0", 1, big, chunk=200_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "upload chunk of 200000 bytes exceeds server.chunk_bytes = 4096")
    assert "refused: upload chunk of 200000 bytes exceeds server.chunk_bytes" in caplog.text
    assert "stream broken off" not in caplog.text
    coord.stop()
    driver.join(timeout=30)


def test_heartbeats_are_answered_while_100_devices_wait_in_fetchtask(server):
    """The probe: with 64 or more clients long-polling FetchTask, every other call queued behind them (a 64-thread
    pool) and half the heartbeats hit DEADLINE_EXCEEDED. 100 devices, each on its own connection, wait for a
    task that never comes; every one of their heartbeats is answered within 2 s, and the server holds them
    without a thread each (grpc.aio: its calls run on pools of LIGHT_THREADS + HEAVY_THREADS, named rpc-*)."""
    from edgelora.server.servicer import HEAVY_THREADS, LIGHT_THREADS

    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 1, "min_registered": 101,
                                          "registration_timeout_s": 600.0},
                                  data={"num_devices": 101, "max_examples_per_device": 4})
    stubs, channels = {}, []
    for i in range(100):  # a connection of its own per device
        channels.append(grpc.insecure_channel(f"127.0.0.1:{_port(run_dir)}",
                                              options=[("grpc.use_local_subchannel_pool", 1)]))
        stubs[str(i)] = pb_grpc.CoordinatorStub(channels[-1])
        register(stubs[str(i)], coord, str(i))
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()  # waits for a 101st device: no round starts, every FetchTask waits its full wait_s
    def wait_for_task(s, d):
        try:
            list(s.FetchTask(pb.FetchTaskRequest(device_id=d, wait_s=20), timeout=60))
        except grpc.RpcError:  # the server stops at the end of the test
            pass

    waiting = [threading.Thread(target=wait_for_task, args=(s, d), daemon=True) for d, s in stubs.items()]
    for t in waiting:
        t.start()
    time.sleep(2.0)
    for d, s in stubs.items():
        assert s.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=2.0).round == 0
    server_threads = [t.name for t in threading.enumerate() if t.name.startswith("rpc")]
    assert 0 < len(server_threads) <= LIGHT_THREADS + HEAVY_THREADS, server_threads
    coord.stop()
    for ch in channels:
        ch.close()


def test_polls_past_the_connection_cap_are_told_to_come_back_and_heartbeats_still_find_room(server):
    """server.max_connections = 16 (grpc.aio refuses every call past it): long polls take at most 14
    (servicer.poll_cap). 20 devices long-poll; the 6 past the cap are answered WAIT at once with a retry-after in
    [0.5, 1.5) x heartbeat_s, the 14 keep waiting, and every device's heartbeat is answered. (Before, the cap's
    16 polls were held and every other call, heartbeats too, was refused RESOURCE_EXHAUSTED: 5,000 devices on
    the default 4,096 lost 80 % of their heartbeats.)"""
    from edgelora.server.servicer import poll_cap

    assert poll_cap(16) == 14 and poll_cap(4096) == 3584
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 1, "min_registered": 21,
                                          "registration_timeout_s": 600.0, "max_connections": 16,
                                          "heartbeat_s": 2.0},
                                  data={"num_devices": 21, "max_examples_per_device": 4})
    stubs, channels = {}, []
    for i in range(20):
        channels.append(grpc.insecure_channel(f"127.0.0.1:{_port(run_dir)}",
                                              options=[("grpc.use_local_subchannel_pool", 1)]))
        stubs[str(i)] = pb_grpc.CoordinatorStub(channels[-1])
        register(stubs[str(i)], coord, str(i))
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()  # waits for a 21st device: no round starts
    answers, lock = {}, threading.Lock()

    def wait_for_task(s, d):
        try:
            header = next(iter(s.FetchTask(pb.FetchTaskRequest(device_id=d, wait_s=60), timeout=90))).header
            with lock:
                answers[d] = header
        except grpc.RpcError as e:
            with lock:
                answers[d] = e.code()

    def until(done, what):
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    # one poll at a time, each held or answered before the next, so the calls in flight never pass the cap
    waiting = []
    for i, (d, s) in enumerate(stubs.items()):
        waiting.append(threading.Thread(target=wait_for_task, args=(s, d), daemon=True))
        waiting[-1].start()
        if i < 14:
            until(lambda: coord.polls_held == i + 1, f"poll {i} held")
        else:
            until(lambda: d in answers, f"poll {i} answered")
    with lock:
        told = dict(answers)
    assert len(told) == 6 and coord.polls_held == 14, told
    assert all(isinstance(h, pb.TaskHeader) and h.kind == pb.TaskHeader.WAIT and 1.0 <= h.retry_after_s < 3.0
               for h in told.values()), told
    for d, s in stubs.items():
        assert s.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=5.0).round == 0
    assert sum(t.is_alive() for t in waiting) == 14 and len(answers) == 6
    coord.stop()
    for ch in channels:
        ch.close()


def test_a_wake_up_reaches_the_long_polls_of_the_devices_that_may_have_a_task(server):
    """The driver's wake-up reaches only the polls of devices that may have something (Coordinator.may_have_tasks,
    read without the lock): a round opening wakes its sampled devices, not every device connected; the run
    over or stopping wakes every one. A device it leaves out must be one next_task would answer 'wait'."""
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 1, "min_registered": 2})
    register(stub, coord, "0")
    register(stub, coord, "1")
    assert coord.may_have_tasks() == []  # no round yet
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()
    deadline = time.monotonic() + 30
    while coord.round is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sampled = coord.may_have_tasks()
    assert len(sampled) == 1 and sampled == coord.round.sampled
    other = "1" if sampled == ["0"] else "0"
    assert coord.next_task(other)[0] == "wait"  # (the device left out has nothing)
    assert fetch(stub, sampled[0])[0].kind == pb.TaskHeader.TRAIN
    coord.stop()
    assert coord.may_have_tasks() is None


def _port(run_dir):
    return int((run_dir / "server.addr").read_text().strip().rsplit(":", 1)[1])


def test_after_the_last_round_the_server_stays_until_every_live_device_heard_the_run_is_over(server):
    """A device that was in a backoff sleep or between calls when the last round closed must still hear STOP:
    the server stays until each live device got a STOP task or a heartbeat saying run_finished, and does not
    wait for one that went quiet (it is no longer live after device_timeout_s)."""
    coord, stub, run_dir = server(server={"rounds": 1, "devices_per_round": 2, "min_registered": 2,
                                          "heartbeat_s": 0.5, "device_timeout_s": 6.0},
                                  data={"num_devices": 3})
    _, driver = start_rounds(coord, stub)
    tasks = {d: fetch(stub, d) for d in ("0", "1")}
    for d, (h, payload) in tasks.items():
        submit(stub, d, 1, delta_bundle(payload, value=0.01)[0])
    driver.join(timeout=30)
    assert coord.state.finished
    assert coord.say_goodbye(0.2) == ["0", "1"]  # both live, neither told yet
    h, _ = fetch(stub, "0")
    assert h.kind == pb.TaskHeader.STOP
    register(stub, coord, "2")  # joins after the end and then says nothing more
    out = []
    waiter = threading.Thread(target=lambda: out.append(coord.say_goodbye(60.0)), daemon=True)
    waiter.start()
    assert stub.Heartbeat(pb.HeartbeatRequest(device_id="1"), timeout=5).run_finished
    waiter.join(timeout=30)  # device 2 stops counting as live 6 s after it registered
    assert not waiter.is_alive() and out == [[]]
    assert coord.told_finished == {"0", "1"}


class _CutFetch(grpc.aio.ServerInterceptor):
    """FetchTask answers UNAVAILABLE to calls carrying x-test-cut: a device whose main loop keeps failing (and
    sleeping in backoff) while its heartbeats get through."""

    async def intercept_service(self, continuation, details):
        if details.method.endswith("/FetchTask") and ("x-test-cut", "1") in tuple(details.invocation_metadata):
            async def cut(request, context):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "cut for the test")
                yield  # (an async generator: a streaming handler)
            return grpc.unary_stream_rpc_method_handler(cut)
        return await continuation(details)


def test_a_device_retrying_in_backoff_hears_the_run_is_over_from_a_heartbeat(tiny_config, tmp_path, caplog):
    """The CI failure behind this: a device missed its STOP task and retried an exited server until
    --give-up-s, exiting 1. Now its heartbeat reply (run_finished) ends the backoff and the device exits 0."""
    import logging

    from edgelora.edge_client.runtime import ClientOptions, EdgeClient

    caplog.set_level(logging.INFO, logger="edgelora.client")
    run = tiny_config(server={"rounds": 1, "devices_per_round": 1, "min_registered": 1, "heartbeat_s": 0.5})
    with run_server(run, tmp_path / "run", interceptors=[_CutFetch()]) as (coord, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.CoordinatorStub(channel)
        register(stub, coord, "0")
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        h, payload = fetch(stub, "0")
        submit(stub, "0", 1, delta_bundle(payload, value=0.01)[0])
        driver.join(timeout=30)
        assert coord.state.finished
        client = EdgeClient(ClientOptions(server=f"127.0.0.1:{port}", device_ids=["1"], progress=False,
                                          give_up_s=300.0, metadata=(("x-test-cut", "1"),)))
        out = []
        t = threading.Thread(target=lambda: out.append(client.run()), daemon=True)
        t.start()
        t.join(timeout=30)
        client.close()
        channel.close()
    assert not t.is_alive() and out == [0]
    assert "fetch task: UNAVAILABLE" in caplog.text and "the server says the run is over" in caplog.text
    assert "1" in coord.told_finished


def test_the_server_lingers_a_heartbeat_past_the_last_device_it_told(tiny_config, tmp_path):
    """'Told' is when the answer left the server: one lost in flight (a server stopping at once) strands the device.
    say_goodbye returns only once heartbeat_s has passed since the last telling, so a device whose answer was lost
    asks again and is told again. On an injected clock, moved by hand."""
    from edgelora.server.coordinator import Coordinator

    now = [100.0]
    coord = Coordinator(tiny_config(server={"rounds": 1, "heartbeat_s": 5.0}), tmp_path / "run", clock=lambda: now[0])
    coord.register("0", "test", {}, coord.model_fingerprint, coord.tokenizer_fingerprint)
    coord.state = coord.state.replace(finished=True)
    assert coord.heartbeat("0").finished  # told at t = 100
    out = []
    waiter = threading.Thread(target=lambda: out.append(coord.say_goodbye(60.0)), daemon=True)
    waiter.start()

    def move_to(t):
        now[0] = t
        with coord.cond:
            coord.cond.notify_all()
        waiter.join(timeout=0.5)

    move_to(104.0)
    assert waiter.is_alive()  # everyone told, but within a heartbeat of it
    coord.heartbeat("0")  # the answer was lost: the device asks again at t = 104 and is told again
    move_to(108.0)
    assert waiter.is_alive()  # 4 s after the last telling
    move_to(109.5)
    assert not waiter.is_alive() and out == [[]]


# -- pace steering ---------------------------------------------------------------------------------------------
def test_pace_steering_answers_idle_devices_at_once_and_keeps_the_sampled_ones_close(server):
    """server.pace_s = 4: of 4 registered devices, round 1 samples 2. The other two ask for a task with a 20 s
    long poll and are answered WAIT at once, to ask again after 4 s x [0.5, 1.5); their heartbeat replies set
    the same pace. The sampled ones get their task, and heartbeat at server.heartbeat_s. Once a sampled
    device's upload is in, it is idle too. Without pace steering a heartbeat reply leaves the interval alone."""
    coord, stub, _ = server(server={"rounds": 2, "devices_per_round": 2, "min_registered": 4, "pace_s": 4.0},
                            data={"num_devices": 4})
    for d in "0123":
        register(stub, coord, d)
    driver = threading.Thread(target=coord.run_rounds, daemon=True)
    driver.start()
    with coord.cond:
        coord.cond.wait_for(lambda: coord.round is not None and coord.round.open, timeout=30)
    sampled = list(coord.round.sampled)
    idle = sorted(set("0123") - set(sampled))
    assert len(sampled) == 2
    for d in idle:
        start = time.monotonic()
        chunks = list(stub.FetchTask(pb.FetchTaskRequest(device_id=d, wait_s=20.0), timeout=30))
        assert time.monotonic() - start < 15  # not held for the 20 s poll
        header = chunks[0].header
        assert header.kind == pb.TaskHeader.WAIT and 2.0 <= header.retry_after_s < 6.0
        beat = stub.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=10)
        assert 2.0 <= beat.next_heartbeat_s < 6.0
    for d in sampled:
        beat = stub.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=10)
        assert beat.next_heartbeat_s == coord.run.server.heartbeat_s
    h, payload = fetch(stub, sampled[0])
    assert h.kind == pb.TaskHeader.TRAIN
    submit(stub, sampled[0], 1, delta_bundle(payload, value=0.01)[0])
    assert 2.0 <= stub.Heartbeat(pb.HeartbeatRequest(device_id=sampled[0]), timeout=10).next_heartbeat_s < 6.0
    coord.stop()
    driver.join(timeout=30)

    plain, stub2, _ = server(server={"rounds": 1, "devices_per_round": 1, "min_registered": 1})
    register(stub2, plain, "0")
    assert stub2.Heartbeat(pb.HeartbeatRequest(device_id="0"), timeout=10).next_heartbeat_s == 0.0


class _FetchLog(grpc.aio.ServerInterceptor):
    """Per device: when each FetchTask arrived, and when each one that answered WAIT finished, with its
    retry_after_s."""

    def __init__(self) -> None:
        self.arrived: dict[str, list[float]] = {}
        self.waited: dict[str, list[tuple[float, float]]] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/FetchTask"):
            return handler
        inner = handler.unary_stream

        async def logged(request, context):
            self.arrived.setdefault(request.device_id, []).append(time.monotonic())
            retry = None
            async for chunk in inner(request, context):
                if chunk.HasField("header") and chunk.header.kind == pb.TaskHeader.WAIT:
                    retry = chunk.header.retry_after_s
                yield chunk
            if retry is not None:
                self.waited.setdefault(request.device_id, []).append((time.monotonic(), retry))

        return grpc.unary_stream_rpc_method_handler(logged, handler.request_deserializer, handler.response_serializer)


def test_devices_under_pace_steering_finish_the_run_and_never_ask_before_they_were_told(tiny_config, tmp_path):
    """A real client process's main loop (EdgeClient, 3 devices in one process, 2 sampled a round) under
    server.pace_s = 0.5: the run finishes, and no device asks for a task again before the retry_after_s it was
    last answered (each answer leaves the server before the device can act on it: no timing is assumed)."""
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient

    run = tiny_config(server={"rounds": 2, "devices_per_round": 2, "min_registered": 3, "heartbeat_s": 0.25,
                              "pace_s": 0.5}, data={"num_devices": 3})
    log = _FetchLog()
    with run_server(run, tmp_path / "run", interceptors=[log]) as (coord, port):
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        client = EdgeClient(ClientOptions(server=f"127.0.0.1:{port}", device_ids=["0", "1", "2"], progress=False))
        out = []
        t = threading.Thread(target=lambda: out.append(client.run()), daemon=True)
        t.start()
        driver.join(timeout=120)
        t.join(timeout=60)
        client.close()
    assert coord.state.finished and out == [0]
    assert sum(len(v) for v in log.waited.values()) > 0  # pace steering answered somebody
    for d, answers in log.waited.items():
        for done, retry in answers:
            later = [a for a in log.arrived[d] if a > done]
            assert not later or later[0] - done >= retry - 1e-3, (d, retry, later[0] - done)


def test_the_server_process_keeps_its_start_up_out_of_the_collectors_scans():
    """settle_heap (called by serve() once the server is up): what a server process holds after start-up is
    frozen, so a full collection, which stops the event loop answering every device, scans only what came
    after. In a process of its own: freezing the test process would keep its garbage forever."""
    import subprocess
    import sys

    code = ("import gc, json; import edgelora.server.app as app; before = len(gc.get_objects()); "
            "app.settle_heap(); print(json.dumps([before, len(gc.get_objects()), gc.get_freeze_count()]))")
    before, after, frozen = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                      check=True).stdout)
    assert before > 50_000 and after < before / 100 and frozen > before * 0.9
