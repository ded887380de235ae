"""The server decodes uploads in several threads at once (the gRPC servicer's pool): decoding must be thread-safe."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgelora import codec


def test_concurrent_decodes_all_succeed_and_agree():
    rng = np.random.default_rng(0)
    bundles = [codec.encode_bundle({f"t{j}": codec.Dense(rng.normal(size=(256, 384)).astype(np.float32) * 1e-3)
                                    for j in range(4)}) for _ in range(4)]
    expected = [codec.decode_bundle(b) for b in bundles]

    def decode(i: int):
        return i % 4, codec.decode_bundle(bundles[i % 4])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode, range(64)))
    for i, got in results:
        for name, t in got.items():
            np.testing.assert_array_equal(t.values, expected[i][name].values)
