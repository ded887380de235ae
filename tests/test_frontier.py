"""The communication frontier's arithmetic: Flower's float32 bytes (edgelora.experiments.flower), MB to a target with
smoothing, and the report's frontier table, plot and benchmark on a hand-made sweep folder."""
import json
import math

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from edgelora.experiments import flower

from .conftest import tiny_raw


def flower_parameters_class():
    """Flower's `Parameters` message (flwr/proto/transport.proto), rebuilt here: Flower is not a dependency."""
    f = descriptor_pb2.FileDescriptorProto(name="flwr_transport_test.proto", package="flwr_test", syntax="proto3")
    m = f.message_type.add(name="Parameters")
    m.field.add(name="tensors", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    m.field.add(name="tensor_type", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("flwr_test.Parameters"))


@pytest.mark.parametrize("shapes", [[(10, 384), (1536, 10), (41,)], [()], [(0,)], [(3, 4, 5), (70000,)],
                                    [(7,)] * 40])
def test_flower_formula_is_the_protobuf_size_of_its_npy_arrays(shapes):
    """The formula against protobuf itself: a Parameters message holding each array's numpy.save bytes."""
    import io

    def npy(shape):
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float32), allow_pickle=False)
        return buf.getvalue()

    msg = flower_parameters_class()(tensors=[npy(s) for s in shapes], tensor_type="numpy.ndarray")
    assert flower.parameters_bytes(shapes) == msg.ByteSize()
    assert all(flower.npy_bytes(s) == len(npy(s)) for s in shapes)


def test_flower_bytes_of_the_cpu_profile_lora_match_flwr_1_42():
    """74 arrays of MiniLM LoRA (r = 10 on q, k, v, attention output, intermediate, output; the 41-class head):
    flwr 1.42.0's parameters_to_proto(ndarrays_to_parameters(...)).ByteSize() was 1,731,742 (measured once,
    in a separate environment with flwr installed)."""
    modules = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
    shapes = [s for _ in range(6) for fan_in, fan_out in modules for s in ((10, fan_in), (fan_out, 10))]
    shapes += [(41, 384), (41,)]
    assert len(shapes) == 74 and sum(math.prod(s) for s in shapes) == 430_505
    assert flower.parameters_bytes(shapes) == 1_731_742


def _run(root, name, method, accs, bytes_per_device, config_text, seed=0, devices=2):
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config_text)
    rows = [{"round": i + 1, "accuracy": a, "bytes_up": devices * bytes_per_device,
             "bytes_down": devices * bytes_per_device, "seconds": 1.0,
             "devices": [{"device_id": str(d), "status": "completed", "bytes_down": bytes_per_device,
                          "bytes_up": bytes_per_device} for d in range(devices)]} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"run": name, "method": method, "partition": "p", "seed": seed, "mode": "federated"}


def test_frontier_records_smoothing_flower_and_ratio(tmp_path):
    """The reference's target is its last-3 mean; with smooth = 3 a run reaches it only when its own 3-round
    mean does (a lucky round does not count); Flower's MB follow the reference's rounds at Flower's size."""
    from benchmarks import frontier as bench
    from edgelora.config import load_config
    from edgelora.experiments.report import collect, frontier, write_report

    config = load_config(tiny_raw())
    text = config.to_toml()
    plan = [_run(tmp_path, "ref", "lora", [0.1, 0.2, 0.3, 0.4, 0.5], 1_000_000, text),  # target 0.4
            _run(tmp_path, "spiky", "flasc", [0.1, 0.6, 0.1, 0.4, 0.45], 100_000, text),  # 3-mean: 0.32 0.37 0.32
            _run(tmp_path, "steady", "flasc-4bit", [0.3, 0.4, 0.45, 0.5, 0.5], 50_000, text)]  # 3-mean 0.45 at round 4
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "sweep.toml").write_text('[partitions.p]\n[report]\nreference = "lora"\nsmooth = 3\n'
                                         'flower_baseline = true\n')
    rows = collect(tmp_path)
    per_model = flower.parameters_bytes(flower.run_shapes(tmp_path / "runs" / "ref").values())
    records = {r["run"]: r for r in frontier(rows, {"reference": "lora", "smooth": 3, "flower_baseline": True})}
    assert records["ref"]["target"] == pytest.approx(0.4)
    assert records["ref"]["mb_to_target"] == pytest.approx(20.0)  # 3-mean 0.4 at round 5: 5 x 4 MB
    assert records["spiky"]["mb_to_target"] is None and records["spiky"]["ratio"] is None
    assert records["steady"]["mb_to_target"] == pytest.approx(0.8)  # round 4: 4 x 0.2 MB
    assert records["steady"]["flower_mb_to_target"] == pytest.approx(5 * 4 * per_model / 1e6)
    assert records["steady"]["ratio"] == pytest.approx(5 * 4 * per_model / 1e6 / 0.8)
    unsmoothed = {r["run"]: r for r in frontier(rows, {"reference": "lora", "smooth": 1})}
    assert unsmoothed["spiky"]["mb_to_target"] == pytest.approx(0.8)  # 0.4 MB a round; round 2's 0.6 counts without smoothing
    assert "flower_mb_to_target" not in unsmoothed["spiky"]
    written = {p.name for p in write_report(tmp_path)}
    assert "frontier.png" in written
    md = (tmp_path / "summary.md").read_text()
    assert f"| steady | 0.4000 | 0.8 | 25.0x | {5 * 4 * per_model / 1e6:.1f} |" in md
    out = tmp_path / "frontier.json"
    assert bench.main([str(tmp_path), "--json", str(out)]) == 0
    saved = {r["run"]: r for r in json.loads(out.read_text())}
    assert {"run", "target", "mb_to_target", "flower_mb_to_target", "ratio", "final_accuracy"} <= set(saved["steady"])
    assert saved["steady"]["ratio"] == pytest.approx(records["steady"]["ratio"])
    assert saved["spiky"]["ratio"] is None and saved["steady"]["final_accuracy"] == 0.5
