from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_DENSE: _ClassVar[Stage]
    STAGE_SPARSE: _ClassVar[Stage]
    STAGE_LORA: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_DENSE: Stage
STAGE_SPARSE: Stage
STAGE_LORA: Stage

class ModelSpec(_message.Message):
    __slots__ = ("name", "num_labels", "max_seq_len", "head_seed", "task", "train_embeddings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEED_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_labels: int
    max_seq_len: int
    head_seed: int
    task: str
    train_embeddings: bool
    def __init__(self, name: _Optional[str] = ..., num_labels: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., head_seed: _Optional[int] = ..., task: _Optional[str] = ..., train_embeddings: _Optional[bool] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("dataset", "data_home", "path", "text_column", "label_column", "remove", "partition", "alpha", "classes_per_device", "num_devices", "seed", "max_examples_per_device", "test_path", "test_fraction", "validation_examples", "label_names", "text_columns", "column_names", "json_field", "mode", "prompt_column", "response_column", "messages_column", "partition_columns", "min_partition_examples")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATA_HOME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TEXT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CLASSES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    TEST_PATH_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    TEXT_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    COLUMN_NAMES_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_COLUMN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_COLUMN_FIELD_NUMBER: _ClassVar[int]
    PARTITION_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTITION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    data_home: str
    path: str
    text_column: str
    label_column: str
    remove: _containers.RepeatedScalarFieldContainer[str]
    partition: str
    alpha: float
    classes_per_device: int
    num_devices: int
    seed: int
    max_examples_per_device: int
    test_path: str
    test_fraction: float
    validation_examples: int
    label_names: _containers.RepeatedScalarFieldContainer[str]
    text_columns: _containers.RepeatedScalarFieldContainer[str]
    column_names: _containers.RepeatedScalarFieldContainer[str]
    json_field: str
    mode: str
    prompt_column: str
    response_column: str
    messages_column: str
    partition_columns: _containers.RepeatedScalarFieldContainer[str]
    min_partition_examples: int
    def __init__(self, dataset: _Optional[str] = ..., data_home: _Optional[str] = ..., path: _Optional[str] = ..., text_column: _Optional[str] = ..., label_column: _Optional[str] = ..., remove: _Optional[_Iterable[str]] = ..., partition: _Optional[str] = ..., alpha: _Optional[float] = ..., classes_per_device: _Optional[int] = ..., num_devices: _Optional[int] = ..., seed: _Optional[int] = ..., max_examples_per_device: _Optional[int] = ..., test_path: _Optional[str] = ..., test_fraction: _Optional[float] = ..., validation_examples: _Optional[int] = ..., label_names: _Optional[_Iterable[str]] = ..., text_columns: _Optional[_Iterable[str]] = ..., column_names: _Optional[_Iterable[str]] = ..., json_field: _Optional[str] = ..., mode: _Optional[str] = ..., prompt_column: _Optional[str] = ..., response_column: _Optional[str] = ..., messages_column: _Optional[str] = ..., partition_columns: _Optional[_Iterable[str]] = ..., min_partition_examples: _Optional[int] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "modules_to_save", "rank_pattern")
    class RankPatternEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    RANK_PATTERN_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    rank_pattern: _containers.ScalarMap[str, int]
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., modules_to_save: _Optional[_Iterable[str]] = ..., rank_pattern: _Optional[_Mapping[str, int]] = ...) -> None: ...

class AdapterSpec(_message.Message):
    __slots__ = ("kind", "bottleneck")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    kind: str
    bottleneck: int
    def __init__(self, kind: _Optional[str] = ..., bottleneck: _Optional[int] = ...) -> None: ...

class Structure(_message.Message):
    __slots__ = ("kind", "lora", "adapter", "mask_density", "mask_seed", "dense_patterns")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Structure.Kind]
        FULL: _ClassVar[Structure.Kind]
        LORA: _ClassVar[Structure.Kind]
        BITFIT: _ClassVar[Structure.Kind]
        ADAPTER: _ClassVar[Structure.Kind]
    KIND_UNSPECIFIED: Structure.Kind
    FULL: Structure.Kind
    LORA: Structure.Kind
    BITFIT: Structure.Kind
    ADAPTER: Structure.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MASK_DENSITY_FIELD_NUMBER: _ClassVar[int]
    MASK_SEED_FIELD_NUMBER: _ClassVar[int]
    DENSE_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    kind: Structure.Kind
    lora: LoraSpec
    adapter: AdapterSpec
    mask_density: float
    mask_seed: int
    dense_patterns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[Structure.Kind, str]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., adapter: _Optional[_Union[AdapterSpec, _Mapping]] = ..., mask_density: _Optional[float] = ..., mask_seed: _Optional[int] = ..., dense_patterns: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "max_steps", "seed", "precision", "gradient_checkpointing", "micro_batch_size", "loss_chunk_tokens", "base")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSS_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    max_steps: int
    seed: int
    precision: str
    gradient_checkpointing: bool
    micro_batch_size: int
    loss_chunk_tokens: int
    base: str
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., optimizer: _Optional[str] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_steps: _Optional[int] = ..., seed: _Optional[int] = ..., precision: _Optional[str] = ..., gradient_checkpointing: _Optional[bool] = ..., micro_batch_size: _Optional[int] = ..., loss_chunk_tokens: _Optional[int] = ..., base: _Optional[str] = ...) -> None: ...

class UploadRule(_message.Message):
    __slots__ = ("format", "density", "error_feedback", "value_type", "rounding", "secure")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[UploadRule.Format]
        DENSE: _ClassVar[UploadRule.Format]
        MASKED: _ClassVar[UploadRule.Format]
        TOPK: _ClassVar[UploadRule.Format]
    FORMAT_UNSPECIFIED: UploadRule.Format
    DENSE: UploadRule.Format
    MASKED: UploadRule.Format
    TOPK: UploadRule.Format
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROUNDING_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    format: UploadRule.Format
    density: float
    error_feedback: bool
    value_type: str
    rounding: str
    secure: SecureUpload
    def __init__(self, format: _Optional[_Union[UploadRule.Format, str]] = ..., density: _Optional[float] = ..., error_feedback: _Optional[bool] = ..., value_type: _Optional[str] = ..., rounding: _Optional[str] = ..., secure: _Optional[_Union[SecureUpload, _Mapping]] = ...) -> None: ...

class SecureUpload(_message.Message):
    __slots__ = ("coordinates", "density", "seed", "bits", "value_bits", "clip", "l2_clip", "weight_cap", "count_limbs", "noise_stddev", "indices")
    COORDINATES_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    L2_CLIP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    COUNT_LIMBS_FIELD_NUMBER: _ClassVar[int]
    NOISE_STDDEV_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    coordinates: str
    density: float
    seed: int
    bits: int
    value_bits: int
    clip: float
    l2_clip: float
    weight_cap: int
    count_limbs: int
    noise_stddev: float
    indices: bytes
    def __init__(self, coordinates: _Optional[str] = ..., density: _Optional[float] = ..., seed: _Optional[int] = ..., bits: _Optional[int] = ..., value_bits: _Optional[int] = ..., clip: _Optional[float] = ..., l2_clip: _Optional[float] = ..., weight_cap: _Optional[int] = ..., count_limbs: _Optional[int] = ..., noise_stddev: _Optional[float] = ..., indices: _Optional[bytes] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "model", "data", "method", "chunk_bytes", "max_upload_bytes", "initial_structure")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model: ModelSpec
    data: DataSpec
    method: str
    chunk_bytes: int
    max_upload_bytes: int
    initial_structure: Structure
    def __init__(self, run_id: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., method: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., initial_structure: _Optional[_Union[Structure, _Mapping]] = ...) -> None: ...

class RunSpecRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "hardware", "versions", "model_fingerprint", "tokenizer_fingerprint", "data_error", "tier", "uplink_mbps", "downlink_mbps", "memory_mb", "resident_mb", "accelerator", "fast_bf16")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DATA_ERROR_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    UPLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_MBPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MB_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    FAST_BF16_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    hardware: str
    versions: _containers.ScalarMap[str, str]
    model_fingerprint: str
    tokenizer_fingerprint: str
    data_error: str
    tier: int
    uplink_mbps: float
    downlink_mbps: float
    memory_mb: float
    resident_mb: float
    accelerator: str
    fast_bf16: bool
    def __init__(self, device_id: _Optional[str] = ..., hardware: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., model_fingerprint: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., data_error: _Optional[str] = ..., tier: _Optional[int] = ..., uplink_mbps: _Optional[float] = ..., downlink_mbps: _Optional[float] = ..., memory_mb: _Optional[float] = ..., resident_mb: _Optional[float] = ..., accelerator: _Optional[str] = ..., fast_bf16: _Optional[bool] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("run_id", "heartbeat_s", "num_examples")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    heartbeat_s: float
    num_examples: int
    def __init__(self, run_id: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., num_examples: _Optional[int] = ...) -> None: ...

class FetchTaskRequest(_message.Message):
    __slots__ = ("device_id", "wait_s")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    wait_s: float
    def __init__(self, device_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("kind", "round", "stage", "method", "structure", "train", "upload", "payload_bytes", "deadline_s", "task_id", "evaluate", "secagg", "masking", "retry_after_s")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TaskHeader.Kind]
        TRAIN: _ClassVar[TaskHeader.Kind]
        WAIT: _ClassVar[TaskHeader.Kind]
        STOP: _ClassVar[TaskHeader.Kind]
        SECAGG: _ClassVar[TaskHeader.Kind]
    KIND_UNSPECIFIED: TaskHeader.Kind
    TRAIN: TaskHeader.Kind
    WAIT: TaskHeader.Kind
    STOP: TaskHeader.Kind
    SECAGG: TaskHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    kind: TaskHeader.Kind
    round: int
    stage: Stage
    method: str
    structure: Structure
    train: TrainSpec
    upload: UploadRule
    payload_bytes: int
    deadline_s: float
    task_id: str
    evaluate: bool
    secagg: SecAggPrompt
    masking: SecAggMaskingInput
    retry_after_s: float
    def __init__(self, kind: _Optional[_Union[TaskHeader.Kind, str]] = ..., round: _Optional[int] = ..., stage: _Optional[_Union[Stage, str]] = ..., method: _Optional[str] = ..., structure: _Optional[_Union[Structure, _Mapping]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., upload: _Optional[_Union[UploadRule, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., deadline_s: _Optional[float] = ..., task_id: _Optional[str] = ..., evaluate: _Optional[bool] = ..., secagg: _Optional[_Union[SecAggPrompt, _Mapping]] = ..., masking: _Optional[_Union[SecAggMaskingInput, _Mapping]] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("round", "session", "devices", "neighbours", "threshold", "graph_seed", "bits", "length")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    session: bytes
    devices: _containers.RepeatedScalarFieldContainer[str]
    neighbours: int
    threshold: int
    graph_seed: int
    bits: int
    length: int
    def __init__(self, round: _Optional[int] = ..., session: _Optional[bytes] = ..., devices: _Optional[_Iterable[str]] = ..., neighbours: _Optional[int] = ..., threshold: _Optional[int] = ..., graph_seed: _Optional[int] = ..., bits: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("c_public", "s_public")
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    c_public: bytes
    s_public: bytes
    def __init__(self, c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ...) -> None: ...

class SecAggPeerKeys(_message.Message):
    __slots__ = ("keys",)
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggKeys
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.MessageMap[str, SecAggKeys]
    def __init__(self, keys: _Optional[_Mapping[str, SecAggKeys]] = ...) -> None: ...

class SecAggMaskingInput(_message.Message):
    __slots__ = ("shared", "incoming")
    class IncomingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SHARED_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    shared: _containers.RepeatedScalarFieldContainer[str]
    incoming: _containers.ScalarMap[str, bytes]
    def __init__(self, shared: _Optional[_Iterable[str]] = ..., incoming: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggPrompt(_message.Message):
    __slots__ = ("advertise", "share", "unmask")
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    advertise: SecAggSetup
    share: SecAggPeerKeys
    unmask: SecAggUnmaskRequest
    def __init__(self, advertise: _Optional[_Union[SecAggSetup, _Mapping]] = ..., share: _Optional[_Union[SecAggPeerKeys, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("device_id", "round", "session", "keys")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    session: bytes
    keys: SecAggKeys
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., session: _Optional[bytes] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("device_id", "round", "session", "ciphertexts")
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    session: bytes
    ciphertexts: _containers.ScalarMap[str, bytes]
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., session: _Optional[bytes] = ..., ciphertexts: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("x", "share")
    X_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    x: int
    share: bytes
    def __init__(self, x: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskSharesRequest(_message.Message):
    __slots__ = ("device_id", "round", "session", "self_shares", "key_shares", "failed")
    class SelfSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggShare, _Mapping]] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggShare, _Mapping]] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SELF_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    session: bytes
    self_shares: _containers.MessageMap[str, SecAggShare]
    key_shares: _containers.MessageMap[str, SecAggShare]
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., session: _Optional[bytes] = ..., self_shares: _Optional[_Mapping[str, SecAggShare]] = ..., key_shares: _Optional[_Mapping[str, SecAggShare]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PhaseTimes(_message.Message):
    __slots__ = ("download_s", "train_s", "encode_s", "upload_s")
    DOWNLOAD_S_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_S_FIELD_NUMBER: _ClassVar[int]
    download_s: float
    train_s: float
    encode_s: float
    upload_s: float
    def __init__(self, download_s: _Optional[float] = ..., train_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., upload_s: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("device_id", "round", "num_examples", "payload_bytes", "train_loss", "times", "task_id", "offset", "eval_examples", "eval_loss", "eval_accuracy", "peak_rss_mb")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_MB_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    num_examples: int
    payload_bytes: int
    train_loss: float
    times: PhaseTimes
    task_id: str
    offset: int
    eval_examples: int
    eval_loss: float
    eval_accuracy: float
    peak_rss_mb: float
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., train_loss: _Optional[float] = ..., times: _Optional[_Union[PhaseTimes, _Mapping]] = ..., task_id: _Optional[str] = ..., offset: _Optional[int] = ..., eval_examples: _Optional[int] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., peak_rss_mb: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "round", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round", "run_finished", "next_heartbeat_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    NEXT_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    run_finished: bool
    next_heartbeat_s: float
    def __init__(self, round: _Optional[int] = ..., run_finished: _Optional[bool] = ..., next_heartbeat_s: _Optional[float] = ...) -> None: ...

class UploadOffsetRequest(_message.Message):
    __slots__ = ("device_id", "round", "task_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    task_id: str
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class UploadOffsetReply(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...
