"""Codec figures: index bits against the log2(C(n,k)) bound, coding time, bytes per value, and a LoRA update.

    python -m benchmarks.codec --json codec.json

Indices are uniformly random k-subsets (k = round(density * n)); values are standard normal. encode_ms and
decode_ms time the index coder alone (best of --repeat); bundle_*_ms time a whole one-tensor bundle with
float16 values. The value-type table encodes a FLASC 1/4 top-k of a MiniLM LoRA update (r = 10) in each
value type: bytes, bits per value (indices included), relative RMS error, encode and decode ms (nearest
rounding; stochastic for the int types too). The joint-stream table encodes a FLASC global top-k of a SmolLM2
LoRA update (420 tensors) with the joint index stream (as written, and in its Golomb form) and with a stream per tensor, under three scale
profiles (every tensor alike; per-tensor scales log-normal, sigma 1; lora_B 10x lora_A on top), so the tensors'
densities differ as a real update's do: bytes of each, float16 values. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from edgelora import codec
from edgelora.codec import index_coding, values, zstd_frame
from edgelora.codec.container import take_apart

SIZES = (1_000_000, 10_000_000)
DENSITIES = (0.001, 0.01, 0.0625, 0.25, 0.5)
LORA_MODULES = {  # MiniLM-L6 (hidden 384, intermediate 1536): module -> (in_features, out_features)
    "attention.self.query": (384, 384), "attention.self.key": (384, 384), "attention.self.value": (384, 384),
    "attention.output.dense": (384, 384), "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}


def best_ms(fn, repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best, out


def value_bytes(v: np.ndarray, value_type: str) -> tuple[int, np.ndarray]:
    """Bytes the container stores for `v` (each byte plane zstd-compressed where smaller) and its decoding."""
    stored, scale, scales = values.encode_values(v, value_type, "bench")
    size = sum(min(len(p), len(zstd_frame.compress(p, 3))) for p in values.pack_planes([stored])) + len(scales)
    return size, values.decode_values(stored, value_type, scale, "bench", count=v.size,
                                      block_size=values.DEFAULT_BLOCK, scales=scales)


def measure(n: int, density: float, repeat: int, rng: np.random.Generator) -> dict:
    k = round(density * n)
    indices = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    encode_ms, (coder, param, payload) = best_ms(lambda: index_coding.encode_indices(indices, n), repeat)
    decode_ms, decoded = best_ms(lambda: index_coding.decode_indices(coder, param, payload, n, k), repeat)
    assert np.array_equal(decoded, indices)
    v = rng.standard_normal(k).astype(np.float32)
    record = {"n": n, "density": density, "k": k, "coder": index_coding.CODER_NAMES[coder],
              "bits_per_index": 8 * len(payload) / k, "bound_bits_per_index": index_coding.bound_bits(n, k) / k,
              "encode_ms": encode_ms, "decode_ms": decode_ms}
    record["ratio_to_bound"] = record["bits_per_index"] / record["bound_bits_per_index"]
    for vt in codec.VALUE_TYPES:
        size, back = value_bytes(v, vt)
        record[f"bytes_per_value_{vt}"] = size / k
        if vt == "int8":
            record["int8_relative_rms_error"] = float(np.linalg.norm(back - v) / np.linalg.norm(v))
            record["int8_max_error_over_max_abs"] = float(np.abs(back - v).max() / np.abs(v).max())
    bundle = {"t": codec.Sparse((n,), indices, v)}
    record["bundle_encode_ms"], data = best_ms(lambda: codec.encode_bundle(bundle, value_type="float16"), repeat)
    record["bundle_decode_ms"], _ = best_ms(lambda: codec.decode_bundle(data), repeat)
    record["bundle_bytes_float16"] = len(data)
    return record


def lora_update(rng: np.random.Generator, layers: int = 6, r: int = 8) -> dict[str, np.ndarray]:
    out = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in LORA_MODULES.items():
            prefix = f"base_model.model.encoder.layer.{layer}.{module}"
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, fan_in)).astype(np.float32)
            out[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, r)).astype(np.float32)
    return out


def top_k(t: np.ndarray, density: float) -> codec.Sparse:
    flat = t.reshape(-1)
    k = math.ceil(density * flat.size)
    keep = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
    return codec.Sparse(t.shape, keep.astype(np.int64), flat[keep])


def lora_comparison(rng: np.random.Generator) -> dict:
    update = lora_update(rng)
    dense = codec.encode_bundle({n: codec.Dense(t) for n, t in update.items()}, value_type="float32")
    sparse = codec.encode_bundle({n: top_k(t, 1 / 16) for n, t in update.items()}, value_type="float16")
    params = sum(t.size for t in update.values())
    return {"tensors": len(update), "parameters": params, "raw_float32_bytes": 4 * params,
            "dense_float32_bytes": len(dense), "topk_float16_bytes": len(sparse), "ratio": len(dense) / len(sparse),
            "ratio_to_raw": 4 * params / len(sparse)}


def value_type_table(rng: np.random.Generator, repeat: int, density: float = 0.25) -> list[dict]:
    """A FLASC top-k upload of a LoRA-shaped update (scaled as a real one: ~1e-3) in every value type."""
    update = {n: 1e-3 * t for n, t in lora_update(rng, r=10).items()}
    sent = {n: top_k(t, density) for n, t in update.items()}
    k = sum(t.indices.size for t in sent.values())
    ref = np.concatenate([t.values for t in sent.values()])
    out = []
    for vt in codec.VALUE_TYPES:
        for rounding in ("nearest", "stochastic") if vt.startswith("int") else ("nearest",):
            enc = lambda: codec.encode_bundle(sent, value_type=vt, rounding=rounding, seed=0)
            encode_ms, data = best_ms(enc, repeat)
            decode_ms, back = best_ms(lambda: codec.decode_bundle(data), repeat)
            got = np.concatenate([back[n].values for n in sent])
            out.append({"value_type": vt, "rounding": rounding, "values": k, "bytes": len(data),
                        "bits_per_value": 8 * len(data) / k,
                        "relative_rms_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                        "encode_ms": encode_ms, "decode_ms": decode_ms})
    return out


SCALE_PROFILES = {  # a tensor's scale from its name and a draw
    "alike": lambda name, z: 1.0,
    "log-normal": lambda name, z: float(np.exp(z)),
    "B 10x A": lambda name, z: (10.0 if "lora_B" in name else 1.0) * float(np.exp(z)),
}


def joint_form(data: bytes) -> str:
    """How a bundle's joint index stream was written: "bytes" (byte gaps), "golomb", or "own" (no joint stream:
    every sparse tensor has its own). Read from the entries' coders: the bundle's version byte says only which
    features are present (a bitmap tensor alone makes it 4)."""
    coders = {e.index_coder for e in take_apart(data)[0].entries}
    return "bytes" if index_coding.JOINT_BYTES in coders else "golomb" if index_coding.JOINT in coders else "own"


def joint_table(rng: np.random.Generator, densities=(1 / 4, 1 / 16, 1 / 64)) -> list[dict]:
    """The joint index stream against a stream per tensor, on global top-k uploads of a SmolLM2 LoRA update."""
    from benchmarks.aggregation import lora_shapes
    from edgelora.sparsity import global_topk

    out = []
    for profile, scale in SCALE_PROFILES.items():
        delta = {n: rng.standard_normal(s, np.float32) * np.float32(1e-3 * scale(n, rng.normal()))
                 for n, s in lora_shapes().items()}
        for density in densities:
            sent = global_topk(delta, density)
            data = codec.encode_bundle(sent, value_type="float16")
            golomb = len(codec.encode_bundle(sent, value_type="float16", byte_gap_slack=-1))
            own = len(codec.encode_bundle(sent, value_type="float16", joint_indices=False))
            out.append({"profile": profile, "density": density, "joint_bytes": len(data),
                        "joint_form": joint_form(data), "joint_golomb_bytes": golomb,
                        "per_tensor_bytes": own, "joint_over_per_tensor": len(data) / own})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    records = []
    print(f"{'n':>10} {'density':>7} {'coder':>6} {'bits/idx':>8} {'bound':>7} {'ratio':>6} {'enc ms':>7} "
          f"{'dec ms':>7} | bytes/value f32 f16 bf16 int8 | int8 rel.err | bundle enc/dec ms")
    for n in args.sizes:
        for density in args.densities:
            r = measure(n, density, args.repeat, rng)
            records.append(r)
            print(f"{n:>10} {density:>7} {r['coder']:>6} {r['bits_per_index']:>8.3f} "
                  f"{r['bound_bits_per_index']:>7.3f} {r['ratio_to_bound']:>6.3f} {r['encode_ms']:>7.1f} "
                  f"{r['decode_ms']:>7.1f} | {r['bytes_per_value_float32']:.2f} {r['bytes_per_value_float16']:.2f} "
                  f"{r['bytes_per_value_bfloat16']:.2f} {r['bytes_per_value_int8']:.2f} | "
                  f"{r['int8_relative_rms_error']:.4f} | {r['bundle_encode_ms']:.1f}/{r['bundle_decode_ms']:.1f}",
                  flush=True)
    lora = lora_comparison(rng)
    print(f"\nMiniLM LoRA update (r=8, 6 layers, {lora['tensors']} tensors, {lora['parameters']} parameters):\n"
          f"  top-k 1/16 float16 bundle {lora['topk_float16_bytes']} B vs dense float32 bundle "
          f"{lora['dense_float32_bytes']} B: {lora['ratio']:.1f}x smaller (target >= 25x);\n"
          f"  vs raw float32 (4 B/parameter, {lora['raw_float32_bytes']} B): {lora['ratio_to_raw']:.1f}x")
    table = value_type_table(rng, args.repeat)
    print(f"\nFLASC 1/4 top-k of a MiniLM LoRA update (r=10, {table[0]['values']} values), per value type:\n"
          f"{'value type':>11} {'rounding':>10} {'bytes':>8} {'bits/value':>10} {'rel. RMS err':>12} "
          f"{'enc ms':>7} {'dec ms':>7}")
    for t in table:
        print(f"{t['value_type']:>11} {t['rounding']:>10} {t['bytes']:>8} {t['bits_per_value']:>10.2f} "
              f"{t['relative_rms_error']:>12.5f} {t['encode_ms']:>7.1f} {t['decode_ms']:>7.1f}")
    records.append({"value_types": table})
    joint = joint_table(rng)
    print("\nSmolLM2 LoRA global top-k (420 tensors, float16): joint index stream (as written: byte gaps where "
          "within 1 % of Golomb) vs a stream per tensor")
    for j in joint:
        print(f"{j['profile']:>11} 1/{round(1 / j['density']):<3} joint {j['joint_bytes']:>9,} B ({j['joint_form']:<6}"
              f" Golomb {j['joint_golomb_bytes']:>9,} B)  per tensor {j['per_tensor_bytes']:>9,} B  ratio "
              f"{j['joint_over_per_tensor']:.4f}")
    records.append({"joint_index_stream": joint})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
