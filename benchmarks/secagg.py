"""What secure aggregation costs: SecAgg+ over the round's shared coordinates, against the same method's plain
upload and against Flower's SecAgg+ (issue 27's "Measured").

    python -m benchmarks.secagg [--json PATH] [--models minilm,smollm2] [--methods flasc-1_16,sft,lora]
                                [--devices 10,50,100] [--drop 0.1] [--value-bits 8] [--plot PNG]

For each model (MiniLM with LoRA r = 10 as the CPU profile trains it; SmolLM2-135M with LoRA r = 16 on all
seven projections, examples/lm/lora.toml) and method (FLASC at 1/16 up, SFT at its 1.8 % mask = SLoRA's Stage 1,
dense LoRA for reference), the trainable shapes come from the real model and structure. For each round size n,
one round of the protocol runs in this process, with the project's own device (edge_client/secagg.py) and
coordinator (server/secagg.py): n devices advertise keys, share them with their neighbours, 10 % drop after
sharing (their pairwise masks must be rebuilt), the rest mask a ring vector and upload it, survivors return
shares, the coordinator unmasks; the result is checked against the clear sum. Every message is sized as the
wire carries it (protobuf for key messages, the ring codec for uploads).

One JSON record per (model, method, devices):
- plain_bytes_up: the method's upload today (codec payload, per device), encoded from a synthetic delta (Gaussian,
  std 0.01) in the method's own form and value type: FLASC's top-k in int4_block, SFT's mask values and dense
  LoRA's in the run default (float32);
- secure_bytes_up: per surviving device, the masked ring upload plus its key messages (AdvertiseKeys, ShareKeys,
  UnmaskShares); key_bytes_up: those key messages alone; secure_bytes_down_extra: the prompts it fetches
  (setup, peer keys, unmask request) and the sealed shares relayed to it;
- flower_secaggplus_bytes: 8 B per parameter of the same update (Flower 1.42 sends every array dense, as int64);
- extra_seconds: the compute the protocol adds to a round's critical path, measured here, one core, no network:
  the slowest device's key phases + ring encoding + masking, plus the coordinator's key phases and unmasking
  (the extra bytes' transfer time is bytes / link rate on top);
- unmask_cpu_s: the coordinator's CPU from closing uploads to the unmasked sum (process time): rebuilding the
  dropped devices' keys and the survivors' self-mask seeds, and removing every mask; shamir_cpu_s: the
  rebuilding's share of it (pycryptodome's Shamir combine).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import secrets
import time
from dataclasses import dataclass

import numpy as np

from edgelora import codec
from edgelora.config import load_config, secure_threshold
from edgelora.secagg import coordinates as coords
from edgelora.secagg.messages import Setup
from edgelora.secagg.ring import encode as ring_encode
from edgelora.secagg.ring import plan_ring, ring_length
from edgelora.sparsity import global_topk
from edgelora.tasks import Coordinates, SecureUpload, UploadFormat, UploadRule

FLOWER_BYTES_PER_PARAMETER = 8     # SecAgg+ in Flower 1.42: masked modulo 2^32, sent as int64
EXAMPLES = 256                     # each device's examples (the CPU profile's): the weight cap
CLIP = 0.05                        # examples/sweeps/secure.toml's ring (its q is 8)

MODELS = {
    "minilm": {"model": {"name": "minilm", "max_seq_len": 32, "num_labels": 41},
               "lora": {"rank": 10, "alpha": 10.0}},
    "smollm2": {"model": {"task": "causal-lm", "name": "smollm2", "max_seq_len": 64},
                "lora": {"rank": 16, "alpha": 16.0}},
}
METHODS = {  # name -> the [method] section (and server.value_type where the plain run sets one)
    "flasc-1_16": {"method": {"name": "flasc", "download_density": 0.0625, "upload_density": 0.0625,
                              "error_feedback": True}, "value_type": "int4_block"},
    "sft": {"method": {"name": "sft", "density": 0.018}},
    "lora": {"method": {"name": "lora"}},
}


@dataclass
class Shapes:
    """A (model, method)'s trainable tensors and its upload rule."""
    shapes: dict[str, tuple[int, ...]]
    structure: object
    masked: frozenset[str]
    rule: UploadRule

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def build(model: str, method: str) -> Shapes:
    from edgelora.methods import make_method
    from edgelora.models import ModelHost, is_masked, load_base_model
    from edgelora.state import ServerState

    spec, meth = MODELS[model], METHODS[method]
    lora = {"lora": spec["lora"]} if meth["method"]["name"] in ("lora", "flasc") else {}
    raw = {"model": spec["model"], "method": {**meth["method"], **lora}}
    if "value_type" in meth:
        raw["server"] = {"value_type": meth["value_type"]}
    if spec["model"].get("task") == "causal-lm":
        raw["data"] = {"dataset": "jsonl", "path": "unused.jsonl"}
    run = load_config(raw)
    m = make_method(run)
    host = ModelHost(load_base_model(run.model, run.model.num_labels, run.model.head_seed), "cpu",
                     frozen=())
    stage = m.initial_stage()
    params = m.init_params(host, stage)
    structure = m.initial_structure()
    return Shapes({n: tuple(v.shape) for n, v in params.items()}, structure,
                  frozenset(n for n in params if is_masked(n, structure)),
                  m.upload_rule(ServerState(round=0, stage=stage, stage_start=1, params=params)))


def plain_upload_bytes(s: Shapes, rng: np.random.Generator) -> tuple[int, float]:
    """(bytes, seconds) of the plain upload of a synthetic delta, in the method's form and value type."""
    delta = {n: rng.normal(0, 0.01, shape).astype(np.float32) for n, shape in s.shapes.items()}
    t0 = time.perf_counter()
    if s.rule.format == UploadFormat.TOPK:      # FLASC plain: each device's own top-k
        tensors = dict(global_topk(delta, s.rule.density))
    elif s.rule.format == UploadFormat.MASKED:
        sets = coords.coordinate_sets(SecureUpload(Coordinates.MASK, None, 1.0, 0), s.shapes, s.structure,
                                      s.masked)
        tensors = {n: (codec.Masked(delta[n].shape, s.structure.mask_seed, s.structure.mask_density,
                                    delta[n].reshape(-1)[idx]) if idx is not None else codec.Dense(delta[n]))
                   for n, idx in sets.items()}
    else:
        tensors = {n: codec.Dense(d) for n, d in delta.items()}
    payload = codec.encode_bundle(tensors, value_type=s.rule.value_type, rounding="nearest", seed=0)
    return len(payload), time.perf_counter() - t0


class Stopwatch:
    """Wall-clock and process CPU seconds, summed per key over the calls it runs."""

    def __init__(self) -> None:
        self.wall: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.cpu: collections.defaultdict[str, float] = collections.defaultdict(float)

    def run(self, key: str, fn, *args):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.cpu[key] += time.process_time() - c0
            self.wall[key] += time.perf_counter() - w0


def secure_round(s: Shapes, n: int, drop: float, value_bits: int, rng: np.random.Generator) -> dict:
    """One SecAgg+ round of n devices over the method's shared coordinates, drop x n of them dropping after
    sharing; sizes and times of everything it adds."""
    from edgelora.edge_client.secagg import SecAggDevice
    from edgelora.protos import serde
    from edgelora.server import secagg as secagg_server
    from edgelora.server.secagg import SecAggServer

    run = load_config({"server": {"devices_per_round": n}, "data": {"num_devices": n}, "secure": {"enabled": True}})
    k, t = secure_threshold(run, n)
    spec = plan_ring(n, value_bits, CLIP, weight_cap=EXAMPLES)
    up = coords.secure_upload(s.rule, "random-k", spec, seed=7)  # FLASC's S: a seeded random 1/16
    m = coords.count(up, s.shapes, s.structure, s.masked)
    setup = Setup(round=1, session=secrets.token_bytes(16), devices=tuple(f"d{i:03d}" for i in range(n)),
                  neighbours=k, threshold=t, graph_seed=11, bits=spec.bits, length=ring_length(m, spec))
    dropped = set(rng.choice(setup.devices, size=int(round(drop * n)), replace=False).tolist())
    server = SecAggServer(setup)
    devices = {d: SecAggDevice(d, setup) for d in setup.devices}
    up_bytes = dict.fromkeys(setup.devices, 0)
    down_bytes = dict.fromkeys(setup.devices, 0)
    clock = Stopwatch()
    on_server = functools.partial(clock.run, "server")

    setup_bytes = serde.prompt_over_the_wire(1, setup)[1]
    for d in setup.devices:
        msg = clock.run(d, devices[d].advertise)
        up_bytes[d] += serde.advertise_to_proto(1, msg).ByteSize()
        down_bytes[d] += setup_bytes
        on_server(server.advertise, msg)
    on_server(server.close_advertise)
    for d in setup.devices:
        peers = on_server(server.peers_for, d)
        down_bytes[d] += serde.prompt_over_the_wire(1, peers)[1]
        msg = clock.run(d, devices[d].share, peers)
        up_bytes[d] += serde.share_to_proto(1, msg).ByteSize()
        on_server(server.share, msg)
    on_server(server.close_share)
    # every survivor uploads the same kind of vector: one device's ring encoding, timed, stands for all
    values = rng.normal(0, 0.01, m).astype(np.float32)
    vector = clock.run("encode", ring_encode, values, EXAMPLES, spec, np.random.default_rng(0))
    survivors = [d for d in setup.devices if d not in dropped]
    for d in survivors:
        inp = on_server(server.masking_input_for, d)
        down_bytes[d] += sum(len(b) for b in inp.incoming.values())
        masked = clock.run(d, devices[d].mask, vector, inp)
        payload = clock.run(d, codec.encode_ring, masked, spec.bits)
        up_bytes[d] += len(payload)
        clock.run("sum", server.add_masked, d, codec.decode_ring(payload, bits=spec.bits, count=setup.length))
    unmasking = functools.partial(clock.run, "unmask")
    # the Shamir reconstructions' share of it (pycryptodome's GF(2^128) arithmetic is pure Python)
    combine = secagg_server.shamir_combine
    secagg_server.shamir_combine = functools.partial(clock.run, "shamir", combine)
    try:
        unmasking(server.close_uploads)
        request = unmasking(server.unmask_request)
        for d in survivors:
            down_bytes[d] += serde.prompt_over_the_wire(1, request)[1]
            reply = clock.run(d, devices[d].unmask, request)
            up_bytes[d] += serde.unmask_to_proto(1, reply).ByteSize()
            unmasking(server.unmask, reply)
        total = unmasking(server.result)
    finally:
        secagg_server.shamir_combine = combine
    expected = (vector.astype(np.int64) * len(survivors)) % (1 << spec.bits)
    if not np.array_equal(total.astype(np.int64), expected):
        raise AssertionError(f"{n} devices: the unmasked sum is not the clear sum")
    upload = codec.ring_payload_size(setup.length, spec.bits)
    key_up = float(np.mean([up_bytes[d] for d in survivors])) - upload
    device_s = max(clock.wall[d] for d in survivors) + clock.wall["encode"]  # each survivor encodes once
    return {"coordinates": m, "ring_bits": spec.bits, "neighbours": k, "threshold": t, "dropped": len(dropped),
            "secure_upload_bytes": upload, "key_bytes_up": round(key_up, 1),
            "secure_bytes_up": round(upload + key_up, 1),
            "secure_bytes_down_extra": round(float(np.mean([down_bytes[d] for d in survivors])), 1),
            "device_secure_s": round(device_s, 4),
            "coordinator_key_s": round(clock.wall["server"], 4), "sum_cpu_s": round(clock.cpu["sum"], 4),
            "unmask_cpu_s": round(clock.cpu["unmask"], 4),
            "shamir_cpu_s": round(clock.cpu["shamir"], 4), "unmask_wall_s": round(clock.wall["unmask"], 4),
            "extra_seconds": round(device_s + clock.wall["server"] + clock.wall["unmask"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.secagg", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="append the records to this file (JSON lines)")
    ap.add_argument("--plot", help="draw bytes per device against devices a round into this PNG (from every "
                                   "record in --json when given)")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--devices", default="10,50,100")
    ap.add_argument("--drop", type=float, default=0.1, help="the fraction of a round's devices that drop after sharing")
    ap.add_argument("--value-bits", type=int, default=8, help="q, bits per value before the ring's carry bits")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    records = []
    print(f"{'model':8} {'method':11} {'n':>4} {'coords':>9} {'b':>3} {'plain B/dev':>12} {'secure B/dev':>13} "
          f"{'x plain':>8} {'Flower B':>12} {'/secure':>8} {'extra s':>8} {'unmask cpu s':>13}")
    for model in a.models.split(","):
        for method in a.methods.split(","):
            s = build(model, method)
            plain, plain_s = plain_upload_bytes(s, rng)
            for n in (int(x) for x in a.devices.split(",")):
                r = secure_round(s, n, a.drop, a.value_bits, rng)
                rec = {"model": model, "method": method, "devices": n, "value_bits": a.value_bits,
                       "parameters": s.parameters,
                       "plain_bytes_up": plain, "plain_encode_s": round(plain_s, 4), **r,
                       "flower_secaggplus_bytes": FLOWER_BYTES_PER_PARAMETER * s.parameters}
                rec["secure_over_plain"] = round(rec["secure_bytes_up"] / plain, 3)
                rec["flower_over_secure"] = round(rec["flower_secaggplus_bytes"] / rec["secure_bytes_up"], 2)
                records.append(rec)
                print(f"{model:8} {method:11} {n:>4} {r['coordinates']:>9,} {r['ring_bits']:>3} {plain:>12,} "
                      f"{r['secure_bytes_up']:>13,.0f} {rec['secure_over_plain']:>8.2f} "
                      f"{rec['flower_secaggplus_bytes']:>12,} {rec['flower_over_secure']:>8.1f} "
                      f"{r['extra_seconds']:>8.2f} {r['unmask_cpu_s']:>13.3f}", flush=True)
    if a.json:
        with open(a.json, "a") as f:  # appends: one file collects several invocations (e.g. two --value-bits)
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    if a.plot:
        if a.json:  # every record in the file, this invocation's and earlier ones
            with open(a.json) as f:
                records = [json.loads(line) for line in f if line.strip()]
        plot(records, a.plot)
    return 0


def plot(records: list[dict], path: str) -> None:
    """Bytes a device uploads per round against the round's devices, log scale: plain, secure (each q) and
    Flower's SecAgg+, one panel per (model, method)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    bits = sorted({r["value_bits"] for r in records})
    colours = dict(zip(bits, ("tab:green", "tab:orange", "tab:red", "tab:purple")))
    fig, axes = plt.subplots(len(models), len(methods), figsize=(3.4 * len(methods), 3.0 * len(models)),
                             squeeze=False)
    for ax, (model, method) in zip(axes.flat, [(mo, me) for mo in models for me in methods]):
        rows = sorted((r for r in records if (r["model"], r["method"]) == (model, method)),
                      key=lambda r: (r["value_bits"], r["devices"]))
        first = [r for r in rows if r["value_bits"] == rows[0]["value_bits"]]
        n = [r["devices"] for r in first]
        ax.plot(n, [r["flower_secaggplus_bytes"] for r in first], "k--", label="Flower SecAgg+")
        ax.plot(n, [r["plain_bytes_up"] for r in first], "o-", color="tab:blue", label="plain (not secure)")
        for q in sorted({r["value_bits"] for r in rows}):
            these = [r for r in rows if r["value_bits"] == q]
            ax.plot([r["devices"] for r in these], [r["secure_bytes_up"] for r in these], "s-", color=colours[q],
                    label=f"secure, q = {q}")
        ax.set_yscale("log")
        ax.set_title(f"{model}: {method}", fontsize=9)
        ax.set_xlabel("devices a round")
        ax.set_xticks(n)
    for row in axes:
        row[0].set_ylabel("bytes up per device, a round")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
