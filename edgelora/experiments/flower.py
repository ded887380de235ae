"""What Flower would send for the same training: the float32 baseline of docs/communication.md.

Flower's FedAvg-family strategies (flwr 1.42, `ndarrays_to_parameters`) send every trainable array down in
FitIns and every trained array back up in FitRes, each as a `.npy` file (`numpy.save`, float32, no pickle)
inside a protobuf `Parameters {repeated bytes tensors = 1; string tensor_type = 2}`. So one model crossing
the link in either direction costs

    sum over arrays t of [ npy_t + 1 + varint_len(npy_t) ] + 2 + len("numpy.ndarray"),
    npy_t = 4 * numel(t) + npy_header_len(shape(t))   (128 bytes for every shape up to rank 2 here),

the `Parameters` message's exact protobuf size. Measured with flwr 1.42.0 on the 74 arrays of the CPU
profile's MiniLM LoRA (r = 10, 430,505 values): `parameters_to_proto(ndarrays_to_parameters(arrays))
.ByteSize()` = 1,731,742 bytes, which this formula gives to the byte (tests/test_frontier.py checks the
formula; Flower is not a dependency). The gRPC and HTTP/2 framing around it, and FitIns' config and
FitRes' metrics, are left out, as they are from edgelora's own byte counts (codec payloads).
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from edgelora.config import load_config
from edgelora.data import with_num_labels
from edgelora.methods import make_method
from edgelora.models import ModelHost, load_base_model

TENSOR_TYPE = "numpy.ndarray"


def varint_len(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))


def npy_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of numpy.save(float32 array of `shape`): its header (written without the data) plus 4 per value."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.tell() + 4 * math.prod(shape)


def parameters_bytes(shapes: Iterable[tuple[int, ...]]) -> int:
    """Protobuf size of Flower's Parameters message carrying float32 arrays of these shapes."""
    total = 0
    for shape in shapes:
        n = npy_bytes(shape)
        total += 1 + varint_len(n) + n  # field 1 tag, length, the .npy bytes
    return total + 1 + varint_len(len(TENSOR_TYPE)) + len(TENSOR_TYPE)


def run_shapes(run_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """The trainable arrays of a run folder's model at its first stage, as its config.toml builds them (loads
    the base model: a second or two for MiniLM). A classifier whose config left model.num_labels to the data
    (0) gets its head sized from the data, as the run's server sized it."""
    run = with_num_labels(load_config(Path(run_dir) / "config.toml"))
    method = make_method(run)
    host = ModelHost(load_base_model(run.model, run.model.num_labels, run.model.head_seed), "cpu")
    return {n: tuple(v.shape) for n, v in method.init_params(host, method.initial_stage()).items()}


@functools.lru_cache(maxsize=32)
def model_bytes(run_dir: str) -> int:
    """parameters_bytes of a run folder's trainable arrays (run_shapes), built once per folder and process."""
    return parameters_bytes(run_shapes(run_dir).values())


def round_bytes(record: dict, per_model: int) -> int:
    """Flower's bytes for one round of a metrics.jsonl record: a model down to every device that downloaded,
    a model up from every device that uploaded."""
    devices = record.get("devices", [])
    return per_model * sum((d.get("bytes_down", 0) > 0) + (d.get("bytes_up", 0) > 0) for d in devices)
