import subprocess
import sys

from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import serde
from edgelora.tasks import LoraSpec, Stage, Structure, StructureKind, Task, TrainSpec, UploadFormat, UploadRule


def test_generated_modules_match_the_proto():
    r = subprocess.run([sys.executable, "-m", "edgelora.protos.generate", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_task_round_trips_through_protobuf():
    task = Task(round=7, stage=Stage.SPARSE, method="slora",
                structure=Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=4, alpha=8.0,
                                    target_modules=("query",), rank_pattern=(("pooler.dense", 18),)),
                                    mask_density=0.1, mask_seed=42),
                train=TrainSpec(local_epochs=2, batch_size=8, lr=0.01, optimizer="sgd", seed=3),
                upload=UploadRule(format=UploadFormat.TOPK, density=0.0625, error_feedback=True, value_type="float16"),
                deadline_s=30.0)
    wire = serde.task_to_proto(task, 123).SerializeToString()
    assert serde.task_from_proto(pb.TaskHeader.FromString(wire)) == task


def test_chunks_never_exceed_the_chunk_size():
    payload = bytes(range(256)) * 40_000  # 10 MB
    msgs = list(serde.chunks(pb.UpdateHeader(device_id="1"), pb.UpdateChunk, payload, 4 << 20))
    assert msgs[0].WhichOneof("part") == "header"
    assert all(len(m.data) <= 4 << 20 for m in msgs[1:])
    assert all(m.ByteSize() <= (4 << 20) + 16 for m in msgs)
    assert b"".join(m.data for m in msgs[1:]) == payload


def test_every_data_field_reaches_the_device():
    """A device derives its partition from the DataSpec alone: a field left off the wire (the validation
    carve, the class order) would make it train on other examples than the server counts."""
    import dataclasses

    from edgelora.config import DataConfig

    cfg = DataConfig(dataset="jsonl", data_home="/h", path="/d.jsonl", test_path="/t.jsonl", test_fraction=0.3,
                     text_column="t", label_column="y", label_names=["b", "a"], remove=["quotes"],
                     text_columns=["t", "u"], column_names=["y", "t", "u"], json_field="train",
                     partition="pathological", alpha=0.7, classes_per_device=3, num_devices=9, seed=5,
                     max_examples_per_device=11, test_max_examples=500, validation_examples=13)
    back = serde.data_from_proto(pb.DataSpec.FromString(serde.data_to_proto(cfg).SerializeToString()))
    server_only = {"test_max_examples"}  # the server's evaluation subsample
    for f in dataclasses.fields(DataConfig):
        if f.name not in server_only:
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name
