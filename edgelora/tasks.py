"""Domain types that cross the wire. protos/serde.py converts them to and from protobuf; nothing else
touches *_pb2 types."""
from __future__ import annotations

import enum
import re
import zlib
from dataclasses import dataclass, field

from .secagg.messages import MaskingInput
from .secagg.ring import RingSpec


class Stage(enum.IntEnum):
    DENSE = 1    # ordinary federated training of the method's trainable weights
    SPARSE = 2   # SLoRA/FLoRA Stage 1: sparse (masked) fine-tuning
    LORA = 3     # SLoRA/FLoRA Stage 2: LoRA from the primed start


class StructureKind(enum.IntEnum):
    FULL = 1
    LORA = 2
    BITFIT = 3
    ADAPTER = 4


class UploadFormat(enum.IntEnum):
    DENSE = 1    # every trainable value of the delta
    MASKED = 2   # values at the structure's mask only
    TOPK = 3     # global top-k of |delta| over every trainable tensor


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ("classifier",)
    rank_pattern: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    kind: str = "houlsby"
    bottleneck: int = 64


@dataclass(frozen=True)
class Structure:
    """Which weights a device trains and how the model around them is built."""
    kind: StructureKind = StructureKind.FULL
    lora: LoraSpec | None = None
    adapter: AdapterSpec | None = None
    mask_density: float = 0.0      # 0 = no mask
    mask_seed: int = 0
    dense_patterns: tuple[str, ...] = ("classifier",)  # train densely even under a mask


@dataclass(frozen=True)
class TrainSpec:
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int = 0
    seed: int = 0
    precision: str = "fp32"    # "auto" | "fp32" | "bf16" (edgelora.training.resolve_precision)
    gradient_checkpointing: bool = False
    micro_batch_size: int = 0  # 0: each batch in one pass; else in passes of this many examples, gradients summed
    loss_chunk_tokens: int = 0  # causal-lm: 0: the model's own loss over full logits; else chunked_lm_loss
    base: str = "fp32"          # the frozen base under LoRA: fp32, bf16, nf4, int8 (edgelora.frozen_base)


class Coordinates(str, enum.Enum):
    """Where a secure round's shared upload coordinates come from: derived on both sides (no index travels), or,
    for aggregate-topk, chosen by the coordinator from the last sum it unmasked and sent down with the task."""
    ALL = "all"                      # every trainable entry (dense methods)
    MASK = "mask"                    # the structure's seeded mask (SFT, SLoRA Stage 1), dense tensors whole
    RANDOM_K = "random-k"            # a seeded random set at `density`, fresh every round (FLASC)
    DOWNLOAD_TOPK = "download-topk"  # the largest-magnitude entries of the round's download, at `density` (FLASC)
    AGGREGATE_TOPK = "aggregate-topk"  # the last aggregate's largest entries, topped up at random (FLASC)


@dataclass(frozen=True)
class SecureUpload:
    """A secure round's upload (secure aggregation): the delta at the round's shared coordinates, as integers
    in the ring the coordinator announced, masked; the codec's ring payload carries them."""
    coordinates: Coordinates
    ring: RingSpec
    density: float = 1.0
    seed: int = 0
    indices: bytes = b""   # aggregate-topk: the round's coordinate set, as codec bytes (coordinates.encode_sets)


@dataclass(frozen=True)
class UploadRule:
    format: UploadFormat = UploadFormat.DENSE
    density: float = 1.0
    error_feedback: bool = False
    value_type: str = "float32"
    rounding: str = "nearest"      # codec rounding of the int value types: "nearest" | "stochastic"
    secure: SecureUpload | None = None  # set: a secure round's masked ring upload replaces the bundle


@dataclass(frozen=True)
class Task:
    round: int
    stage: Stage
    method: str
    structure: Structure
    train: TrainSpec
    upload: UploadRule
    deadline_s: float = 0.0
    task_id: str = ""          # single-use id of this hand-out (edgelora.server.engine.Round.hand_out)
    evaluate: bool = False     # federated evaluation: score the downloaded model on the device's held-out data
    masking: MaskingInput | None = None  # a secure round: whom to mask toward and the shares sealed to the device


@dataclass(frozen=True)
class DeviceInfo:
    """What the server knows of a device when a method plans its task (Flower's ClientProxy): its tier
    (given by the device, or assigned by the server), and the link rates measured in its earlier rounds."""
    device_id: str
    tier: int | None = None          # None: the device gave none (a method may assign one)
    uplink_bps: float = 0.0          # measured on its last accepted upload (0: not yet measured)
    downlink_bps: float = 0.0        # measured on its last download (0: not yet measured)
    declared_uplink_bps: float = 0.0    # what the device says its links are (0: it said nothing)
    declared_downlink_bps: float = 0.0
    up_bytes_per_entry: float = 0.0     # wire bytes per sent entry of its last sparse upload (0: unknown)
    down_bytes_per_entry: float = 0.0   # the same for its last sparse download
    memory_mb: float = 0.0              # the memory it may use, declared at Register (0: none declared)
    resident_mb: float = 0.0            # what it held at Register: its base loaded, one training pass run


@dataclass(frozen=True)
class PhaseTimes:
    download_s: float = 0.0
    train_s: float = 0.0
    encode_s: float = 0.0
    upload_s: float = 0.0


@dataclass
class Update:
    """What a device sends back: codec bytes of its delta, plus bookkeeping."""
    device_id: str
    round: int
    num_examples: int
    payload: bytes
    train_loss: float = float("nan")
    times: PhaseTimes = field(default_factory=PhaseTimes)
    task_id: str = ""          # the task this update answers
    eval_examples: int = 0     # federated evaluation of the downloaded model (0 = none)
    eval_loss: float = 0.0
    eval_accuracy: float = 0.0
    peak_rss_mb: float = 0.0   # the device process's peak resident memory so far (0: not reported)


# -- device ids -------------------------------------------------------------------------------------------------
def is_device_id(device_id: str) -> bool:
    """Canonical partition indices only ("0", "17"; not "017" or non-ASCII digits), so one partition has one id."""
    return re.fullmatch(r"0|[1-9][0-9]{0,8}", device_id) is not None


NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_device_name(device_id: str) -> bool:
    """Device ids of a run on the devices' own data (data.mode = own): names, bound to tokens or mTLS."""
    return NAME.fullmatch(device_id) is not None


def device_seed(device_id: str) -> int:
    """A stable integer per device for seeding: the partition index, or a hash of a name."""
    return int(device_id) if is_device_id(device_id) else zlib.crc32(device_id.encode())


def device_index(device_id: str) -> int:
    """Device ids are partition indices ("0".."N-1"): the id alone says which slice of the data it holds."""
    if not is_device_id(device_id):
        raise ValueError(f"device id {device_id!r} is not a partition index like 0, 1, 17")
    return int(device_id)
