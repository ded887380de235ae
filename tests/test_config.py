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
