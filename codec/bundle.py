"""Stand-in container: float32 bytes behind the final interface (replaced by the codec issue)."""
from __future__ import annotations

import json
import struct
from typing import Mapping

import numpy as np

from .errors import CodecError
from .tensors import Dense, Masked, Sparse, Tensor

DEFAULT_MAX_ELEMENTS = 1 << 28
_MAGIC = b"ELB0"


def encode_bundle(tensors: Mapping[str, Tensor], *, value_type: str = "float32", level: int = 3) -> bytes:
    header, blobs = [], []
    for name, t in tensors.items():
        if isinstance(t, Dense):
            v = np.ascontiguousarray(t.values, np.float32)
            header.append({"n": name, "k": "d", "s": list(v.shape)})
            blobs.append(v.tobytes())
        elif isinstance(t, Sparse):
            header.append({"n": name, "k": "s", "s": list(t.shape), "nnz": int(len(t.indices))})
            blobs += [np.asarray(t.indices, "<i8").tobytes(), np.asarray(t.values, "<f4").tobytes()]
        elif isinstance(t, Masked):
            header.append({"n": name, "k": "m", "s": list(t.shape), "seed": int(t.seed), "d": float(t.density),
                           "nnz": int(len(t.values))})
            blobs.append(np.asarray(t.values, "<f4").tobytes())
    h = json.dumps(header).encode()
    return _MAGIC + struct.pack("<I", len(h)) + h + b"".join(blobs)


def decode_bundle(data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    if data[:4] != _MAGIC:
        raise CodecError("magic: not an edgelora bundle")
    (hl,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + hl])
    pos, out = 8 + hl, {}
    for e in header:
        shape = tuple(e["s"])
        if e["k"] == "d":
            n = int(np.prod(shape))
            out[e["n"]] = Dense(np.frombuffer(data, "<f4", n, pos).reshape(shape).copy()); pos += 4 * n
        elif e["k"] == "s":
            k = e["nnz"]
            idx = np.frombuffer(data, "<i8", k, pos).copy(); pos += 8 * k
            val = np.frombuffer(data, "<f4", k, pos).copy(); pos += 4 * k
            out[e["n"]] = Sparse(shape, idx, val)
        else:
            k = e["nnz"]
            out[e["n"]] = Masked(shape, e["seed"], e["d"], np.frombuffer(data, "<f4", k, pos).copy()); pos += 4 * k
    return out
