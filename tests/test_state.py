import numpy as np
import pytest

from edgelora.server.checkpoint import load_state, save_state
from edgelora.state import ServerState
from edgelora.tasks import Stage


def _state(v: float, rnd: int) -> ServerState:
    return ServerState(round=rnd, stage=Stage.LORA, stage_start=3, params={"a.weight": np.full((2, 3), v, np.float32)},
                       opt_state={"step": np.array([2.0], np.float32)}, method_state={"acc": np.ones(4, np.float32)},
                       rng=np.random.PCG64(5).state,
                       devices={"7": {"uplink_bps": 1.5e6, "downlink_bps": 8e6, "up_bytes_per_entry": 3.25}})


def test_state_round_trips_exactly(tmp_path):
    s = _state(0.125, 4)
    save_state(s, tmp_path)
    back = load_state(tmp_path)
    assert (back.round, back.stage, back.stage_start, back.rng) == (4, Stage.LORA, 3, s.rng)
    np.testing.assert_array_equal(back.params["a.weight"], s.params["a.weight"])
    np.testing.assert_array_equal(back.opt_state["step"], [2.0])
    np.testing.assert_array_equal(back.method_state["acc"], np.ones(4))
    assert back.devices == s.devices  # measured links survive a restart (bandwidth-aware densities)


def test_a_crash_between_renames_keeps_the_previous_state(tmp_path):
    save_state(_state(1.0, 1), tmp_path)
    (tmp_path / "state").rename(tmp_path / "state.old")  # as if killed after moving the old one aside
    assert load_state(tmp_path).round == 1
    save_state(_state(2.0, 2), tmp_path)
    assert load_state(tmp_path).round == 2 and not (tmp_path / "state.old").exists()


def test_no_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no server state"):
        load_state(tmp_path)
