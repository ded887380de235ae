import re

import pytest

from edgelora.config import load_config
from edgelora.configtools import ConfigError


def test_defaults_are_the_demo_setting():
    cfg = load_config(None)
    assert cfg.model.name == "minilm" and cfg.data.dataset == "20newsgroups"
    assert cfg.method.name == "lora" and cfg.aggregator.name == "fedavg"


def test_value_type_defaults_to_the_methods_and_is_saved_resolved():
    """FLASC's measured best (docs/communication.md): 4-bit blockwise values and error feedback; every other
    method float32. The resolved type is what config.toml records, so a run folder says what it sent."""
    flasc = load_config({"method": {"name": "flasc"}})
    assert flasc.server.value_type == "int4_block" and flasc.method.error_feedback is True
    assert 'value_type = "int4_block"' in flasc.to_toml()
    assert load_config(None).server.value_type == "float32"
    assert load_config({"method": {"name": "flasc"}, "server": {"value_type": "float16"}}).server.value_type == "float16"
    for raw, field in [({"server": {"value_type": "int5"}}, "server.value_type"),
                       ({"server": {"download_value_type": "fp8"}}, "server.download_value_type"),
                       ({"server": {"rounding": "up"}}, "server.rounding")]:
        with pytest.raises(ConfigError, match=re.escape(field)):
            load_config(raw)


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
    ({"aggregator": {"name": "krum"}}, "aggregator.name"),
    ({"aggregator": {"name": "fedadam", "lr": 0}}, "aggregator.lr"),
    ({"aggregator": {"name": "fedavg", "lr": 0.01}}, "unknown key(s) ['lr']"),  # fedavg has no server lr
    ({"server": {"pace_s": -1.0}}, "server.pace_s"),
    # devices told to come back after up to 1.5 x 40 s (+ a heartbeat) would look dead at a 60 s timeout
    ({"server": {"pace_s": 40.0, "device_timeout_s": 60.0}}, "server.pace_s"),
])
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(raw)


def test_run_folders_written_before_the_aggregator_registry_still_load():
    """They carry FedAdam's fields under fedavg, at their defaults: dropped, so resume and sweeps go on."""
    old = {"aggregator": {"name": "fedavg", "lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
                          "weight_decay": 0.0, "weighted": False}}
    assert load_config(old).aggregator == load_config({"aggregator": {"name": "fedavg", "weighted": False}}).aggregator


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


def test_relative_data_paths_resolve_against_the_config_files_folder(tmp_path, monkeypatch):
    from edgelora.config import load_config

    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "cfg" / "run.toml").write_text('[data]\ndataset = "jsonl"\npath = "data/train.jsonl"\n'
                                               'test_path = "data/test.jsonl"\n')
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    cfg = load_config("cfg/run.toml")
    assert cfg.data.path == str(tmp_path / "cfg" / "data" / "train.jsonl")
    assert cfg.data.test_path == str(tmp_path / "cfg" / "data" / "test.jsonl")  # resolved even before it exists
    # a Hugging Face dataset name is not a path
    (tmp_path / "cfg" / "hf.toml").write_text('[data]\ndataset = "hf"\npath = "ag_news"\n')
    assert load_config("cfg/hf.toml").data.path == "ag_news"


def test_a_path_written_relative_to_the_working_directory_still_loads_with_a_warning(tmp_path, monkeypatch,
                                                                                      caplog):
    from edgelora.config import load_config

    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.toml").write_text('[data]\ndataset = "jsonl"\npath = "d.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="edgelora.config"):
        cfg = load_config("runs/r1/config.toml")
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert "relative to the working directory" in caplog.text


@pytest.mark.parametrize("extra, field, says", [
    ({"aggregator": {"name": "median"}}, "aggregator.name", "needs every device's update"),
    ({"aggregator": {"name": "trimmed-mean"}}, "aggregator.name", "needs every device's update"),
    ({"aggregator": {"name": "dp-fedavg"}}, "aggregator.name", "distributed DP"),
    ({"aggregator": {"name": "fedavg", "clip_norm": 1.0}}, "aggregator.clip_norm", "secure.l2_clip"),
    ({"server": {"save_updates": True}}, "server.save_updates", "masked"),
    ({"server": {"devices_per_round": 2}}, "server.devices_per_round", "at least 3"),
    ({"method": {"name": "flasc", "tiers": 2}}, "method.tiers", "one coordinate set"),
    ({"method": {"name": "flasc", "density_policy": "deadline"}}, "method.tiers", "deadline densities"),
    ({"secure": {"threshold": 1.0}}, "secure.threshold", "[0, 1)"),
    ({"secure": {"clip": 0.0}}, "secure.clip", "> 0"),
    ({"secure": {"noise_multiplier": 1.0}}, "secure.l2_clip", "sensitivity"),
    ({"secure": {"coordinates": "own-topk"}}, "secure.coordinates", ""),
    ({"secure": {"explore": 1.5}}, "secure.explore", "[0, 1]"),
])
def test_secure_mode_refuses_at_load_what_it_cannot_run_one_line_each(extra, field, says):
    """[secure] with what needs individual updates, or cannot share one coordinate set, is refused when the
    config loads, the line naming the field and why."""
    raw = {"server": {"devices_per_round": 3}, "data": {"num_devices": 5}, "secure": {"enabled": True}}
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        load_config(raw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_secure_config_with_three_devices_and_every_threshold_loads():
    for threshold in (0.0, 0.25, 0.5, 0.99):
        cfg = load_config({"server": {"devices_per_round": 3}, "data": {"num_devices": 5},
                           "secure": {"enabled": True, "threshold": threshold}})
        assert cfg.secure.enabled and cfg.secure.threshold == threshold
