"""Feed random and mutated bundles to decode_flat (and so decode_bundle); count decoded, rejected (CodecError) and crashed.

    python -m benchmarks.fuzz_codec --iterations 100000

A crash is any other exception, a decode slower than --timeout, or a "decoded" result that breaks the
codec's promises (non-float32 or non-finite values, indices unsorted or out of range, wrong counts). Most
mutations re-seal the bundle (valid CRC, recompressed header) so they reach the checks behind the checksum.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import signal
import struct
import time
import tracemalloc
import zlib

import numpy as np
import zstandard

from edgelora import codec
from edgelora.codec import header as hdr, rans, zstd_frame
from edgelora.codec.container import assemble, take_apart


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test swallows it."""


def seed_bundles(rng: np.random.Generator) -> list[bytes]:
    """Small valid bundles covering every form, value type and index coder."""
    sparse_idx = np.sort(rng.choice(5000, 50, replace=False))
    bitmap_idx = np.flatnonzero(rng.random(20_000) < 0.7)
    seeds = [
        codec.encode_bundle({"w": codec.Dense(rng.normal(size=(4, 5)))}),
        codec.encode_bundle({"s": codec.Dense(np.float32(2.5)), "e": codec.Dense(np.zeros((0, 3)))},
                            value_type="float16"),
        codec.encode_bundle({"s": codec.Sparse((50, 100), sparse_idx, rng.normal(size=50))}, value_type="bfloat16"),
        codec.encode_bundle({"m": codec.Masked((16, 16), 9, 0.25, rng.normal(size=64))}, value_type="int8"),
        codec.encode_bundle({"full": codec.Sparse((8,), np.arange(8), np.ones(8)), "none": codec.Sparse((8,), [], [])}),
        codec.encode_bundle({"a": codec.Dense(rng.normal(size=3)), "b": codec.Sparse((300,), [1, 7, 299], [1, 2, 3]),
                             "c": codec.Masked((30,), 1, 0.5, rng.normal(size=15))}, value_types={"a": "int8"}),
        codec.encode_bundle({"q": codec.Dense(rng.normal(size=37)),
                             "t": codec.Sparse((400,), np.sort(rng.choice(400, 21, replace=False)), rng.normal(size=21))},
                            value_type="int4_block", block_size=8, value_types={"q": "int8_block"}),
        codec.encode_bundle({"m": codec.Masked((16, 16), 2, 0.5, rng.normal(size=128))}, value_type="int4_block",
                            rounding="stochastic", seed=5),
        # version 3: three sparse tensors share the joint index stream, beside a dense one
        codec.encode_bundle({"j1": codec.Sparse((40, 5), np.sort(rng.choice(200, 9, replace=False)), rng.normal(size=9)),
                             "d": codec.Dense(rng.normal(size=4)), "j2": codec.Sparse((64,), [0, 63], [1, 2]),
                             "j3": codec.Sparse((3,), [], [])}, value_type="float16"),
        # version 4: the same stream as byte gaps (one of them 255 or more: a u64 remainder follows the bytes)
        codec.encode_bundle({"g1": codec.Sparse((40, 5), np.sort(rng.choice(200, 9, replace=False)), rng.normal(size=9)),
                             "g2": codec.Sparse((600,), [2, 400, 599], [1, 2, 3])}, byte_gap_slack=100.0),
        # version 4: a tensor 70 % full, whose indices are its bitmap through zstd
        codec.encode_bundle({"bm": codec.Sparse((20_000,), bitmap_idx, np.ones(bitmap_idx.size, np.float32))}),
    ]
    # rANS is only chosen for large tensors; build a small one by hand so fuzzing reaches its decoder cheaply.
    n, idx = 4000, np.flatnonzero(rng.random(4000) < 0.4)
    table, _, _ = take_apart(codec.encode_bundle({"r": codec.Sparse((n,), idx, np.zeros(idx.size))}))
    payload = rans.encode(idx, n, 10)
    table.entries[0] = dataclasses.replace(table.entries[0], index_coder=2, index_param=10, index_size=len(payload))
    planes = [b"\0" * idx.size] * 4
    table.plane_sizes = [idx.size] * 4
    seeds.append(assemble(table, [payload], b"".join(planes)))
    return seeds


def reseal(data: bytes) -> bytes:
    """Recompute the trailing CRC so a mutation is judged by the checks behind it."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])) if len(data) >= 4 else data


EXTREMES = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**40, 255]


def mutate_bits(rng, data):
    out = bytearray(data)
    for _ in range(rng.integers(1, 9)):
        pos = int(rng.integers(0, len(out) * 8))
        out[pos // 8] ^= 1 << (pos % 8)
    return reseal(bytes(out)) if rng.random() < 0.7 else bytes(out)


def mutate_truncate(rng, data):
    cut = bytes(data[:rng.integers(0, len(data))])
    return cut + struct.pack("<I", zlib.crc32(cut)) if rng.random() < 0.5 else cut


def mutate_splice(rng, data):
    pos = int(rng.integers(0, len(data)))
    if rng.random() < 0.5:
        out = data[:pos] + rng.bytes(int(rng.integers(1, 64))) + data[pos:]
    else:
        out = data[:pos] + data[pos + int(rng.integers(1, 64)):]
    return reseal(out)


def mutate_header_bytes(rng, data):
    """Overwrite a 1-, 2-, 4- or 8-byte field of the decompressed header with an extreme value."""
    table, index_payloads, section = take_apart(data)
    raw = bytearray(hdr.pack_header(table))
    width = int(rng.choice([1, 2, 4, 8]))
    pos = int(rng.integers(0, max(1, len(raw) - width + 1)))
    if rng.random() < 0.6:
        value = int(rng.choice(EXTREMES)) % (1 << 8 * width)
    else:
        value = int(rng.integers(0, 1 << 8 * width - 1))
    raw[pos:pos + width] = value.to_bytes(width, "little")
    if rng.random() < 0.2:
        raw = raw[:rng.integers(0, len(raw))] if rng.random() < 0.5 else raw + rng.bytes(int(rng.integers(1, 16)))
    return assemble(table, index_payloads, section, header_frame=zstd_frame.compress(bytes(raw), 1))


def mutate_entry_field(rng, data):
    table, index_payloads, section = take_apart(data)
    if not table.entries:
        return data
    i = int(rng.integers(0, len(table.entries)))
    e = table.entries[i]
    field = str(rng.choice(["shape", "count", "index_param", "index_size", "seed", "density", "scale", "plane",
                            "joint"]))
    if field == "joint":  # the joint stream's size (written only in version 3 and 4 headers)
        value = int(rng.choice(EXTREMES)) if rng.random() < 0.5 else table.joint_size + int(rng.integers(-3, 4))
        table.joint_size = max(0, min(2**64 - 1, value))
    elif field == "shape":
        e.shape = tuple(int(rng.choice([0, 1, 3, 2**20, 2**31, 2**62])) for _ in range(rng.integers(0, 4)))
    elif field in ("count", "index_param", "index_size", "seed"):
        value = int(rng.choice(EXTREMES)) if rng.random() < 0.5 else getattr(e, field) + int(rng.integers(-3, 4))
        setattr(e, field, max(0, min(2**64 - 1, value)))
    elif field in ("density", "scale"):
        setattr(e, field, float(rng.choice([math.nan, math.inf, -1.0, 0.0, 1e-45, 3e38, 0.5, 1.0])))
    else:
        j = int(rng.integers(0, 4))
        table.plane_sizes[j] = max(0, min(2**64 - 1, table.plane_sizes[j] + int(rng.choice([-1, 1, 2**62]))))
    return assemble(table, index_payloads, section)


def mutate_payload(rng, data):
    """Corrupt an index payload or a value plane, keeping the table's sizes consistent."""
    table, index_payloads, section = take_apart(data)
    sparse = [i for i, p in enumerate(index_payloads) if p]
    if sparse and rng.random() < 0.6:
        i = int(rng.choice(sparse))
        bad = bytearray(index_payloads[i])
        for _ in range(rng.integers(1, 4)):
            bad[rng.integers(0, len(bad))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            bad = bad[:rng.integers(0, len(bad))] + rng.bytes(int(rng.integers(0, 8)))
        index_payloads[i] = bytes(bad)
        if data[4] >= 3 and i == 0:  # versions 3 and 4: the joint index stream comes first
            table.joint_size = len(bad)
        else:
            table.entries[i - (data[4] >= 3)].index_size = len(bad)
        return assemble(table, index_payloads, section)
    return reseal(data[:-4 - len(section)] + rng.bytes(len(section)) + data[-4:])


def make_bomb(declared: int) -> bytes:
    """A small zstd frame of 64 MiB of zeros that declares `declared` bytes (a lie unless 64 MiB).

    Built a MiB at a time so making it does not itself raise the process's peak memory."""
    size = 64 << 20
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj(size=size)
    chunk = b"\0" * (1 << 20)
    frame = bytearray(b"".join(compressor.compress(chunk) for _ in range(size // len(chunk))) + compressor.flush())
    assert frame[4] >> 6 == 2  # 4-byte content size right after the descriptor and window byte
    frame[6:10] = struct.pack("<I", declared & 0xFFFFFFFF)
    return bytes(frame)


def mutate_bomb(rng, data, bombs):
    table, index_payloads, section = take_apart(data)
    bomb = bombs[int(rng.integers(0, len(bombs)))]
    if rng.random() < 0.3:
        return assemble(table, index_payloads, section, header_frame=bomb)
    j = int(rng.integers(0, 4))
    planes, pos = [], 0
    for size in table.plane_sizes:
        planes.append(section[pos:pos + size])
        pos += size
    planes[j], table.plane_codecs[j], table.plane_sizes[j] = bomb, hdr.ZSTD, len(bomb)
    return assemble(table, index_payloads, b"".join(planes))


def mutate_random(rng, data):
    body = rng.bytes(int(rng.integers(0, 300)))
    return reseal(b"ELCB\x01\0\0\0" + body) if rng.random() < 0.5 else body


MUTATORS = {"bits": mutate_bits, "truncate": mutate_truncate, "splice": mutate_splice, "header": mutate_header_bytes,
            "entry": mutate_entry_field, "payload": mutate_payload, "bomb": None, "random": mutate_random}


def check_promises(flat: codec.Flat) -> None:
    """What any successful decode guarantees (decode_flat's arrays, and the tensors decode_bundle makes of
    them); a violation is a crash."""
    assert flat.values.dtype == np.float32 and flat.values.size == flat.starts[-1]
    if flat.positions is not None:  # all sparse: strictly increasing, inside the tensors laid end to end
        total = sum(math.prod(s) for s in flat.shapes)
        p = flat.positions
        assert p.dtype == np.int64 and p.size == flat.values.size and np.all(np.diff(p) > 0)
        assert p.size == 0 or (0 <= p[0] and p[-1] < total)
    out = flat.tensors()
    for name, t in out.items():
        values = t.values
        assert isinstance(values, np.ndarray) and values.dtype == np.float32, name
        assert np.isfinite(values).all(), name
        if isinstance(t, codec.Sparse):
            n = math.prod(t.shape)
            assert t.indices.dtype == np.int64 and t.indices.size == values.size, name
            assert np.all(np.diff(t.indices) > 0) and (t.indices.size == 0 or 0 <= t.indices[0] and t.indices[-1] < n)
        if isinstance(t, codec.Masked):
            assert values.size == codec.mask_size(t.shape, t.density), name
        if isinstance(t, codec.Dense):
            assert values.shape == t.values.shape


def run(iterations: int, seed: int, max_elements: int, timeout: float) -> dict:
    rng = np.random.default_rng(seed)
    seeds = seed_bundles(rng)
    bombs = [make_bomb(d) for d in (64 << 20, 58, 2**32 - 1, 1)]
    counts = {"decoded": 0, "rejected": 0, "crashed": 0}
    crashes: list[str] = []

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    tracemalloc.start()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    names = list(MUTATORS)
    for it in range(iterations):
        base = seeds[int(rng.integers(0, len(seeds)))]
        kind = names[int(rng.integers(0, len(names)))]
        data = mutate_bomb(rng, base, bombs) if kind == "bomb" else MUTATORS[kind](rng, base)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            check_promises(codec.decode_flat(data, max_elements=max_elements))
            counts["decoded"] += 1
        except codec.CodecError:
            counts["rejected"] += 1
        except (Exception, Timeout) as exc:
            counts["crashed"] += 1
            if len(crashes) < 10:
                crashes.append(f"iteration {it} ({kind}): {type(exc).__name__}: {exc}"[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if (it + 1) % max(1, iterations // 20) == 0:
            print(f"  {it + 1}/{iterations}  decoded {counts['decoded']}  rejected {counts['rejected']}  "
                  f"crashed {counts['crashed']}  ({time.perf_counter() - start:.0f} s)", flush=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**counts, "crashes": crashes, "tracemalloc_peak_mib": peak / 2**20, "max_rss_mib": rss_peak / 1024,
            "rss_growth_mib": (rss_peak - rss_start) / 1024, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-elements", type=int, default=codec.DEFAULT_MAX_ELEMENTS, help="decode_bundle's cap")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds before a decode counts as a hang")
    args = parser.parse_args(argv)
    print(f"fuzzing decode_bundle: {args.iterations} iterations, seed {args.seed}, max_elements {args.max_elements}")
    r = run(args.iterations, args.seed, args.max_elements, args.timeout)
    print(f"decoded: {r['decoded']}\nrejected: {r['rejected']}\ncrashed: {r['crashed']}")
    for line in r["crashes"]:
        print("  " + line)
    print(f"peak traced memory: {r['tracemalloc_peak_mib']:.1f} MiB (target < 64 MiB); process max RSS "
          f"{r['max_rss_mib']:.1f} MiB, grew {r['rss_growth_mib']:.1f} MiB while fuzzing; {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
