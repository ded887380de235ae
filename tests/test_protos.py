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
