import json
from pathlib import Path

import numpy as np
import pytest

from edgelora.config import DataConfig
from edgelora.configtools import ConfigError
from edgelora.data import device_examples, load_corpus, partition_indices, held_out_examples


def _labels(n=400, classes=5, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_seeded_and_cover(partition):
    labels = _labels()
    cfg = DataConfig(partition=partition, num_devices=8, alpha=0.3, classes_per_device=2, seed=7,
                     max_examples_per_device=0)
    a = partition_indices(labels, cfg)
    b = partition_indices(labels, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same config must give the same partition"
    flat = np.concatenate(a)
    assert len(flat) == len(set(flat.tolist())), "devices must not share examples"
    if partition != "pathological":
        assert len(flat) == len(labels)
    if partition == "pathological":
        assert all(len(set(labels[ix].tolist())) <= 2 for ix in a)


def test_dirichlet_small_alpha_skews_labels():
    labels = _labels(2000, 10)
    skew = lambda alpha: np.mean([np.bincount(labels[ix], minlength=10).max() / max(len(ix), 1) for ix in
                                  partition_indices(labels, DataConfig(partition="dirichlet", alpha=alpha,
                                                                       num_devices=10, max_examples_per_device=0))])
    assert skew(0.05) > skew(100.0) + 0.2


def test_cap_per_device_is_seeded_subsample():
    labels = _labels(1000)
    cfg = DataConfig(partition="iid", num_devices=2, max_examples_per_device=50)
    parts = partition_indices(labels, cfg)
    assert [len(p) for p in parts] == [50, 50]


def test_jsonl_and_csv_with_string_labels(tmp_path):
    rows = [{"t": f"text {i}", "y": ["sports", "politics", "tech"][i % 3]} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("t,y\n" + "\n".join(f"{r['t']},{r['y']}" for r in rows))
    for kind in ("jsonl", "csv"):
        cfg = DataConfig(dataset=kind, path=str(tmp_path / f"d.{kind}"), text_column="t", label_column="y",
                         test_fraction=0.2, num_devices=2, partition="iid")
        corpus = load_corpus(cfg)
        assert corpus.label_names == ("politics", "sports", "tech")
        assert len(corpus.train) == 24 and len(corpus.test) == 6
        ex = device_examples(cfg, 1)
        assert len(ex) == 12 and all(t.startswith("text") for t in ex.texts)


def test_missing_column_names_the_column(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ConfigError, match="data.label_column"):
        load_corpus(DataConfig(dataset="jsonl", path=str(tmp_path / "d.jsonl")))


def test_newsgroups_offline_from_shared_copy():
    cfg = DataConfig(num_devices=4, max_examples_per_device=30, test_max_examples=50)
    if cfg.resolved_data_home() is None:
        pytest.skip("../shared/datasets/20newsgroups is not beside this checkout")
    corpus = load_corpus(cfg)
    assert len(corpus.label_names) == 20 and len(corpus.train) == 11314 and len(corpus.test) == 7532
    assert len(device_examples(cfg, 3)) == 30 and len(held_out_examples(cfg)) == 50
    with pytest.raises(ConfigError, match="outside 0..3"):
        device_examples(cfg, 4)


def test_the_shared_newsgroups_jsonl_reads_as_scikit_learn_returns_it(tmp_path):
    """The fast path (the shared JSONL copy, no scikit-learn) gives fetch_20newsgroups' texts, labels and
    order for both splits, with and without `remove`, against scikit-learn reading its pickled cache (a data
    home without the copy)."""
    import shutil

    from edgelora.data import NEWSGROUPS_JSONL, _newsgroups

    home = DataConfig().resolved_data_home()
    if home is None or not (Path(home) / NEWSGROUPS_JSONL).is_file():
        pytest.skip("../shared/datasets/20newsgroups is not beside this checkout")
    shutil.copy(Path(home) / "20news-bydate_py3.pkz", tmp_path)
    for remove in ((), ("headers", "footers", "quotes"), ("quotes", "headers")):
        fast, sk = _newsgroups(home, remove), _newsgroups(str(tmp_path), remove)
        assert fast.label_names == sk.label_names and len(fast.label_names) == 20
        for a, b in ((fast.train, sk.train), (fast.test, sk.test)):
            assert a.texts == b.texts, remove
            np.testing.assert_array_equal(a.labels, b.labels)
        assert ("Subject:" in fast.train.texts[0]) == (not remove)


@pytest.mark.parametrize("n_examples, n_devices", [(100, 3), (7, 7), (11314, 25), (5, 1)])
def test_iid_shards_are_flwr_datasets_iid_partitions(n_examples, n_devices):
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    from edgelora.data import iid_shards

    order = np.random.default_rng(n_examples).permutation(n_examples)
    part = IidPartitioner(num_partitions=n_devices)
    part.dataset = Dataset.from_dict({"idx": order.tolist()})
    ours = iid_shards(order, n_devices)
    for i in range(n_devices):
        np.testing.assert_array_equal(ours[i], np.sort(part.load_partition(i)["idx"]))


def test_validation_split_is_carved_from_train_and_replaces_the_test_split(tmp_path):
    from edgelora.data import partition_sizes

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(100)))
    plain = DataConfig(dataset="jsonl", path=str(path), test_fraction=0.2, num_devices=2, partition="iid",
                       max_examples_per_device=0)
    val = DataConfig(**{**plain.__dict__, "validation_examples": 10})
    base, carved = load_corpus(plain), load_corpus(val)
    assert len(base.train) == 80 and len(carved.train) == 70
    held = held_out_examples(val)
    assert len(held) == 10
    assert set(held.texts) <= set(base.train.texts), "validation examples come from the training split"
    assert not set(held.texts) & set(carved.train.texts), "and leave it"
    assert not set(held.texts) & set(base.test.texts), "the test split is never used"
    assert sum(partition_sizes(val)) == 70
    assert held.texts == held_out_examples(val).texts, "seeded"
    with pytest.raises(ConfigError, match="data.validation_examples: 80 is not less than the 80"):
        load_corpus(DataConfig(**{**plain.__dict__, "validation_examples": 80}))


def _write(tmp_path, kind: str, labels: list, name="d"):
    path = tmp_path / f"{name}.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": l}) for i, l in enumerate(labels)))
    else:
        path.write_text("text,label\n" + "\n".join(f"text {i},{l}" for i, l in enumerate(labels)))
    return DataConfig(dataset=kind, path=str(path), test_fraction=0.25, num_devices=2, partition="iid")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_one_based_integer_labels_are_four_classes_not_five(tmp_path, kind):
    labels = [1, 2, 3, 4] * 10  # AG News
    corpus = load_corpus(_write(tmp_path, kind, labels))
    assert corpus.label_names == ("1", "2", "3", "4")
    pairs = {(t, int(y)) for t, y in zip(corpus.train.texts + corpus.test.texts,
                                          np.concatenate([corpus.train.labels, corpus.test.labels]))}
    assert pairs == {(f"text {i}", l - 1) for i, l in enumerate(labels)}


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_numbers_sort_as_numbers(tmp_path, kind):
    corpus = load_corpus(_write(tmp_path, kind, [10, 1, 2] * 8))
    assert corpus.label_names == ("1", "2", "10")  # not 11 classes, not ('1', '10', '2')
    by_text = dict(zip(corpus.train.texts + corpus.test.texts,
                       np.concatenate([corpus.train.labels, corpus.test.labels]).tolist()))
    assert by_text["text 0"] == 2 and by_text["text 1"] == 0 and by_text["text 2"] == 1


def test_strings_sort_as_strings_even_when_some_look_numeric(tmp_path):
    corpus = load_corpus(_write(tmp_path, "csv", ["b", "10", "a", "9"] * 5))
    assert corpus.label_names == ("10", "9", "a", "b")


def test_explicit_label_names_set_the_order_and_refuse_unknown_labels(tmp_path):
    cfg = _write(tmp_path, "jsonl", ["pos", "neg"] * 10)
    corpus = load_corpus(DataConfig(**{**cfg.__dict__, "label_names": ["pos", "neg", "neutral"]}))
    assert corpus.label_names == ("pos", "neg", "neutral")
    assert set(corpus.train.labels.tolist()) == {0, 1}
    with pytest.raises(ConfigError, match=r"data.label_names: .*'neg'"):
        load_corpus(DataConfig(**{**cfg.__dict__, "label_names": ["pos"]}))
    ints = _write(tmp_path, "jsonl", [1, 2, 3, 4] * 5, name="ints")
    assert load_corpus(DataConfig(**{**ints.__dict__, "label_names": ["4", "3", "2", "1"]})).label_names == \
        ("4", "3", "2", "1")


def test_a_class_without_training_examples_is_warned(tmp_path, caplog):
    cfg = _write(tmp_path, "jsonl", ["a", "b"] * 10)
    with caplog.at_level("WARNING", logger="edgelora.data"):
        corpus = load_corpus(DataConfig(**{**cfg.__dict__, "label_names": ["a", "b", "c"]}))
    assert len(corpus.label_names) == 3
    assert "1 of 3 classes have no training example: c" in caplog.text


AG_NEWS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ag_news" / "test.csv"


def test_headerless_csv_with_two_text_columns_joined(tmp_path):
    # AG News's layout: no header; label, title, description
    (tmp_path / "ag.csv").write_text('"3","Fears for pension","Unions say they are disappointed"\n'
                                     '"4","Race is on","A second team sets a launch date"\n' * 10)
    cfg = DataConfig(dataset="csv", path=str(tmp_path / "ag.csv"), column_names=["label", "title", "description"],
                     text_columns=["title", "description"], test_fraction=0.25, num_devices=2, partition="iid")
    corpus = load_corpus(cfg)
    assert corpus.label_names == ("3", "4")
    texts = set(corpus.train.texts + corpus.test.texts)
    assert texts == {"Fears for pension Unions say they are disappointed", "Race is on A second team sets a launch date"}
    with pytest.raises(ConfigError, match=r"data.text_columns: .* has no column 'body' \(has \['label', 'title'"):
        load_corpus(DataConfig(**{**cfg.__dict__, "text_columns": ["title", "body"]}))


def test_the_real_ag_news_test_split_reads_as_four_classes():
    if not AG_NEWS.exists():
        pytest.skip("../shared/datasets/ag_news is not beside this checkout")
    corpus = load_corpus(DataConfig(dataset="csv", path=str(AG_NEWS), column_names=["label", "title", "description"],
                                    text_columns=["title", "description"], num_devices=4))
    assert corpus.label_names == ("1", "2", "3", "4") and len(corpus.train) + len(corpus.test) == 7600
    assert corpus.train.texts[0].count(" ") > 5


def test_one_json_object_needs_json_field_and_says_so(tmp_path):
    doc = {"train": [["set a warning", "alarm"], ["play jazz", "music"]] * 5, "val": []}
    (tmp_path / "full.json").write_text(json.dumps(doc, indent=2))
    cfg = DataConfig(dataset="json", path=str(tmp_path / "full.json"), test_fraction=0.2, num_devices=2,
                     partition="iid")
    with pytest.raises(ConfigError, match=r"is one JSON object with keys \['train', 'val'\]; give data.json_field"):
        load_corpus(cfg)
    with pytest.raises(ConfigError, match=r"data.json_field: 'test' is not a key"):
        load_corpus(DataConfig(**{**cfg.__dict__, "json_field": "test"}))
    corpus = load_corpus(DataConfig(**{**cfg.__dict__, "json_field": "train"}))  # [text, label] pairs
    assert corpus.label_names == ("alarm", "music") and len(corpus.train) == 8


def test_json_array_of_records_and_parquet_read_like_json_lines(tmp_path):
    rows = [{"text": f"text {i}", "label": i % 3} for i in range(12)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for kind, name in (("json", "a.json"), ("parquet", "a.parquet")):
        corpus = load_corpus(DataConfig(dataset=kind, path=str(tmp_path / name), test_fraction=0.25, num_devices=2,
                                        partition="iid"))
        assert corpus.label_names == ("0", "1", "2") and len(corpus.train) == 9


def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n{"text": "c", "label": 1}\n')
    with pytest.raises(ConfigError, match=r"data.path: .*d.jsonl:2: not JSON"):
        load_corpus(DataConfig(dataset="jsonl", path=str(tmp_path / "d.jsonl")))


def test_gzipped_json_lines_still_read(tmp_path):
    import gzip

    rows = [{"text": f"text {i}", "label": ["a", "b"][i % 2]} for i in range(10)]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(DataConfig(dataset="jsonl", path=str(tmp_path / "d.jsonl.gz"), num_devices=2))
    assert corpus.label_names == ("a", "b") and len(corpus.train) + len(corpus.test) == 10
