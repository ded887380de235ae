import numpy as np
import pytest

from edgelora.server.aggregation import RunningMean, fedavg_step


def test_running_mean_weights_by_examples():
    agg = RunningMean()
    agg.add({"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}, 1)
    agg.add({"w": np.array([[5.0, 6.0], [7.0, 8.0]], np.float32)}, 3)
    # (1*1 + 3*5)/4 = 4, ...
    np.testing.assert_allclose(agg.mean()["w"], [[4.0, 5.0], [6.0, 7.0]])
    new = fedavg_step({"w": np.zeros((2, 2), np.float32)}, agg.mean())
    np.testing.assert_allclose(new["w"], [[4.0, 5.0], [6.0, 7.0]])


def test_running_mean_memory_does_not_grow_with_devices():
    agg = RunningMean()
    for i in range(50):
        agg.add({"a": np.full(3, i, np.float32)}, 1)
    assert len(agg.sum) == 1 and agg.count == 50
    np.testing.assert_allclose(agg.mean()["a"], np.full(3, 24.5))


def test_running_mean_rejects_empty_and_bad_weight():
    with pytest.raises(ValueError):
        RunningMean().mean()
    with pytest.raises(ValueError):
        RunningMean().add({"a": np.zeros(1)}, 0)


def test_every_aggregator_config_has_its_aggregator_and_back():
    """The [aggregator] section's configs (schema, read by load_config) and the server's aggregators are one
    registry split in two: every name on both sides, each aggregator with its own config class."""
    from edgelora.schema import AGGREGATOR_CONFIGS
    from edgelora.server.aggregation import AGGREGATORS

    assert set(AGGREGATOR_CONFIGS) == set(AGGREGATORS) == {"fedavg", "fedadam", "median", "trimmed-mean", "dp-fedavg"}
    assert all(AGGREGATORS[n].Config is AGGREGATOR_CONFIGS[n] for n in AGGREGATORS)
