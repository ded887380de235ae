"""The device lifecycle of a round (edgelora.server.engine.Round): every transition, every refused one, and that no
driver outside the engine writes a Round's fields."""
from __future__ import annotations

import ast

import numpy as np
import pytest

from edgelora import codec
from edgelora.config import load_config
from edgelora.methods import ModelHost, make_method
from edgelora.models import load_base_model
from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.server.engine import MAX_TASKS_PER_ROUND, DeviceState, IllegalTransition, RoundEngine
from edgelora.tasks import DeviceInfo, PhaseTimes

from .conftest import REPO, tiny_raw

S = DeviceState


@pytest.fixture(scope="module")
def engine():
    run = load_config(tiny_raw(server={"devices_per_round": 2}, data={"num_devices": 3}))
    run = run.replace(model=type(run.model)(name="tiny-bert", num_labels=20, max_seq_len=32))
    return RoundEngine(run, make_method(run), ModelHost(load_base_model("tiny-bert", 20, 0)))


def _open(engine, sampled=("0", "1", "2"), target=None):
    state = engine.init_state(np.random.PCG64(0).state)
    rnd = engine.open_round(state, list(sampled), {}, {d: DeviceInfo(d) for d in sampled})
    if target is not None:
        rnd.target = target
    return rnd


def _upload(rnd, d, value=0.01):
    shapes = rnd.plans[d].shapes
    return codec.encode_bundle({n: codec.Dense(np.full(s, value, np.float32)) for n, s in shapes.items()})


def _deliver(engine, rnd, d, task_id):
    payload = _upload(rnd, d)
    rnd.begin_upload(d, task_id, len(payload))
    n = engine.partition_sizes[int(d)]
    rnd.accept(d, rnd.check(d, payload, n), n, 0.5, PhaseTimes(1, 2, 3, 4), len(payload) + 10)


def test_the_happy_path_and_the_record_it_writes(engine):
    rnd = _open(engine)
    assert {d: rnd.state_of(d) for d in rnd.sampled} == {"0": S.SAMPLED, "1": S.SAMPLED, "2": S.SAMPLED}
    assert rnd.state_of("9") is None
    rnd.start_clock(30.0)
    task = rnd.hand_out("0")
    assert rnd.state_of("0") is S.TASKED and 29.0 < task.deadline_s <= 30.0  # what is left of the round
    rnd.downloaded("0", 100)
    rnd.downloaded("0", 50, finished=True)
    rec = rnd.record.devices["0"]
    assert rec.bytes_down == 150 and rec.download_done_at >= rec.task_sent_at >= 0
    payload = _upload(rnd, "0")
    buf = rnd.begin_upload("0", task.task_id, len(payload))
    assert len(buf) == len(payload) and rnd.state_of("0") is S.UPLOADING and rnd.uploading == {"0"}
    n = engine.partition_sizes[0]
    rnd.accept("0", rnd.check("0", payload, n), n, 0.5, PhaseTimes(1, 2, 3, 4), 999)
    assert rnd.state_of("0") is S.ACCEPTED and rnd.done == {"0"} and rnd.agg.count == 1
    assert (rec.status, rec.bytes_up, rec.train_s) == ("completed", 999, 2)
    rnd.close()
    assert rnd.state_of("1") is S.DROPPED and rnd.record.devices["1"].status == "dropped"
    assert not rnd.open


def test_refusals_at_upload_each_with_its_code(engine):
    rnd = _open(engine)
    t0 = rnd.hand_out("0")
    with pytest.raises(UpdateRejected, match="was not sampled") as e:
        rnd.begin_upload("7", t0.task_id, 10)
    assert e.value.code is Refusal.PRECONDITION
    with pytest.raises(UpdateRejected, match="task id") as e:
        rnd.begin_upload("1", t0.task_id, 10)  # another device's id
    assert e.value.code is Refusal.PRECONDITION
    rnd.begin_upload("0", t0.task_id, 10)
    with pytest.raises(UpdateRejected, match="in progress") as e:
        rnd.begin_upload("0", t0.task_id, 10)
    assert e.value.code is Refusal.EXISTS
    assert not rnd.can_hand_out("0")  # no second task while its upload is under way
    rnd.reject("0", "payload: bad magic", 10)
    assert rnd.state_of("0") is S.REJECTED and rnd.record.devices["0"].status == "rejected"
    t1 = rnd.hand_out("0")  # a refused device may fetch its task again
    _deliver(engine, rnd, "0", t1.task_id)
    with pytest.raises(UpdateRejected, match="already uploaded") as e:
        rnd.begin_upload("0", t1.task_id, 10)
    assert e.value.code is Refusal.EXISTS
    with pytest.raises(UpdateRejected, match="bad magic|payload") as e:
        rnd.check("1", b"not a codec bundle", engine.partition_sizes[1])
    assert e.value.code is Refusal.INVALID


def test_a_broken_off_upload_resumes_from_the_bytes_held(engine):
    rnd = _open(engine)
    t = rnd.hand_out("1")
    payload = _upload(rnd, "1")
    buf = rnd.begin_upload("1", t.task_id, len(payload))
    buf[:100] = payload[:100]
    rnd.upload_broke("1", t.task_id, buf, 100, 120)
    assert rnd.state_of("1") is S.BROKEN_OFF and rnd.held_bytes("1", t.task_id) == 100
    assert rnd.held_bytes("1", "other-task") == 0
    with pytest.raises(UpdateRejected, match="server holds 100 bytes"):
        rnd.begin_upload("1", t.task_id, len(payload), offset=60)
    assert rnd.held_bytes("1", t.task_id) == 100  # a wrong offset loses nothing
    again = rnd.begin_upload("1", t.task_id, len(payload), offset=100)
    assert again is buf
    again[100:] = payload[100:]
    n = engine.partition_sizes[1]
    rnd.accept("1", rnd.check("1", bytes(again), n), n, 0.1, PhaseTimes(), len(payload))
    assert rnd.record.devices["1"].bytes_up == 120 + len(payload)


def test_tasks_per_round_are_bounded(engine):
    rnd = _open(engine)
    for _ in range(MAX_TASKS_PER_ROUND):
        rnd.hand_out("2")
    assert not rnd.can_hand_out("2")
    with pytest.raises(IllegalTransition, match="may not be given a task"):
        rnd.hand_out("2")
    assert not rnd.can_hand_out("9")  # never sampled


def test_over_selection_closes_at_k_and_the_rest_are_late(engine):
    rnd = _open(engine, target=1)
    t0, t1 = rnd.hand_out("0"), rnd.hand_out("1")
    payload = _upload(rnd, "1")
    rnd.begin_upload("1", t1.task_id, len(payload))  # under way when the K-th update lands
    _deliver(engine, rnd, "0", t0.task_id)
    assert rnd.full and not rnd.can_hand_out("2")
    with pytest.raises(UpdateRejected, match="over-selection") as e:
        rnd.begin_upload("2", "x", 10)
    assert e.value.code is Refusal.PRECONDITION
    n = engine.partition_sizes[1]
    with pytest.raises(UpdateRejected, match="over-selection"):  # the upload under way is refused at its end
        rnd.accept("1", rnd.check("1", payload, n), n, 0.1, PhaseTimes(), len(payload))
    assert rnd.state_of("1") is S.REJECTED and rnd.agg.count == 1
    rnd.close()
    assert rnd.state_of("2") is S.LATE and rnd.record.devices["2"].status == "late"
    assert rnd.record.devices["1"].status == "rejected"


def test_closed_round_refuses_everything_and_drop_is_final(engine):
    rnd = _open(engine)
    t = rnd.hand_out("0")
    rnd.drop("1", "could not decode the download")
    assert rnd.state_of("1") is S.DROPPED and rnd.record.devices["1"].error.startswith("could not")
    assert not rnd.can_hand_out("1")
    with pytest.raises(IllegalTransition, match="from dropped to tasked"):
        rnd._move("1", S.TASKED)
    rnd.close()
    assert not rnd.can_hand_out("0")
    with pytest.raises(UpdateRejected, match="has closed"):
        rnd.begin_upload("0", t.task_id, 10)
    with pytest.raises(IllegalTransition, match="from dropped to rejected"):
        rnd.reject("0", "late", 0)
    rnd.close()  # closing twice changes nothing
    assert rnd.state_of("0") is S.DROPPED


def test_every_illegal_move_is_refused(engine):
    from edgelora.server.engine import _MOVES

    for start, allowed in _MOVES.items():
        for to in DeviceState:
            rnd = _open(engine)
            rnd._state["0"] = start
            if to in allowed:
                rnd._move("0", to)
                assert rnd.state_of("0") is to
            else:
                with pytest.raises(IllegalTransition):
                    rnd._move("0", to)
    assert _MOVES[S.ACCEPTED] == _MOVES[S.DROPPED] == _MOVES[S.LATE] == frozenset()


_ROUND_FIELDS = {"record", "devices", "plans", "sampled", "target", "agg", "number", "state", "rng_state"}


def _writes_to_a_round(tree: ast.AST) -> list[str]:
    """Assignments whose target reaches into a Round (rnd.x = ..., r.record.devices[d].y = ..., r._z...)."""
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and \
                        sub.value.id in ("r", "rnd", "round_") and (sub.attr in _ROUND_FIELDS or sub.attr.startswith("_")):
                    found.append(f"line {node.lineno}: {ast.unparse(t)}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in ("r", "rnd") and node.attr.startswith("_"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_driver_writes_round_fields():
    """Round (server/engine.py) is the one owner of a round's fields: no other module of the project, the round
    driver, the servicer, the simulator and the experiments included, assigns to them."""
    modules = [p for folder in ("edgelora", "server", "edge_client", "protos") for p in (REPO / folder).rglob("*.py")
               if p != REPO / "server" / "engine.py" and "_pb2" not in p.name]
    assert len(modules) > 40
    offenders = {str(p.relative_to(REPO)): w for p in modules if (w := _writes_to_a_round(ast.parse(p.read_text())))}
    assert offenders == {}
    # the check sees such a write
    assert _writes_to_a_round(ast.parse("r.record.devices[d].bytes_down += 3\nrnd._done.add(d)"))


def test_protobuf_stays_in_protos_server_and_edge_client():
    """Domain code (edgelora/, the simulator and the Ray backend included) goes through protos.serde."""
    offenders = [f"{p.relative_to(REPO)}: {line.strip()}" for p in (REPO / "edgelora").rglob("*.py")
                 for line in p.read_text().splitlines() if "import" in line and "_pb2" in line]
    assert offenders == []
    assert [l for l in ["from .protos import edgelora_pb2 as pb"] if "import" in l and "_pb2" in l]  # it would see one


def test_the_registry_counts_and_looks_up_live_devices_as_it_lists_them():
    """On an injected clock, timeout 10 s: devices 0 and 1 register at t = 0, 2 at t = 5; at t = 12 only 2 is
    live. live(), live_count() and is_live() agree (the coordinator counts and looks up without listing)."""
    from edgelora.server.registry import DeviceRegistry

    now = [0.0]
    reg = DeviceRegistry(10.0, clock=lambda: now[0])
    reg.register("0", "test", {})
    reg.register("1", "test", {})
    now[0] = 5.0
    reg.register("2", "test", {})
    assert reg.live() == ["0", "1", "2"] and reg.live_count() == 3
    now[0] = 12.0
    assert reg.live() == ["2"] and reg.live_count() == 1
    assert [reg.is_live(d) for d in ("0", "1", "2", "unknown")] == [False, False, True, False]
    reg.touch("0")
    assert reg.live() == ["0", "2"] and reg.live_count() == 2 and reg.is_live("0")
    # live() keeps the registry's order between calls: registrations after it (out of order, and a known id
    # registering again, a new entry) are in the next list, in device_sort_key order, with their own times
    now[0] = 15.5
    reg.register("10", "test", {})
    reg.register("9", "test", {})
    assert reg.live() == ["0", "9", "10"]  # 2 (t = 5) timed out
    now[0] = 23.0
    assert reg.live() == ["9", "10"]  # 0 (touched at t = 12) timed out
    reg.register("0", "test", {})
    assert reg.live() == ["0", "9", "10"] == reg.live() and reg.live_count() == 3


def test_the_scale_benchmark_runs_a_round_through_the_driver(tmp_path):
    """benchmarks.scale_round at 2,000 registered devices, 40 sampled: one real round of the driver over its
    simulated transport, every sampled upload accepted, every figure present."""
    import json

    from benchmarks.scale_round import main

    out = tmp_path / "scale.json"
    assert main(["--registered", "2000", "--sampled", "40", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["registered"] == 2000 and rec["sampled"] == 40
    assert all(rec[k] >= 0 for k in ("register_s", "live_s", "open_s", "hand_out_s", "upload_s", "close_s"))
