"""bytes <-> named sparse/dense tensors. numpy + zstandard only: no gRPC, no torch.

Public interface (stable; everything else in this package is internal):

- ``Dense(values)``: every value of a tensor.
- ``Sparse(shape, indices, values)``: sorted unique flat indices + their values (FLASC top-k).
- ``Masked(shape, seed, density, values)``: values only, in the order of ``mask_indices(seed, name, shape,
  density)``, which both sides derive; the mask itself never travels (SLoRA Stage 1, sparse fine-tuning).
- ``encode_bundle(tensors, value_type=...) -> bytes`` and ``decode_bundle(data, ...) -> dict``.
- ``to_dense(name, tensor) -> np.ndarray``; ``mask_indices(...)``; ``CodecError``.
"""
from .errors import CodecError
from .tensors import Dense, Masked, Sparse, Tensor, to_dense, VALUE_TYPES
from .mask import mask_indices, mask_size
from .bundle import decode_bundle, encode_bundle, DEFAULT_MAX_ELEMENTS

__all__ = [
    "CodecError", "Dense", "Masked", "Sparse", "Tensor", "to_dense", "VALUE_TYPES",
    "mask_indices", "mask_size", "encode_bundle", "decode_bundle", "DEFAULT_MAX_ELEMENTS",
]
