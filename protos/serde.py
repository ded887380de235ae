"""Domain types <-> protobuf, in matched x_to_proto / x_from_proto pairs (Flower's serde). Domain code never
touches *_pb2 types; this is the only module that knows both."""
from __future__ import annotations

import functools

from edgelora.schema import DataConfig, ModelConfig
from edgelora.secagg import messages as sa
from edgelora.secagg.ring import RingSpec
from edgelora.task_types import task_type
from edgelora.tasks import (
    AdapterSpec,
    Coordinates,
    LoraSpec,
    PhaseTimes,
    SecureUpload,
    Stage,
    Structure,
    StructureKind,
    Task,
    TrainSpec,
    Update,
    UploadFormat,
    UploadRule,
)

from . import edgelora_pb2 as pb


def model_to_proto(m: ModelConfig) -> pb.ModelSpec:
    return pb.ModelSpec(name=m.name, num_labels=m.num_labels, max_seq_len=m.max_seq_len, head_seed=m.head_seed,
                        task=m.task, train_embeddings=m.train_embeddings)


def model_from_proto(p: pb.ModelSpec) -> ModelConfig:
    """The run's model, refused by name when this device does not know its task type."""
    task = p.task or "classification"
    task_type(task)
    return ModelConfig(name=p.name, num_labels=p.num_labels, max_seq_len=p.max_seq_len, head_seed=p.head_seed,
                       task=task, train_embeddings=p.train_embeddings)


def data_to_proto(d: DataConfig) -> pb.DataSpec:
    return pb.DataSpec(dataset=d.dataset, data_home=d.data_home, path=d.path, text_column=d.text_column,
                       label_column=d.label_column, remove=list(d.remove), partition=d.partition, alpha=d.alpha,
                       classes_per_device=d.classes_per_device, num_devices=d.num_devices, seed=d.seed,
                       max_examples_per_device=d.max_examples_per_device, test_path=d.test_path,
                       test_fraction=d.test_fraction, validation_examples=d.validation_examples,
                       label_names=list(d.label_names), text_columns=list(d.text_columns),
                       column_names=list(d.column_names), json_field=d.json_field, mode=d.mode,
                       prompt_column=d.prompt_column, response_column=d.response_column,
                       messages_column=d.messages_column, partition_columns=list(d.group_columns),
                       min_partition_examples=d.min_partition_examples)


def data_from_proto(p: pb.DataSpec) -> DataConfig:
    cfg = DataConfig(dataset=p.dataset, data_home=p.data_home, path=p.path, text_column=p.text_column,
                     label_column=p.label_column, remove=list(p.remove), partition=p.partition, alpha=p.alpha,
                     classes_per_device=p.classes_per_device, num_devices=p.num_devices, seed=p.seed,
                     max_examples_per_device=p.max_examples_per_device, test_path=p.test_path,
                     test_fraction=p.test_fraction, validation_examples=p.validation_examples,
                     label_names=list(p.label_names), text_columns=list(p.text_columns),
                     column_names=list(p.column_names), json_field=p.json_field, mode=p.mode or "partitions",
                     prompt_column=p.prompt_column, response_column=p.response_column,
                     messages_column=p.messages_column, partition_columns=list(p.partition_columns),
                     min_partition_examples=p.min_partition_examples or 1)
    cfg.validate()
    return cfg


def lora_to_proto(s: LoraSpec) -> pb.LoraSpec:
    return pb.LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout, target_modules=list(s.target_modules),
                       modules_to_save=list(s.modules_to_save), rank_pattern=dict(s.rank_pattern))


def lora_from_proto(p: pb.LoraSpec) -> LoraSpec:
    return LoraSpec(rank=p.rank, alpha=p.alpha, dropout=p.dropout, target_modules=tuple(p.target_modules),
                    modules_to_save=tuple(p.modules_to_save), rank_pattern=tuple(sorted(p.rank_pattern.items())))


def structure_to_proto(s: Structure) -> pb.Structure:
    p = pb.Structure(kind=int(s.kind), mask_density=s.mask_density, mask_seed=s.mask_seed,
                     dense_patterns=list(s.dense_patterns))
    if s.lora is not None:
        p.lora.CopyFrom(lora_to_proto(s.lora))
    if s.adapter is not None:
        p.adapter.CopyFrom(pb.AdapterSpec(kind=s.adapter.kind, bottleneck=s.adapter.bottleneck))
    return p


def structure_from_proto(p: pb.Structure) -> Structure:
    return Structure(kind=StructureKind(p.kind), lora=lora_from_proto(p.lora) if p.HasField("lora") else None,
                     adapter=AdapterSpec(p.adapter.kind, p.adapter.bottleneck) if p.HasField("adapter") else None,
                     mask_density=p.mask_density, mask_seed=p.mask_seed, dense_patterns=tuple(p.dense_patterns))


def train_to_proto(t: TrainSpec) -> pb.TrainSpec:
    return pb.TrainSpec(local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                        momentum=t.momentum, weight_decay=t.weight_decay, max_steps=t.max_steps, seed=t.seed,
                        precision=t.precision, gradient_checkpointing=t.gradient_checkpointing,
                        micro_batch_size=t.micro_batch_size, loss_chunk_tokens=t.loss_chunk_tokens,
                        base=t.base)


def train_from_proto(p: pb.TrainSpec) -> TrainSpec:
    return TrainSpec(local_epochs=p.local_epochs, batch_size=p.batch_size, lr=p.lr, optimizer=p.optimizer,
                     momentum=p.momentum, weight_decay=p.weight_decay, max_steps=p.max_steps, seed=p.seed,
                     precision=p.precision or "fp32", gradient_checkpointing=p.gradient_checkpointing,
                     micro_batch_size=p.micro_batch_size, loss_chunk_tokens=p.loss_chunk_tokens,
                     base=p.base or "fp32")


def secure_upload_to_proto(s: SecureUpload) -> pb.SecureUpload:
    r = s.ring
    return pb.SecureUpload(coordinates=s.coordinates.value, density=s.density, seed=s.seed, bits=r.bits,
                           value_bits=r.value_bits, clip=r.clip, l2_clip=r.l2_clip, weight_cap=r.weight_cap,
                           count_limbs=r.count_limbs, noise_stddev=r.noise_stddev, indices=s.indices)


def secure_upload_from_proto(p: pb.SecureUpload) -> SecureUpload:
    try:
        coordinates = Coordinates(p.coordinates)
    except ValueError:
        raise ValueError(f"secure upload: unknown coordinates {p.coordinates!r}; allowed: "
                         f"{[c.value for c in Coordinates]}") from None
    ring = RingSpec(bits=p.bits, value_bits=p.value_bits, clip=p.clip, l2_clip=p.l2_clip, weight_cap=p.weight_cap,
                    count_limbs=p.count_limbs, noise_stddev=p.noise_stddev)
    return SecureUpload(coordinates, ring, density=p.density, seed=p.seed, indices=p.indices)


def upload_to_proto(u: UploadRule) -> pb.UploadRule:
    p = pb.UploadRule(format=int(u.format), density=u.density, error_feedback=u.error_feedback,
                      value_type=u.value_type, rounding=u.rounding)
    if u.secure is not None:
        p.secure.CopyFrom(secure_upload_to_proto(u.secure))
    return p


def upload_from_proto(p: pb.UploadRule) -> UploadRule:
    return UploadRule(format=UploadFormat(p.format), density=p.density, error_feedback=p.error_feedback,
                      value_type=p.value_type, rounding=p.rounding or "nearest",
                      secure=secure_upload_from_proto(p.secure) if p.HasField("secure") else None)


def task_to_proto(t: Task, payload_bytes: int) -> pb.TaskHeader:
    p = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=t.round, stage=int(t.stage), method=t.method,
                      structure=structure_to_proto(t.structure), train=train_to_proto(t.train),
                      upload=upload_to_proto(t.upload), payload_bytes=payload_bytes, deadline_s=t.deadline_s,
                      task_id=t.task_id, evaluate=t.evaluate)
    if t.masking is not None:
        p.masking.CopyFrom(pb.SecAggMaskingInput(shared=list(t.masking.shared), incoming=dict(t.masking.incoming)))
    return p


def task_from_proto(p: pb.TaskHeader) -> Task:
    masking = sa.MaskingInput(tuple(p.masking.shared), dict(p.masking.incoming)) if p.HasField("masking") else None
    return Task(round=p.round, stage=Stage(p.stage), method=p.method, structure=structure_from_proto(p.structure),
                train=train_from_proto(p.train), upload=upload_from_proto(p.upload), deadline_s=p.deadline_s,
                task_id=p.task_id, evaluate=p.evaluate, masking=masking)


# -- secure aggregation's key phases: the prompt FetchTask carries, the device's answer ----------------------------
def prompt_to_proto(round_id: int, prompt: "sa.Setup | sa.PeerKeys | sa.UnmaskRequest") -> pb.TaskHeader:
    p = pb.TaskHeader(kind=pb.TaskHeader.SECAGG, round=round_id)
    if isinstance(prompt, sa.Setup):
        p.secagg.advertise.CopyFrom(pb.SecAggSetup(
            round=prompt.round, session=prompt.session, devices=list(prompt.devices), neighbours=prompt.neighbours,
            threshold=prompt.threshold, graph_seed=prompt.graph_seed, bits=prompt.bits, length=prompt.length))
    elif isinstance(prompt, sa.PeerKeys):
        for d, (c, s) in prompt.keys.items():
            p.secagg.share.keys[d].CopyFrom(pb.SecAggKeys(c_public=c, s_public=s))
    else:
        p.secagg.unmask.CopyFrom(pb.SecAggUnmaskRequest(survivors=list(prompt.survivors), dropped=list(prompt.dropped)))
    return p


def prompt_over_the_wire(round_id: int, prompt) -> tuple[bytes, int]:
    """(the prompt's TaskHeader bytes, the wire bytes of FetchTask's one message carrying it)."""
    header = prompt_to_proto(round_id, prompt)
    return header.SerializeToString(), pb.TaskChunk(header=header).ByteSize()


def prompt_from_proto(p: pb.TaskHeader) -> "sa.Setup | sa.PeerKeys | sa.UnmaskRequest":
    which = p.secagg.WhichOneof("phase")
    if which == "advertise":
        s = p.secagg.advertise
        return sa.Setup(round=s.round, session=s.session, devices=tuple(s.devices), neighbours=s.neighbours,
                        threshold=s.threshold, graph_seed=s.graph_seed, bits=s.bits, length=s.length)
    if which == "share":
        return sa.PeerKeys({d: (k.c_public, k.s_public) for d, k in p.secagg.share.keys.items()})
    if which == "unmask":
        u = p.secagg.unmask
        return sa.UnmaskRequest(tuple(u.survivors), tuple(u.dropped))
    raise ValueError("secure-aggregation prompt carries no phase")


def advertise_to_proto(round_id: int, m: "sa.Advertise") -> pb.AdvertiseKeysRequest:
    return pb.AdvertiseKeysRequest(device_id=m.device, round=round_id, session=m.session,
                                   keys=pb.SecAggKeys(c_public=m.c_public, s_public=m.s_public))


def advertise_from_proto(p: pb.AdvertiseKeysRequest) -> "sa.Advertise":
    return sa.Advertise(p.device_id, p.session, p.keys.c_public, p.keys.s_public)


def share_to_proto(round_id: int, m: "sa.ShareOut") -> pb.ShareKeysRequest:
    return pb.ShareKeysRequest(device_id=m.device, round=round_id, session=m.session, ciphertexts=dict(m.ciphertexts))


def share_from_proto(p: pb.ShareKeysRequest) -> "sa.ShareOut":
    return sa.ShareOut(p.device_id, p.session, dict(p.ciphertexts))


def unmask_to_proto(round_id: int, m: "sa.UnmaskReply") -> pb.UnmaskSharesRequest:
    return pb.UnmaskSharesRequest(
        device_id=m.device, round=round_id, session=m.session, failed=list(m.failed),
        self_shares={d: pb.SecAggShare(x=x, share=b) for d, (x, b) in m.self_shares.items()},
        key_shares={d: pb.SecAggShare(x=x, share=b) for d, (x, b) in m.key_shares.items()})


def unmask_from_proto(p: pb.UnmaskSharesRequest) -> "sa.UnmaskReply":
    return sa.UnmaskReply(p.device_id, p.session, {d: (s.x, s.share) for d, s in p.self_shares.items()},
                          {d: (s.x, s.share) for d, s in p.key_shares.items()}, tuple(p.failed))


_ANSWERS = {sa.Setup: (pb.AdvertiseKeysRequest, advertise_from_proto),
            sa.PeerKeys: (pb.ShareKeysRequest, share_from_proto),
            sa.UnmaskRequest: (pb.UnmaskSharesRequest, unmask_from_proto)}


def answer_from_bytes(prompt, data: bytes) -> tuple:
    """(the domain message a device's answer to `prompt` carries, its wire bytes): the simulator's side of the
    AdvertiseKeys / ShareKeys / UnmaskShares RPCs."""
    cls, from_proto = _ANSWERS[type(prompt)]
    msg = cls.FromString(data)
    return from_proto(msg), msg.ByteSize()


def times_to_proto(t: PhaseTimes) -> pb.PhaseTimes:
    return pb.PhaseTimes(download_s=t.download_s, train_s=t.train_s, encode_s=t.encode_s, upload_s=t.upload_s)


def times_from_proto(p: pb.PhaseTimes) -> PhaseTimes:
    return PhaseTimes(download_s=p.download_s, train_s=p.train_s, encode_s=p.encode_s, upload_s=p.upload_s)


def update_header_to_proto(u: Update) -> pb.UpdateHeader:
    """The header of an upload stream. upload_s is left out: the server measures it."""
    t = u.times
    return pb.UpdateHeader(device_id=u.device_id, round=u.round, num_examples=u.num_examples,
                           payload_bytes=len(u.payload), train_loss=u.train_loss,
                           times=times_to_proto(PhaseTimes(t.download_s, t.train_s, t.encode_s)), task_id=u.task_id,
                           eval_examples=u.eval_examples, eval_loss=u.eval_loss, eval_accuracy=u.eval_accuracy,
                           peak_rss_mb=u.peak_rss_mb)


def chunks(header_msg, chunk_cls, payload: bytes, chunk_bytes: int):
    """A header message, then the payload in pieces of at most chunk_bytes (no gRPC message over 4 MiB)."""
    yield chunk_cls(header=header_msg)
    view = memoryview(payload)
    for start in range(0, len(payload), chunk_bytes):
        yield chunk_cls(data=bytes(view[start:start + chunk_bytes]))


def update_from_proto(h: pb.UpdateHeader, payload: bytes) -> Update:
    return Update(device_id=h.device_id, round=h.round, num_examples=h.num_examples, payload=payload,
                  train_loss=h.train_loss, times=times_from_proto(h.times), task_id=h.task_id,
                  eval_examples=h.eval_examples, eval_loss=h.eval_loss, eval_accuracy=h.eval_accuracy,
                  peak_rss_mb=h.peak_rss_mb)


def task_from_bytes(data: bytes) -> Task:
    return task_from_proto(pb.TaskHeader.FromString(data))


def update_header_to_bytes(update: Update) -> bytes:
    return update_header_to_proto(update).SerializeToString()


@functools.lru_cache(maxsize=64)
def _data_chunk_size(chunk_cls, n: int) -> int:
    return chunk_cls(data=bytes(n)).ByteSize()


def _stream_bytes(header_msg, chunk_cls, payload_bytes: int, chunk_bytes: int) -> int:
    """Wire bytes of the stream `chunks` sends (the sum of each message's ByteSize()), without building it."""
    full, rest = divmod(payload_bytes, chunk_bytes)
    wire = chunk_cls(header=header_msg).ByteSize() + full * _data_chunk_size(chunk_cls, chunk_bytes)
    return wire + (_data_chunk_size(chunk_cls, rest) if rest else 0)


def task_over_the_wire(task: Task, payload_bytes: int, chunk_bytes: int) -> tuple[bytes, int]:
    """(the task header as FetchTask's first message carries it, the wire bytes of FetchTask's whole stream of it
    and a payload of payload_bytes): a simulation counts the transfer it does not make. One header message."""
    msg = task_to_proto(task, payload_bytes)
    return msg.SerializeToString(), _stream_bytes(msg, pb.TaskChunk, payload_bytes, chunk_bytes)


def update_over_the_wire(header: bytes, payload: bytes, chunk_bytes: int) -> tuple[Update, int]:
    """(the update a SubmitUpdate stream of this header (update_header_to_bytes) and payload delivers, the wire
    bytes of that stream), the header parsed once."""
    msg = pb.UpdateHeader.FromString(header)
    return update_from_proto(msg, payload), _stream_bytes(msg, pb.UpdateChunk, len(payload), chunk_bytes)
