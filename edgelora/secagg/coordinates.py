"""The coordinates a secure round's uploads share. Pairwise masks cancel only where every device adds them, so
every device of a round uploads the same coordinate set S, and S must be known to the coordinator before any
upload (the notes' "Sparse uploads"). Both sides derive S here from what both hold (the structure's mask, a
round seed, the round's download), so no index ever travels; docs/security.md says what S reveals.

A coordinate set maps each trainable tensor, in sorted name order, to its sorted flat indices (None: the whole
tensor). `gather` lays a delta out as one vector in that order, `scatter` puts a vector back."""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np

from edgelora import codec
from edgelora.sparsity import global_topk, topk_count
from edgelora.secagg.ring import RingSpec
from edgelora.tasks import Coordinates, SecureUpload, Structure, UploadFormat, UploadRule

CoordinateSets = dict[str, "np.ndarray | None"]


def secure_upload(rule: UploadRule, choice: str, ring: RingSpec, seed: int) -> SecureUpload:
    """How a secure round uploads what `rule` asks for: every entry for a dense upload, the structure's mask
    for a masked one, and for top-k (FLASC) `choice` (secure.coordinates) at the rule's density; `seed` draws
    random-k's set and is 0 otherwise."""
    how = {UploadFormat.DENSE: Coordinates.ALL, UploadFormat.MASKED: Coordinates.MASK}.get(rule.format,
                                                                                           Coordinates(choice))
    return SecureUpload(how, ring, density=rule.density if rule.format == UploadFormat.TOPK else 1.0,
                        seed=seed if how is Coordinates.RANDOM_K else 0)


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
    if how is Coordinates.DOWNLOAD_TOPK:
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
    if at != vector.size:
        raise ValueError(f"vector of {vector.size} values for a coordinate set of {at}")
    return out
