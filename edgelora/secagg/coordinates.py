"""The coordinates a secure round's uploads share. Pairwise masks cancel only where every device adds them, so
every device of a round uploads the same coordinate set S, and S must be known to the coordinator before any
upload (the notes' "Sparse uploads"). Both sides derive S here from what both hold (the structure's mask, a
round seed, the round's download), so no index travels up; aggregate-topk's S is chosen by the coordinator
from the last sum it unmasked and travels down with the task. docs/security.md says what S reveals.

A coordinate set maps each trainable tensor, in sorted name order, to its sorted flat indices (None: the whole
tensor). `gather` lays a delta out as one vector in that order, `scatter` puts a vector back."""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np

from edgelora import codec
from edgelora.sparsity import global_topk, largest, topk_count
from edgelora.secagg.ring import RingSpec
from edgelora.tasks import Coordinates, SecureUpload, Structure, UploadFormat, UploadRule

CoordinateSets = dict[str, "np.ndarray | None"]


def secure_upload(rule: UploadRule, choice: str, ring: RingSpec, seed: int, *,
                  shapes: Mapping[str, tuple[int, ...]] | None = None, last: Mapping[str, np.ndarray] | None = None,
                  explore: float = 0.0, weights: str = "energy") -> SecureUpload:
    """How a secure round uploads what `rule` asks for: every entry for a dense upload, the structure's mask
    for a masked one, and for top-k (FLASC) `choice` (secure.coordinates) at the rule's density. `seed` draws
    random-k's set (and aggregate-topk's random share) and is 0 otherwise; aggregate-topk's set is chosen here
    from `last`, the last aggregate, over the trainable `shapes`, and carried as bytes."""
    how = {UploadFormat.DENSE: Coordinates.ALL, UploadFormat.MASKED: Coordinates.MASK}.get(rule.format,
                                                                                           Coordinates(choice))
    density = rule.density if rule.format == UploadFormat.TOPK else 1.0
    indices = b""
    if how is Coordinates.AGGREGATE_TOPK:
        if shapes is None:
            raise ValueError("aggregate-topk coordinates need the trainable shapes")
        indices = encode_sets(aggregate_topk(last or {}, shapes, density, explore, seed, weights), shapes)
    return SecureUpload(how, ring, density=density, seed=seed if how is Coordinates.RANDOM_K else 0, indices=indices)


def aggregate_topk(last: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], density: float,
                   explore: float, seed: int, weights: str = "energy") -> CoordinateSets:
    """aggregate-topk's S: k = topk_count(N, density) coordinates over every tensor (sorted names, flattened
    together), of which the largest |last| entries, at most floor((1 - explore) k) and only entries the last
    aggregate moved (ties toward the lower position), and the rest drawn from the others by `seed`. The top
    alone would never change (the last aggregate is zero off the last S); the random share lets coordinates
    whose error feedback grew on the devices in. It is drawn without replacement with each coordinate weighted
    by its tensor's energy in the last aggregate (mean square over the entries it moved; a tensor it did not
    move gets the mean over all), so the share goes where updates were large (a classifier head, LoRA's B)
    rather than spread evenly; `weights` = "uniform" draws it evenly. No aggregate yet: uniform."""
    if weights not in ("energy", "uniform"):
        raise ValueError(f"aggregate-topk weights {weights!r}: energy or uniform")
    names = sorted(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(bounds[-1])
    k = topk_count(total, density)
    mag = np.concatenate([np.abs(np.asarray(last[n], np.float32)).reshape(-1)
                          if n in last and np.size(last[n]) == size else np.zeros(size, np.float32)
                          for n, size in zip(names, sizes)]) if names else np.zeros(0, np.float32)
    keep = min(int(math.floor((1.0 - explore) * k + 1e-9)), int(np.count_nonzero(mag)))
    kept = largest(mag, keep)
    free = np.ones(total, bool)
    free[kept] = False
    candidates = np.flatnonzero(free)
    weight = np.repeat(_energy(mag, bounds) if weights == "energy" else np.ones(len(names)), sizes)[candidates]
    # Weighted sampling without replacement (Efraimidis and Spirakis 2006): the k - keep largest log(u) / w.
    # numpy's generator suffices: S is public (it travels in the task), not a secret.
    keys = np.log(np.random.default_rng(seed).random(candidates.size)) / weight
    fill = candidates[np.argpartition(-keys, k - keep - 1)[:k - keep]] if k > keep else np.zeros(0, np.int64)
    chosen = np.sort(np.concatenate([kept, fill]).astype(np.int64))
    lo = np.searchsorted(chosen, bounds)
    return {n: chosen[lo[i]:lo[i + 1]] - bounds[i] for i, n in enumerate(names)}


def _energy(mag: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Each tensor's mean square over the entries the aggregate moved; the overall mean where it moved none (all
    ones when it moved nothing)."""
    parts = [mag[lo:hi].astype(np.float64) for lo, hi in zip(bounds[:-1], bounds[1:])]
    sq, moved = np.array([p @ p for p in parts]), np.array([np.count_nonzero(p) for p in parts])
    if not moved.sum() or not sq.sum():
        return np.ones(len(bounds) - 1)
    energy = np.where(moved > 0, sq / np.maximum(moved, 1), sq.sum() / moved.sum())
    return np.maximum(energy, np.finfo(np.float64).tiny)


def encode_sets(sets: CoordinateSets, shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """A coordinate set as codec bytes: one sparse tensor per name with all-zero values, which zstd folds
    away, so the bytes are the index coding's (near log2 C(n, k) bits)."""
    return codec.encode_bundle({n: codec.Sparse(tuple(shapes[n]), idx, np.zeros(idx.size, np.float32))
                                for n, idx in sets.items()}, value_type="int8")


def decode_sets(data: bytes, shapes: Mapping[str, tuple[int, ...]], expected: int) -> CoordinateSets:
    """The inverse of encode_sets, checked against the round's tensors and the k its density gives; any
    mismatch is a ValueError that names it."""
    try:
        tensors = codec.decode_bundle(data, max_elements=max(1, sum(math.prod(s) for s in shapes.values())))
    except codec.CodecError as e:
        raise ValueError(f"aggregate-topk coordinates: {e}") from None
    if sorted(tensors) != sorted(shapes):
        raise ValueError(f"aggregate-topk coordinates name {sorted(tensors)[:3]}..., the round trains "
                         f"{sorted(shapes)[:3]}... ({len(tensors)} against {len(shapes)} tensors)")
    sets = {}
    for n in sorted(shapes):
        t = tensors[n]
        if not isinstance(t, codec.Sparse) or tuple(t.shape) != tuple(shapes[n]):
            raise ValueError(f"aggregate-topk coordinates for {n}: not sparse indices of shape {tuple(shapes[n])}")
        sets[n] = np.asarray(t.indices, np.int64)
    if size(sets, shapes) != expected:
        raise ValueError(f"aggregate-topk coordinates: {size(sets, shapes)} coordinates, the round's density "
                         f"gives {expected}")
    return sets


def coordinate_sets(upload: SecureUpload, shapes: Mapping[str, tuple[int, ...]], structure: Structure,
                    masked: Collection[str], download: Mapping[str, np.ndarray] | None = None) -> CoordinateSets:
    """S for this round. `masked`: the tensors the structure's mask covers; `download`: the round's download as
    the device decodes it (dense arrays), for download-topk."""
    names = sorted(shapes)
    how = upload.coordinates
    if how is Coordinates.ALL:
        return {n: None for n in names}
    if how is Coordinates.MASK:
        return {n: codec.mask_indices(structure.mask_seed, n, tuple(shapes[n]), structure.mask_density)
                if n in masked else None for n in names}
    if how is Coordinates.RANDOM_K:  # the mask generator with this round's seed: a fresh random set each round
        return {n: codec.mask_indices(upload.seed, n, tuple(shapes[n]), upload.density) for n in names}
    if how is Coordinates.AGGREGATE_TOPK:
        return decode_sets(upload.indices, shapes, count(upload, shapes, structure, masked))
    if how is Coordinates.DOWNLOAD_TOPK:
        if download is None:
            raise ValueError("download-topk coordinates need the round's download")
        top = global_topk({n: download[n] for n in names}, upload.density)
        return {n: top[n].indices for n in names}
    raise ValueError(f"unknown coordinates {how!r}")


def count(upload: SecureUpload, shapes: Mapping[str, tuple[int, ...]], structure: Structure,
          masked: Collection[str]) -> int:
    """|S| before S is derived (what sizing the ring's noise needs): from the shapes and densities alone."""
    how = upload.coordinates
    if how in (Coordinates.DOWNLOAD_TOPK, Coordinates.AGGREGATE_TOPK):
        return topk_count(sum(math.prod(s) for s in shapes.values()), upload.density)
    density = {Coordinates.MASK: structure.mask_density, Coordinates.RANDOM_K: upload.density}.get(how, 1.0)
    return sum(codec.mask_size(tuple(s), density) if how is Coordinates.RANDOM_K or n in masked and
               how is Coordinates.MASK else math.prod(s) for n, s in shapes.items())


def size(sets: CoordinateSets, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """|S|: the values one upload carries."""
    return sum(math.prod(shapes[n]) if idx is None else idx.size for n, idx in sets.items())


def gather(delta: Mapping[str, np.ndarray], sets: CoordinateSets) -> np.ndarray:
    """The delta's values at S, as one float32 vector in S's order."""
    parts = [np.asarray(delta[n], np.float32).reshape(-1) if idx is None
             else np.asarray(delta[n], np.float32).reshape(-1)[idx] for n, idx in sets.items()]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def scatter(vector: np.ndarray, sets: CoordinateSets, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A vector in S's order back into tensors (zeros off S), float32."""
    if vector.size != size(sets, shapes):
        raise ValueError(f"vector of {vector.size} values for a coordinate set of {size(sets, shapes)}")
    out, at = {}, 0
    for n, idx in sets.items():
        count = math.prod(shapes[n]) if idx is None else idx.size
        part = np.asarray(vector[at:at + count], np.float32)
        if idx is None:
            out[n] = part.reshape(shapes[n]).copy()
        else:
            out[n] = np.zeros(shapes[n], np.float32)
            out[n].reshape(-1)[idx] = part
        at += count
    return out
