"""A short run of the fuzzer: hostile bundles may be rejected, never crash or break a decoded tensor's promises."""
import numpy as np
import pytest

from benchmarks.fuzz_codec import run
from edgelora import codec


def test_short_fuzz_run_has_no_crash():
    result = run(iterations=1500, seed=11, max_elements=codec.DEFAULT_MAX_ELEMENTS, timeout=5.0)
    assert result["crashed"] == 0, result["crashes"]
    assert result["rejected"] > 0 and result["decoded"] > 0  # both paths were exercised


def test_to_dense_fills_base_and_checks_its_inputs():
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = codec.to_dense("s", codec.Sparse((2, 3), np.array([1, 5]), np.array([-1.0, -2.0])), base)
    np.testing.assert_array_equal(out, [[0, -1, 2], [3, 4, -2]])
    assert base[0, 1] == 1  # base is not modified
    with pytest.raises(codec.CodecError, match="indices"):
        codec.to_dense("s", codec.Sparse((2, 3), np.array([6]), np.array([1.0])))
    with pytest.raises(codec.CodecError, match="values"):
        codec.to_dense("m", codec.Masked((2, 3), 0, 0.5, np.ones(2)))
    with pytest.raises(codec.CodecError, match="base shape"):
        codec.to_dense("s", codec.Sparse((2, 3), np.array([1]), np.ones(1)), np.zeros(6))
