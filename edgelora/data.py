"""Examples and their partition over devices.

The server and every device derive the same partition from the DataConfig alone (seeded flwr-datasets
partitioners), so training data never crosses the wire: a device loads only its own slice.
"""
from __future__ import annotations

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
    return _load_corpus_cached(_Source.of(cfg))


@dataclass(frozen=True)
class _Source:
    """The DataConfig fields that decide the corpus (not its partition): the cache key."""
    dataset: str
    data_home: str | None
    path: str
    test_path: str
    test_fraction: float
    text_columns: tuple[str, ...]
    label_column: str
    column_names: tuple[str, ...]
    json_field: str
    remove: tuple[str, ...]
    seed: int
    label_names: tuple[str, ...]
    validation_examples: int

    @classmethod
    def of(cls, cfg: DataConfig) -> "_Source":
        return cls(cfg.dataset, cfg.resolved_data_home(), cfg.path, cfg.test_path, cfg.test_fraction,
                   tuple(cfg.text_columns) or (cfg.text_column,), cfg.label_column, tuple(cfg.column_names),
                   cfg.json_field, tuple(cfg.remove), cfg.seed, tuple(cfg.label_names), cfg.validation_examples)


@lru_cache(maxsize=2)
def _load_corpus_cached(src: _Source) -> Corpus:
    corpus = _read_corpus(src)
    n_val = src.validation_examples
    if not n_val:
        return corpus
    if n_val >= len(corpus.train):
        raise ConfigError(f"data.validation_examples: {n_val} is not less than the {len(corpus.train)} training "
                          f"examples")
    order = np.random.default_rng([src.seed, 0x5A1]).permutation(len(corpus.train))
    return Corpus(corpus.train.subset(np.sort(order[n_val:])), corpus.train.subset(np.sort(order[:n_val])),
                  corpus.label_names)


def _read_corpus(src: _Source) -> Corpus:
    if src.dataset == "20newsgroups":
        return _newsgroups(src.data_home, src.remove)
    if src.dataset == "hf":
        return _huggingface(src.path, src.text_columns, src.label_column, src.label_names)
    rows = _read_rows(Path(src.path), src, "data.path")
    if src.test_path:
        test_rows = _read_rows(Path(src.test_path), src, "data.test_path")
    else:  # seeded hold-out: the server's test split never reaches a device
        order = np.random.default_rng(src.seed).permutation(len(rows))
        cut = int(round(len(rows) * src.test_fraction))
        test_rows, rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    return _from_rows(rows, test_rows, explicit=src.label_names)


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


def _huggingface(name: str, text_cols: tuple[str, ...], label_col: str, explicit: tuple[str, ...]) -> Corpus:
    from datasets import load_dataset

    ds = load_dataset(name)
    test_split = "test" if "test" in ds else "validation"
    names = ds["train"].features[label_col].names if hasattr(ds["train"].features[label_col], "names") else None
    return _from_rows(_columns(ds["train"], text_cols, label_col, name), _columns(ds[test_split], text_cols,
                                                                                 label_col, name), names, explicit)


def _read_rows(path: Path, src: _Source, what: str) -> list[tuple[str, object]]:
    """(text, label) rows of a local csv, json/jsonl or parquet file, read by the `datasets` library."""
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    from datasets import Dataset
    from datasets.utils import logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        if src.dataset == "csv":
            names = list(src.column_names) or None
            table = Dataset.from_csv(str(path), column_names=names, header=None if names else "infer",
                                     keep_in_memory=True)
        elif src.dataset == "parquet":
            table = Dataset.from_parquet(str(path), keep_in_memory=True)
        else:
            table = _read_json(path, src, what)
    except ConfigError:
        raise
    except Exception as e:  # pyarrow/pandas parse errors: name the file and the format asked for
        raise ConfigError(f"{what}: {path} cannot be read as {src.dataset}: {_first_line(e)}") from None
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    rows = _columns(table, src.text_columns, src.label_column, path)
    if not rows:
        raise ConfigError(f"{what}: {path} has no examples")
    return rows


def _read_json(path: Path, src: _Source, what: str):
    """JSON lines, or one JSON document: an array of records, or an object whose `data.json_field` holds
    records or [text, label] pairs (named by data.column_names, default text, label)."""
    from datasets import Dataset

    try:
        doc = json.loads(_text(path, what))
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # not even the first value parses
            raise ConfigError(f"{what}: {path}:{e.lineno}: not JSON ({e.msg}); expected JSON lines (one object "
                              f"per line) or one JSON document") from None
        try:  # several values: JSON lines
            return Dataset.from_json(str(path), keep_in_memory=True)
        except Exception as parse_error:  # find the line to name (only on this failure path: a full scan)
            bad = _bad_json_line(path)
            if bad is None:
                raise ConfigError(f"{what}: {path} cannot be read as JSON lines: {_first_line(parse_error)}") from None
            raise ConfigError(f"{what}: {path}:{bad}: not JSON; expected JSON lines (one object per line)") from None
    if isinstance(doc, dict) and src.json_field:
        if src.json_field not in doc:
            raise ConfigError(f"data.json_field: {src.json_field!r} is not a key of {path} (keys: {sorted(doc)[:10]})")
        doc = doc[src.json_field]
    elif isinstance(doc, dict):
        if not any(isinstance(v, (list, dict)) for v in doc.values()):
            doc = [doc]  # a record: JSON lines with a single line
        else:
            raise ConfigError(f"{what}: {path} is one JSON object with keys {sorted(doc)[:10]}; give "
                              f"data.json_field = the key that holds the examples (a list of records, or of "
                              f"[text, label] pairs), or use JSON lines (one object per line)")
    if not isinstance(doc, list) or not doc:
        raise ConfigError(f"{what}: {path}: expected a non-empty list of examples, found "
                          f"{type(doc).__name__ if doc else 'none'}")
    if all(isinstance(r, dict) for r in doc):
        return Dataset.from_list(doc)
    if all(isinstance(r, list) for r in doc):
        names = list(src.column_names) or ["text", "label"]
        bad = next((i for i, r in enumerate(doc) if len(r) != len(names)), None)
        if bad is not None:
            raise ConfigError(f"{what}: {path}: example {bad} has {len(doc[bad])} values, but data.column_names "
                              f"names {len(names)} ({names})")
        return Dataset.from_dict({n: [r[i] for r in doc] for i, n in enumerate(names)})
    raise ConfigError(f"{what}: {path}: examples must all be objects (records) or all lists ([text, label] pairs)")


def _open_text(path: Path):
    return (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8")


def _text(path: Path, what: str) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text ({e})") from None


def _bad_json_line(path: Path) -> int | None:
    """The first line of a JSON-lines file that is not JSON (None when every line is)."""
    with _open_text(path) as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return ln
    return None


def _columns(table, text_cols: tuple[str, ...], label_col: str, where) -> list[tuple[str, object]]:
    """(text, label) pairs; several text columns are joined with a space (AG News: title + description)."""
    have = list(table.column_names)
    what = "data.text_columns" if len(text_cols) > 1 else "data.text_column"
    for col, key in [(c, what) for c in text_cols] + [(label_col, "data.label_column")]:
        if col not in have:
            raise ConfigError(f"{key}: {where} has no column {col!r} (has {have})")
    labels = table[label_col]
    parts = [table[c] for c in text_cols]
    rows = []
    for i, label in enumerate(labels):
        if label is None:
            raise ConfigError(f"data.label_column: {where}: example {i + 1} has no {label_col!r}")
        rows.append((" ".join("" if p[i] is None else str(p[i]) for p in parts), label))
    return rows


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
def _partitions_cached(src: _Source, partition: str, alpha: float, classes: int, n: int, cap: int, seed: int):
    cfg = DataConfig(seed=seed, partition=partition, alpha=alpha, classes_per_device=classes, num_devices=n,
                     max_examples_per_device=cap)
    return partition_indices(_load_corpus_cached(src).train.labels, cfg)


def _partitions(cfg: DataConfig) -> list[np.ndarray]:
    return _partitions_cached(_Source.of(cfg), cfg.partition, cfg.alpha, cfg.classes_per_device, cfg.num_devices,
                              cfg.max_examples_per_device, cfg.seed)


def partition_sizes(cfg: DataConfig) -> list[int]:
    """Examples per device: the server knows them from the config, so FedAvg never trusts a device's count."""
    return [len(ix) for ix in _partitions(cfg)]


def held_out_examples(cfg: DataConfig) -> Examples:
    test = _own_test(cfg) if cfg.mode == "own" else load_corpus(cfg).test
    if cfg.test_max_examples and len(test) > cfg.test_max_examples:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(test), cfg.test_max_examples, replace=False))
        return test.subset(idx)
    return test


def label_names(cfg: DataConfig) -> tuple[str, ...]:
    """The class of each classifier output, in order."""
    return tuple(cfg.label_names) if cfg.mode == "own" else load_corpus(cfg).label_names


def _own_test(cfg: DataConfig) -> Examples:
    """data.mode = own: the server's test split is data.test_path when given (labels mapped to
    data.label_names), else none: the devices' federated evaluation reports instead."""
    if not cfg.test_path:
        return Examples((), np.zeros(0, np.int64))
    rows = _read_rows(Path(cfg.test_path), _Source.of(cfg), "data.test_path")
    return _from_rows([], rows, explicit=tuple(cfg.label_names)).test


def own_examples(path: str | Path, label_names: tuple[str, ...], text_column: str = "text",
                 label_column: str = "label", eval_fraction: float = 0.2, seed: int = 0) -> tuple[Examples, Examples]:
    """A device's own file (csv, json/jsonl or parquet, by extension) as (train, held-out evaluation)
    examples, labels mapped to the run's classes. A label the run does not know is refused by name."""
    path = Path(path)
    kind = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "jsonl", ".gz": "jsonl"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"--data {path}: expected a .csv, .json, .jsonl(.gz) or .parquet file")
    src = _Source(kind, None, str(path), "", 0.0, (text_column,), label_column, (), "", (), seed,
                  tuple(label_names), 0)
    rows = _read_rows(path, src, "--data")
    try:
        corpus = _from_rows(rows, [], explicit=tuple(label_names))
    except ConfigError as e:
        raise ConfigError(f"--data {path}: {str(e).replace('data.label_names: the data has', 'the file has')}; "
                          f"the run's classes (data.label_names) are {list(label_names)[:8]}"
                          f"{' ...' if len(label_names) > 8 else ''}") from None
    order = np.random.default_rng(seed).permutation(len(corpus.train))
    cut = int(round(len(order) * eval_fraction))
    return corpus.train.subset(np.sort(order[cut:])), corpus.train.subset(np.sort(order[:cut]))


def with_num_labels(run):
    """The run config with model.num_labels filled in from the data when it was left at 0 (auto)."""
    import dataclasses

    if run.model.num_labels:
        return run
    n = len(label_names(run.data))
    return run.replace(model=dataclasses.replace(run.model, num_labels=n))
