"""Examples and their partition over devices.

The server and every device derive the same partition from the DataConfig alone (seeded flwr-datasets
partitioners), so training data never crosses the wire: a device loads only its own slice.
"""
from __future__ import annotations

import csv
import gzip
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import DataConfig
from .configtools import ConfigError

log = logging.getLogger("edgelora.data")


@dataclass(frozen=True)
class Examples:
    texts: tuple[str, ...]
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "Examples":
        return Examples(tuple(self.texts[i] for i in idx), self.labels[idx])


@dataclass(frozen=True)
class Corpus:
    train: Examples
    test: Examples
    label_names: tuple[str, ...]


def load_corpus(cfg: DataConfig) -> Corpus:
    """The train and evaluation splits. With data.validation_examples > 0 the evaluation split is a seeded
    validation set carved out of the training split (which then no longer holds it): the test split is
    not used at all, so hyperparameters chosen on it never saw the test data."""
    return _load_corpus_cached(_key(cfg))


def _key(cfg: DataConfig) -> tuple:
    return (cfg.dataset, cfg.resolved_data_home(), cfg.path, cfg.test_path, cfg.test_fraction, cfg.text_column,
            cfg.label_column, tuple(cfg.remove), cfg.seed, tuple(cfg.label_names), cfg.validation_examples)


@lru_cache(maxsize=2)
def _load_corpus_cached(key: tuple) -> Corpus:
    corpus = _read_corpus(key[:-1])
    n_val = key[-1]
    if not n_val:
        return corpus
    if n_val >= len(corpus.train):
        raise ConfigError(f"data.validation_examples: {n_val} is not less than the {len(corpus.train)} training "
                          f"examples")
    order = np.random.default_rng([key[8], 0x5A1]).permutation(len(corpus.train))
    return Corpus(corpus.train.subset(np.sort(order[n_val:])), corpus.train.subset(np.sort(order[:n_val])),
                  corpus.label_names)


def _read_corpus(key: tuple) -> Corpus:
    dataset, data_home, path, test_path, test_fraction, text_col, label_col, remove, seed, explicit = key
    if dataset == "20newsgroups":
        return _newsgroups(data_home, remove)
    if dataset == "hf":
        return _huggingface(path, text_col, label_col, explicit)
    rows = _read_rows(Path(path), dataset, text_col, label_col)
    if test_path:
        test_rows = _read_rows(Path(test_path), dataset, text_col, label_col)
    else:  # seeded hold-out: the server's test split never reaches a device
        order = np.random.default_rng(seed).permutation(len(rows))
        cut = int(round(len(rows) * test_fraction))
        test_rows, rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    return _from_rows(rows, test_rows, explicit=explicit)


def _newsgroups(data_home: str | None, remove: tuple[str, ...]) -> Corpus:
    from sklearn.datasets import fetch_20newsgroups

    def split(name: str) -> tuple[Examples, list[str]]:
        try:
            b = fetch_20newsgroups(data_home=data_home, subset=name, remove=remove, download_if_missing=True)
        except Exception as e:  # offline and not cached: URLError, OSError, ...
            raise ConfigError(f"data.data_home: 20 Newsgroups is not under {data_home!r} and could not be "
                              f"downloaded ({type(e).__name__}: {e})") from None
        return Examples(tuple(b.data), np.asarray(b.target, np.int64)), list(b.target_names)

    train, names = split("train")
    test, _ = split("test")
    return Corpus(train, test, tuple(names))


def _huggingface(name: str, text_col: str, label_col: str, explicit: tuple[str, ...]) -> Corpus:
    from datasets import load_dataset

    ds = load_dataset(name)
    test_split = "test" if "test" in ds else "validation"
    names = ds["train"].features[label_col].names if hasattr(ds["train"].features[label_col], "names") else None
    tr = [(r[text_col], r[label_col]) for r in ds["train"]]
    te = [(r[text_col], r[label_col]) for r in ds[test_split]]
    return _from_rows(tr, te, names, explicit)


def _read_rows(path: Path, kind: str, text_col: str, label_col: str) -> list[tuple[str, object]]:
    if not path.exists():
        raise ConfigError(f"data.path: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            for r in reader:
                rows.append(_row(r, text_col, label_col, path, reader.line_num))
        else:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"data.path: {path}:{ln}: not JSON ({e})") from None
                    rows.append(_row(r, text_col, label_col, path, ln))
    if not rows:
        raise ConfigError(f"data.path: {path} has no examples")
    return rows


def _row(r: dict, text_col: str, label_col: str, path: Path, ln: int) -> tuple[str, object]:
    for col, what in ((text_col, "data.text_column"), (label_col, "data.label_column")):
        if col not in r:
            raise ConfigError(f"{what}: {path}:{ln} has no column {col!r} (has {sorted(r)})")
    return str(r[text_col]), r[label_col]


def _from_rows(train_rows, test_rows, names=None, explicit: tuple[str, ...] = ()) -> Corpus:
    """Examples with labels mapped to class ids by one rule for every source.

    The class list is `explicit` (data.label_names) when given, else `names` (a dataset's own list, indexed
    by integer labels), else the sorted set of observed labels: numbers sorted as numbers (CSV cells that
    all parse as integers count as numbers), everything else as strings. Labels 1, 2, 10 are 3 classes in
    that order, never 11 classes or ('1', '10', '2').
    """
    raw = [l for _, l in train_rows] + [l for _, l in test_rows]
    if names and not explicit:  # a dataset's own ClassLabel names, indexed by integer labels
        bad = sorted({l for l in raw if not (isinstance(l, int) and 0 <= l < len(names))}, key=str)
        if bad:
            raise ConfigError(f"data.label_column: label(s) {bad[:5]} are not indices into the dataset's "
                              f"{len(names)} label names")
        label_names, key = tuple(names), (lambda l: l)
        index = {i: i for i in range(len(label_names))}
    else:
        key = _label_key(raw + list(explicit))
        if explicit:  # listed as they appear in the data; integers compare by value ("01" is 1)
            label_names = tuple(explicit)
            index = {key(n): i for i, n in enumerate(label_names)}
            unknown = sorted({key(l) for l in raw} - set(index), key=str)
            if unknown:
                raise ConfigError(f"data.label_names: the data has label(s) {unknown[:5]} that are not in the "
                                  f"list ({len(unknown)} in all)")
        else:
            values = sorted({key(l) for l in raw})
            label_names, index = tuple(str(v) for v in values), {v: i for i, v in enumerate(values)}
    seen = {index[key(l)] for _, l in train_rows}
    empty = [n for i, n in enumerate(label_names) if i not in seen]
    if empty:
        log.warning("%d of %d classes have no training example: %s%s", len(empty), len(label_names),
                    ", ".join(empty[:8]), " ..." if len(empty) > 8 else "")

    def ex(rows) -> Examples:
        return Examples(tuple(t for t, _ in rows), np.asarray([index[key(l)] for _, l in rows], np.int64))

    return Corpus(ex(train_rows), ex(test_rows), label_names)


def _label_key(raw: list):
    """How labels compare: as integers when every label is one (or a string of one: CSV cells), else as
    strings."""
    def is_int(l) -> bool:
        if isinstance(l, bool):
            return False
        return isinstance(l, int) or isinstance(l, str) and _INT.fullmatch(l.strip()) is not None

    return (lambda l: int(l)) if raw and all(is_int(l) for l in raw) else str


_INT = re.compile(r"[+-]?\d+")


def partition_indices(labels: np.ndarray, cfg: DataConfig) -> list[np.ndarray]:
    """Indices of each device's examples, derived from the config alone (flwr-datasets partitioners)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = cfg.num_devices
    if cfg.partition == "iid":
        part = IidPartitioner(num_partitions=n)
    elif cfg.partition == "dirichlet":
        part = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.alpha,
                                    min_partition_size=1, self_balancing=False, seed=cfg.seed)
    else:
        part = PathologicalPartitioner(num_partitions=n, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_device,
                                       class_assignment_mode="random", seed=cfg.seed)
    # Shuffle first (seeded): IidPartitioner takes contiguous shards, and files are often sorted by label.
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    ds = Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    part.dataset = ds
    try:
        out = [np.sort(np.asarray(part.load_partition(i)["idx"], np.int64)) for i in range(n)]
    except ValueError as e:
        raise ConfigError(f"data.partition: {cfg.partition} could not split {len(labels)} examples over {n} "
                          f"devices: {e}") from None
    if cfg.max_examples_per_device:
        out = [_cap(ix, cfg.max_examples_per_device, cfg.seed * 1_000_003 + i) for i, ix in enumerate(out)]
    return out


def _cap(idx: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if len(idx) <= cap:
        return np.sort(idx)
    return np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))


def device_examples(cfg: DataConfig, device_index: int) -> Examples:
    if not 0 <= device_index < cfg.num_devices:
        raise ConfigError(f"device index {device_index} is outside 0..{cfg.num_devices - 1} (data.num_devices)")
    corpus = load_corpus(cfg)
    return corpus.train.subset(_partitions(cfg)[device_index])


@lru_cache(maxsize=4)
def _partitions_cached(key: tuple, partition: str, alpha: float, classes: int, n: int, cap: int, seed: int):
    cfg = DataConfig(dataset=key[0], data_home=key[1] or "", path=key[2], test_path=key[3], test_fraction=key[4],
                     text_column=key[5], label_column=key[6], remove=list(key[7]), label_names=list(key[9]),
                     validation_examples=key[10],
                     seed=seed, partition=partition,
                     alpha=alpha, classes_per_device=classes, num_devices=n, max_examples_per_device=cap)
    return partition_indices(load_corpus(cfg).train.labels, cfg)


def _partitions(cfg: DataConfig) -> list[np.ndarray]:
    return _partitions_cached(_key(cfg), cfg.partition, cfg.alpha, cfg.classes_per_device, cfg.num_devices,
                              cfg.max_examples_per_device, cfg.seed)


def partition_sizes(cfg: DataConfig) -> list[int]:
    """Examples per device: the server knows them from the config, so FedAvg never trusts a device's count."""
    return [len(ix) for ix in _partitions(cfg)]


def held_out_examples(cfg: DataConfig) -> Examples:
    test = load_corpus(cfg).test
    if cfg.test_max_examples and len(test) > cfg.test_max_examples:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(test), cfg.test_max_examples, replace=False))
        return test.subset(idx)
    return test


def label_names(cfg: DataConfig) -> tuple[str, ...]:
    """The class of each classifier output, in order."""
    return load_corpus(cfg).label_names


def with_num_labels(run):
    """The run config with model.num_labels filled in from the data when it was left at 0 (auto)."""
    import dataclasses

    if run.model.num_labels:
        return run
    n = len(load_corpus(run.data).label_names)
    return run.replace(model=dataclasses.replace(run.model, num_labels=n))
