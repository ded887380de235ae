"""Device sampling, the one sampler shared by the gRPC coordinator and the simulator."""
from __future__ import annotations

import numpy as np


def device_sort_key(device_id: str):
    return (len(device_id), device_id)


def sample_devices(live: list[str], rng_state: dict, k: int) -> tuple[list[str], dict]:
    """Pick min(k, len(live)) of `live` without replacement from the checkpointed PCG64 state.

    Returns the picks in numeric id order (the order uploads are aggregated in the simulator) and the
    advanced RNG state, which the caller stores in ServerState.rng so a resumed run draws the same devices."""
    bitgen = np.random.PCG64()
    bitgen.state = rng_state
    k = min(k, len(live))
    picked = np.random.Generator(bitgen).choice(len(live), size=k, replace=False)
    return sorted((live[i] for i in picked), key=device_sort_key), bitgen.state
