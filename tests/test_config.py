import pytest

from edgelora.config import load_config
from edgelora.configtools import ConfigError


def test_defaults_are_the_demo_setting():
    cfg = load_config(None)
    assert cfg.model.name == "minilm" and cfg.data.dataset == "20newsgroups"
    assert cfg.method.name == "lora" and cfg.aggregator.name == "fedavg"


@pytest.mark.parametrize("raw, field", [
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"server": {"rounds": 0}}, "server.rounds"),
    ({"server": {"chunk_bytes": 8 << 20}}, "server.chunk_bytes"),
    ({"data": {"partition": "random"}}, "data.partition"),
    ({"data": {"remove": ["signatures"]}}, "data.remove"),
    ({"model": {"nme": "x"}}, "model"),
    ({"method": {"name": "lora", "lora": {"rank": 0}}}, "method.lora.rank"),
    ({"method": {"name": "nope"}}, "method.name"),
    ({"servers": {}}, "unknown section"),
    ({"server": {"devices_per_round": 5}}, "server.devices_per_round"),
])
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(raw)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config({"method": {"name": "lora", "lora": {"rank": 4, "rank_pattern": {"pooler.dense": 6}}},
                       "train": {"lr": 0.01}})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
