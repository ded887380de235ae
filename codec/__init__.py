"""bytes <-> named sparse/dense tensors. numpy + zstandard only: no gRPC, no torch.

Public interface (stable; everything else in this package is internal):

- ``Dense(values)``: every value of a tensor.
- ``Sparse(shape, indices, values)``: sorted unique flat indices + their values (FLASC top-k).
- ``Masked(shape, seed, density, values)``: values only, in the order of ``mask_indices(seed, name, shape,
  density)``, which both sides derive; the mask itself never travels (SLoRA Stage 1, sparse fine-tuning).
- ``encode_bundle(tensors, value_type=..., level=..., value_types=...) -> bytes`` and
  ``decode_bundle(data, max_elements=...) -> dict``; FORMAT.md specifies the bytes.
- ``to_dense(name, tensor) -> np.ndarray``; ``mask_indices(...)``, ``mask_size(...)``; ``CodecError``.
- ``index_bound_bits(n, k)``: log2(C(n, k)), the fewest bits any index coding can average.
"""
from .errors import CodecError
from .tensors import Dense, Masked, Sparse, Tensor, to_dense
from .values import VALUE_TYPES
from .mask import mask_indices, mask_size
from .container import decode_bundle, encode_bundle, DEFAULT_MAX_ELEMENTS
from .index_coding import bound_bits as index_bound_bits

__all__ = [
    "CodecError", "Dense", "Masked", "Sparse", "Tensor", "to_dense", "VALUE_TYPES",
    "mask_indices", "mask_size", "encode_bundle", "decode_bundle", "DEFAULT_MAX_ELEMENTS", "index_bound_bits",
]
