"""The coordinator's cost per accepted upload, by upload density: does aggregation cost what was sent?

    python -m benchmarks.aggregation --json aggregation.jsonl [--uploads N] [--structures lora,full]

Two structures of SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64, MLP 1536, vocabulary 49,152):
- lora: LoRA r = 16 on all seven projections (q, k, v, o, gate, up, down) of the 30 layers, 420 tensors,
  4,884,480 values (C7's adapter, docs/reproduction.md). Density 1 is a dense upload (LoRA); below 1 a FLASC
  top-k upload (edgelora.sparsity.global_topk over the whole update, codec.Sparse; the bundle codes the 420
  tensors' indices as one joint stream, and the server checks and adds it as one FlatSparse).
- full: SLoRA Stage 1 on the whole model, 272 tensors (embedding, 30 x 7 projections and 2 norms, final
  norm), 134,515,008 values. Density 1 is a dense upload (FLoRA's Stage 1); below 1 a masked upload
  (codec.Masked) with mask density = the density.

Each point opens a real Round on a RoundEngine (fedavg, example-weighted) whose method plans that upload,
encodes one device delta (standard normal x 1e-3, float32 values) with the codec, then has --uploads devices
upload those bytes: `Round.check` (decode_update: codec bytes -> the delta in its sent form, every check) and
`Round.accept` (clip, the accumulator's add, the update norm), then the aggregator's final mean. Timed with
time.perf_counter; nothing is mocked but the method's planning (a fixed task) and the transport.

One JSON record per (structure, density): `values`, `density`, `upload_format`, `index_form` (a top-k's joint
index stream as the encoder wrote it: "golomb", or "bytes" where that was within 1 % of Golomb's size, which
needs tensors of alike density: FORMAT.md; "own" where no two tensors' indices share a stream), `payload_mb`,
`seconds_per_upload` (the uploads after the warm-up, wall clock, added up with the flush of the adds they
left waiting (RunningMean.flush: top-k adds wait and go in together), divided by their number), its two
parts `check_seconds` and `accept_seconds` (flush included), `best_seconds_per_upload` (the best single
upload's check and accept: a shared machine's other jobs only ever add to it, but it leaves out the flushes),
`median_seconds_per_upload` (of the single uploads), `cpu_seconds_per_upload` (process CPU time, as
seconds_per_upload), `flush_seconds` (the final flush), `codec_decode_seconds` (codec.decode_flat alone, best of
2: the codec's part of check_seconds), `warmup_seconds` (the round's first upload, which
for a mask also derives and caches the mask's indices, once per run; for top-k also the second, whose
other indices make the round's float64 sum whole, once per round), `peak_mb` (one more upload under
tracemalloc, which numpy reports its buffers to: the most memory held at once beyond what was held before
it; the payload's bytes were already held; a top-k add that waits is made by a later flush),
`mean_seconds` (the final mean, once per round), `sum_mb` (the
running sum as held: whole tensors, or for a mask the k sums at its indices), and `densified_seconds` (best
of 2) / `densified_peak_mb`: the same upload with every tensor made dense before it is added, as the
coordinator did before (sparse points only). Figures are printed, never asserted. Goal: at 1/16,
seconds_per_upload at least 8x below the same structure's dense point.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.codec import SCALE_PROFILES, joint_form
from edgelora import codec
from edgelora.config import load_config
from edgelora.methods.base import Method, MethodConfig
from edgelora.server.aggregation import by_tensor, densify
from edgelora.server.engine import RoundEngine
from edgelora.sparsity import global_topk
from edgelora.state import ServerState
from edgelora.tasks import DeviceInfo, PhaseTimes, Stage, Structure, StructureKind, UploadFormat

DENSITIES = (1.0, 1 / 4, 1 / 16, 1 / 64)
LAYERS, HIDDEN, KV, MLP, VOCAB, RANK = 30, 576, 192, 1536, 49152, 16
PROJECTIONS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV),
               "self_attn.v_proj": (HIDDEN, KV), "self_attn.o_proj": (HIDDEN, HIDDEN),
               "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP), "mlp.down_proj": (MLP, HIDDEN)}
MASK_SEED = 1


def lora_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(LAYERS):
        for module, (fan_in, fan_out) in PROJECTIONS.items():
            out[f"model.layers.{i}.{module}.lora_A.weight"] = (RANK, fan_in)
            out[f"model.layers.{i}.{module}.lora_B.weight"] = (fan_out, RANK)
    return out


def full_shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for module, (fan_in, fan_out) in PROJECTIONS.items():
            out[f"model.layers.{i}.{module}.weight"] = (fan_out, fan_in)
        out[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    return out


STRUCTURES = {"lora": lora_shapes, "full": full_shapes}
UPLOADS = {"lora": 8, "full": 4}  # a full dense upload takes seconds; a LoRA one is noisy at tens of ms


class FixedPlan(Method):
    """Plans every device the same task: the point's structure and upload format. It downloads nothing (the
    download is not what is measured)."""
    name = "fixed-plan"

    def __init__(self, run, structure: Structure, fmt: UploadFormat, density: float) -> None:
        super().__init__(MethodConfig(name=self.name), run)
        self._structure, self._fmt, self._density = structure, fmt, density

    def structure(self, state):
        return self._structure

    def upload_rule(self, state):
        return self.upload(self._fmt, density=self._density)

    def download(self, state, ins):
        return {}


def point_plan(structure: str, density: float) -> tuple[Structure, UploadFormat]:
    if density >= 1:
        return Structure(kind=StructureKind.FULL), UploadFormat.DENSE
    if structure == "lora":
        return Structure(kind=StructureKind.FULL), UploadFormat.TOPK
    return Structure(kind=StructureKind.FULL, mask_density=density, mask_seed=MASK_SEED, dense_patterns=()), \
        UploadFormat.MASKED


def encode_upload(shapes: dict[str, tuple[int, ...]], fmt: UploadFormat, density: float, seed: int,
                  profile: str = "alike", value_type: str = "float32") -> bytes:
    """Codec bytes of one device's delta in the point's upload format, as a device would send them: tensor t is
    standard normal x 1e-3 x its scale under `profile` (benchmarks.codec.SCALE_PROFILES: "alike", every tensor
    the same; "log-normal", a log-normal scale each; "B 10x A", that and lora_B 10x lora_A, as a LoRA update's
    tensors differ), its values in `value_type`."""
    rng = np.random.default_rng(seed)
    scale = SCALE_PROFILES[profile]
    if fmt == UploadFormat.MASKED:
        tensors = {n: codec.Masked(s, MASK_SEED, density,
                                   (rng.standard_normal(codec.mask_size(s, density), np.float32) * 1e-3))
                   for n, s in shapes.items()}
    else:
        delta = {n: rng.standard_normal(s, np.float32)
                 * np.float32(1e-3 * (scale(n, rng.normal()) if profile != "alike" else 1.0))  # (alike draws no z)
                 for n, s in shapes.items()}
        tensors = ({n: codec.Dense(v) for n, v in delta.items()} if fmt == UploadFormat.DENSE
                   else global_topk(delta, density))
        del delta
    return codec.encode_bundle(tensors, value_type=value_type)


def measure(structure: str, density: float, uploads: int, densified: bool, profile: str = "alike",
            value_type: str = "float32") -> dict:
    shapes = STRUCTURES[structure]()
    values = sum(math.prod(s) for s in shapes.values())
    struct, fmt = point_plan(structure, density)
    devices = [str(i) for i in range(uploads + 1 + (3 if densified else 0))]
    run = load_config({"server": {"rounds": 1, "devices_per_round": len(devices)},
                       "model": {"name": "tiny-bert"}, "method": {"name": "lora"},
                       "data": {"mode": "own", "num_devices": len(devices), "label_names": ["a", "b"]}})
    engine = RoundEngine(run, FixedPlan(run, struct, fmt, density), host=None)
    # params are read for their shapes only: zero-stride views hold no memory
    params = {n: np.broadcast_to(np.float32(0), s) for n, s in shapes.items()}
    state = ServerState(round=0, stage=Stage.SPARSE if fmt == UploadFormat.MASKED else Stage.DENSE,
                        stage_start=1, params=params)
    rnd = engine.open_round(state, devices, {}, {d: DeviceInfo(d) for d in devices})
    # Masked and dense uploads differ only in their values, which cost nothing here: one payload serves every
    # device. Top-k devices send different indices: each gets its own.
    shared = encode_upload(shapes, fmt, density, seed=0, profile=profile, value_type=value_type)
    queue = iter(devices)

    def next_upload() -> tuple[str, bytes]:
        """The next device and its payload, handed its task and its upload begun (none of it timed)."""
        d = next(queue)
        payload = encode_upload(shapes, fmt, density, seed=int(d), profile=profile, value_type=value_type) \
            if fmt == UploadFormat.TOPK else shared
        rnd.begin_upload(d, rnd.hand_out(d).task_id, len(payload))
        return d, payload

    def one_upload(dense_first: bool = False, upload: tuple[str, bytes] | None = None
                   ) -> tuple[float, float, float]:
        """(check seconds, accept seconds, CPU seconds of both) of an upload (default: the next device's)."""
        d, payload = upload or next_upload()
        cpu, start = time.process_time(), time.perf_counter()
        delta = rnd.check(d, payload, 8)
        if dense_first:  # what the coordinator did before: every tensor dense before the add
            delta = {n: densify(n, t) for n, t in by_tensor(delta).items()}
        checked = time.perf_counter()
        rnd.accept(d, delta, 8, 0.0, PhaseTimes(), len(payload))
        return checked - start, time.perf_counter() - checked, time.process_time() - cpu

    def traced_peak_mb(dense_first: bool = False) -> float:
        upload = next_upload()
        tracemalloc.start()
        try:
            held = tracemalloc.get_traced_memory()[0]
            one_upload(dense_first, upload)
            return (tracemalloc.get_traced_memory()[1] - held) / 2**20
        finally:
            tracemalloc.stop()

    # Warm-up: the round's first upload (and, for top-k, the second, whose other indices make the sum whole)
    warmup = [sum(one_upload()[:2]) for _ in range(2 if fmt == UploadFormat.TOPK else 1)]
    steady = [one_upload() for _ in range(uploads - len(warmup))]
    cpu, start = time.process_time(), time.perf_counter()
    rnd.agg.flush()  # what the steady uploads left waiting, so that their figures are whole
    flush_seconds, flush_cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(steady)
    best = min(steady, key=lambda t: t[0] + t[1])
    peak = traced_peak_mb()
    decode = []
    for _ in range(2):
        start = time.perf_counter()
        codec.decode_flat(shared, max_elements=values)
        decode.append(time.perf_counter() - start)
    start = time.perf_counter()
    engine.aggregator.mean_delta(rnd.agg)
    mean_seconds = time.perf_counter() - start
    rec = {"structure": structure, "values": values, "density": density, "upload_format": fmt.name.lower(),
           "profile": profile, "value_type": value_type,
           "index_form": joint_form(shared) if fmt == UploadFormat.TOPK else "",
           "payload_mb": round(len(shared) / 2**20, 2), "uploads": uploads,
           "seconds_per_upload": (sum(c + a for c, a, _ in steady) + flush_seconds) / n,
           "check_seconds": sum(c for c, _, _ in steady) / n,
           "accept_seconds": (sum(a for _, a, _ in steady) + flush_seconds) / n,
           "best_seconds_per_upload": best[0] + best[1],
           "median_seconds_per_upload": statistics.median(c + a for c, a, _ in steady),
           "cpu_seconds_per_upload": (sum(t[2] for t in steady) + flush_cpu) / n, "flush_seconds": flush_seconds,
           "codec_decode_seconds": min(decode), "warmup_seconds": warmup, "peak_mb": round(peak, 1),
           "mean_seconds": mean_seconds, "sum_mb": round(rnd.agg.held_bytes / 2**20, 1)}
    if densified and fmt != UploadFormat.DENSE:
        rec["densified_seconds"] = min(sum(one_upload(dense_first=True)[:2]) for _ in range(2))
        rec["densified_peak_mb"] = round(traced_peak_mb(dense_first=True), 1)
    return rec


def print_table(records: list[dict]) -> None:
    dense = {r["structure"]: r["seconds_per_upload"] for r in records if r["density"] == 1}
    print(f"{'structure':<9} {'values':>11} {'density':>7} {'format':<6} {'payload MB':>10} {'s/upload':>9} "
          f"{'vs dense':>8} {'check s':>8} {'(codec)':>8} {'accept s':>8} {'warm-up s':>9} {'peak MB':>8} "
          f"{'densified s':>11} {'dens. peak':>10} {'mean s':>7} {'sum MB':>7}")
    for r in records:
        speedup = dense.get(r["structure"], math.nan) / r["seconds_per_upload"]
        print(f"{r['structure']:<9} {r['values']:>11,} {'1/%d' % round(1 / r['density']):>7} "
              f"{r['upload_format']:<6} {r['payload_mb']:>10.2f} {r['seconds_per_upload']:>9.4f} "
              f"{speedup:>7.1f}x {r['check_seconds']:>8.4f} {r['codec_decode_seconds']:>8.4f} "
              f"{r['accept_seconds']:>8.4f} {sum(r['warmup_seconds']):>9.3f} {r['peak_mb']:>8.1f} "
              f"{r.get('densified_seconds', math.nan):>11.4f} {r.get('densified_peak_mb', math.nan):>10.1f} "
              f"{r['mean_seconds']:>7.3f} {r['sum_mb']:>7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.aggregation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uploads", type=int, help="uploads per point, warm-up included (default: lora 8, full 4)")
    ap.add_argument("--structures", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--no-densified", action="store_true", help="skip the densify-first comparison")
    ap.add_argument("--profile", default="alike", choices=list(SCALE_PROFILES),
                    help="the tensors' scales in each device's delta (default: alike)")
    ap.add_argument("--value-type", default="float32", choices=codec.VALUE_TYPES,
                    help="the upload's value type, every point (FLASC's default is int4_block; default float32)")
    ap.add_argument("--json", help="write one JSON record per point (JSON Lines)")
    a = ap.parse_args(argv)
    records = []
    for structure in a.structures.split(","):
        for density in (float(d) for d in a.densities.split(",")):
            rec = measure(structure, density, max(3, a.uploads or UPLOADS[structure]), not a.no_densified,
                          a.profile, a.value_type)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    print()
    print_table(records)
    dense = {r["structure"]: r["seconds_per_upload"] for r in records if r["density"] == 1}
    for r in records:
        if r["density"] == 1 / 16 and r["structure"] in dense:
            print(f"{r['structure']} at 1/16: {dense[r['structure']] / r['seconds_per_upload']:.1f}x less time "
                  f"per upload than dense (goal: >= 8x)")
    if a.json:
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
