"""bytes <-> named sparse/dense tensors. Imports numpy and zstandard only: no gRPC, no torch, nothing of
edgelora outside this package.

Public interface (stable; everything else in this package is internal):

- ``Dense(values)``: every value of a tensor.
- ``Sparse(shape, indices, values)``: sorted unique flat indices + their values (FLASC top-k).
- ``Masked(shape, seed, density, values)``: values only, in the order of ``mask_indices(seed, name, shape,
  density)``, which both sides derive; the mask itself never travels (SLoRA Stage 1, sparse fine-tuning).
- ``encode_bundle(tensors, value_type=..., level=..., value_types=..., joint_indices=True,
  byte_gap_slack=0.01) -> bytes`` and ``decode_bundle(data, max_elements=...) -> dict``; FORMAT.md specifies
  the bytes.
- ``decode_flat(data, max_elements=...) -> Flat``: the same bundle as whole-bundle arrays (every value in one
  array; for an all-sparse bundle every value's position in one array), for readers that add bundles.
- ``to_dense(name, tensor) -> np.ndarray``; ``mask_indices(...)``, ``mask_size(...)``; ``CodecError``.
- ``index_bound_bits(n, k)``: log2(C(n, k)), the fewest bits any index coding can average.
- ``bytes_per_value(value_type)``: what one value of a type costs, before entropy coding (planning budgets).
- ``encode_ring(values, bits) -> bytes`` and ``decode_ring(data, bits=, count=)``: secure aggregation's
  b-bit ring values packed at exactly b bits each (FORMAT.md, "Ring payloads"); ``ring_payload_size``.
"""
from .container import DEFAULT_MAX_ELEMENTS, Flat, decode_bundle, decode_flat, encode_bundle
from .errors import CodecError
from .index_coding import bound_bits as index_bound_bits
from .mask import mask_indices, mask_size
from .ring import decode_ring, encode_ring, ring_payload_size
from .tensors import Dense, Masked, Sparse, Tensor, to_dense
from .values import VALUE_TYPES, bytes_per_value

__all__ = [
    "CodecError", "Dense", "Masked", "Sparse", "Tensor", "to_dense", "VALUE_TYPES", "bytes_per_value",
    "mask_indices", "mask_size", "encode_bundle", "decode_bundle", "decode_flat", "Flat", "DEFAULT_MAX_ELEMENTS", "index_bound_bits",
    "encode_ring", "decode_ring", "ring_payload_size",
]
