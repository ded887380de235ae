"""Examples and their partition over devices.

The server and every device derive the same partition from the DataConfig alone (seeded flwr-datasets
partitioners), so training data never crosses the wire: a device loads only its own slice.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .schema import LABEL_PARTITIONS, DataConfig
from .configtools import ConfigError

log = logging.getLogger("edgelora.data")


@dataclass(frozen=True)
class Examples:
    """Classification: texts and class ids. Causal LM: texts to predict, with zero labels, or class ids of
    data.label_column when a label-skewed partition splits by them; for instruction data `prompts` holds each
    example's conversation before its answer ((role, content) pairs) and `texts` the answers. `groups`: each
    example's natural-partition key (data.partition = natural), else None."""
    texts: tuple[str, ...]
    labels: np.ndarray  # int64
    prompts: tuple[tuple[tuple[str, str], ...], ...] | None = None
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda seq: None if seq is None else tuple(seq[i] for i in idx)
        return Examples(tuple(self.texts[i] for i in idx), self.labels[idx], pick(self.prompts), pick(self.groups))

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        join = lambda seqs: None if any(s is None for s in seqs) else tuple(x for s in seqs for x in s)
        return Examples(tuple(t for p in parts for t in p.texts), np.concatenate([p.labels for p in parts]),
                        join([p.prompts for p in parts]), join([p.groups for p in parts]))


@dataclass(frozen=True)
class Corpus:
    train: Examples
    test: Examples
    label_names: tuple[str, ...]


def load_corpus(cfg: DataConfig, task: str = "classification") -> Corpus:
    """The train and evaluation splits. With data.validation_examples > 0 the evaluation split is a seeded
    validation set carved out of the training split (which then no longer holds it): the test split is
    not used at all, so hyperparameters chosen on it never saw the test data."""
    return _load_corpus_cached(_Source.of(cfg, task))


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
    task: str = "classification"
    prompt_column: str = ""
    response_column: str = ""
    messages_column: str = ""
    group_columns: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: DataConfig, task: str = "classification") -> "_Source":
        # A causal LM reads a class column only to split by it: other partitions do not need the column at all.
        labelled = task != "causal-lm" or cfg.mode == "partitions" and cfg.partition in LABEL_PARTITIONS
        return cls(cfg.dataset, cfg.resolved_data_home(), cfg.path, cfg.test_path, cfg.test_fraction,
                   tuple(cfg.text_columns) or (cfg.text_column,), cfg.label_column if labelled else "",
                   tuple(cfg.column_names),
                   cfg.json_field, tuple(cfg.remove), cfg.seed, tuple(cfg.label_names), cfg.validation_examples,
                   task, cfg.prompt_column, cfg.response_column, cfg.messages_column,
                   cfg.group_columns if cfg.partition == "natural" else ())

    @property
    def lm(self) -> bool:
        return self.task == "causal-lm"


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
        if src.lm or src.group_columns:
            raise ConfigError("data.dataset: 20newsgroups is read as a classification corpus without columns; for "
                              "causal-lm or natural partitions give its JSONL copy (dataset = \"jsonl\")")
        return _newsgroups(src.data_home, src.remove)
    if src.dataset == "hf":
        return _huggingface(src)
    rows = _read_rows(Path(src.path), src, "data.path")
    if src.test_path:
        test_rows = _read_rows(Path(src.test_path), src, "data.test_path")
    else:  # seeded hold-out: the server's test split never reaches a device
        order = np.random.default_rng(src.seed).permutation(len(rows))
        cut = int(round(len(rows) * src.test_fraction))
        test_rows, rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    if src.lm:
        return _lm_from_rows(rows, test_rows, explicit=src.label_names)
    return _from_rows(rows, test_rows, explicit=src.label_names)


NEWSGROUPS_JSONL = "20news-bydate.jsonl.gz"


def _newsgroups(data_home: str | None, remove: tuple[str, ...]) -> Corpus:
    """scikit-learn's fetch_20newsgroups, both splits. Where data_home also holds the shared JSONL copy, that
    copy is read instead, in scikit-learn's order and stripped as scikit-learn strips (the same texts, labels
    and order, tested): ~1 s against ~5 s for importing scikit-learn and unpacking its pickled cache, paid by every
    process that loads the corpus (each device process, each Ray worker)."""
    jsonl = Path(data_home) / NEWSGROUPS_JSONL if data_home else None
    if jsonl is not None and jsonl.is_file():
        corpus = _newsgroups_jsonl(jsonl)
        strip = lambda ex: Examples(tuple(_strip_post(t, remove) for t in ex.texts), ex.labels)
        return Corpus(strip(corpus.train), strip(corpus.test), corpus.label_names) if remove else corpus
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


_QUOTED = re.compile(r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)")


def _strip_post(text: str, remove: tuple[str, ...]) -> str:
    """fetch_20newsgroups' `remove`, in its order: "headers" drops everything up to the first blank line;
    "footers" cuts at the last line (but the first) that is blank or only hyphens, the signature's usual
    fence; "quotes" drops the lines quoting another post or introducing a quote."""
    if "headers" in remove:
        text = text.partition("\n\n")[2]
    if "footers" in remove:
        lines = text.strip().split("\n")
        fence = next((i for i in range(len(lines) - 1, 0, -1) if not lines[i].strip().strip("-")), 0)
        text = "\n".join(lines[:fence]) if fence else text
    if "quotes" in remove:
        text = "\n".join(line for line in text.split("\n") if not _QUOTED.search(line))
    return text


def _newsgroups_jsonl(path: Path) -> Corpus:
    """The shared copy's rows ({"split", "label_name", "id": "<group>/<file>", "text"}) in the order
    fetch_20newsgroups returns them: scikit-learn's load_files lists each split's groups and their files sorted
    by name and shuffles them with RandomState(0) (the cache it pickles), then fetch_20newsgroups shuffles that
    with RandomState(42)."""
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[r["split"]].append((r["label_name"], r["id"].split("/", 1)[1], r["text"]))
    splits, names = {}, sorted({group for group, _, _ in rows["train"]})
    label = {name: i for i, name in enumerate(names)}
    for split, found in rows.items():
        found.sort(key=lambda r: (r[0], r[1]))
        order = np.arange(len(found))
        np.random.RandomState(0).shuffle(order)
        again = np.arange(len(found))
        np.random.RandomState(42).shuffle(again)
        order = order[again]
        splits[split] = Examples(tuple(found[i][2] for i in order),
                                 np.asarray([label[found[i][0]] for i in order], np.int64))
    return Corpus(splits["train"], splits["test"], tuple(names))


def _huggingface(src: _Source) -> Corpus:
    from datasets import load_dataset

    ds = load_dataset(src.path)
    test_split = "test" if "test" in ds else "validation"
    train, test = _rows_of(ds["train"], src, src.path), _rows_of(ds[test_split], src, src.path)
    feature = ds["train"].features[src.label_column] if src.label_column else None
    names = feature.names if hasattr(feature, "names") else None
    if src.lm:
        return _lm_from_rows(train, test, names, src.label_names)
    return _from_rows(train, test, names, src.label_names)


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
    rows = _rows_of(table, src, path)
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


def _require(table, cols: list[tuple[str, str]], where) -> None:
    have = list(table.column_names)
    for col, key in cols:
        if col not in have:
            raise ConfigError(f"{key}: {where} has no column {col!r} (has {have})")


def _rows_of(table, src: _Source, where) -> list[tuple]:
    """Rows of a table, (text, label, group) for a classifier and (text, prompt, group, label) for a causal LM;
    group is the natural-partition key (None without one), a causal LM's label its class (None without
    src.label_column)."""
    _require(table, [(c, "data.partition_columns" if len(src.group_columns) > 1 else "data.partition_column")
                     for c in src.group_columns], where)
    keys = [table[c] for c in src.group_columns]
    group = (lambda i: " / ".join(str(k[i]) for k in keys)) if keys else (lambda i: None)
    if src.lm:
        return _lm_columns(table, src, where, group)
    return _columns(table, src.text_columns, src.label_column, where, group)


def _text_of(table, text_cols: tuple[str, ...]):
    parts = [table[c] for c in text_cols]
    return lambda i: " ".join("" if p[i] is None else str(p[i]) for p in parts)


def _columns(table, text_cols: tuple[str, ...], label_col: str, where, group=lambda i: None) -> list[tuple]:
    """(text, label, group) rows; several text columns are joined with a space (AG News: title + description)."""
    what = "data.text_columns" if len(text_cols) > 1 else "data.text_column"
    _require(table, [(c, what) for c in text_cols] + [(label_col, "data.label_column")], where)
    label = _label_of(table, label_col, where)
    text = _text_of(table, text_cols)
    return [(text(i), label(i), group(i)) for i in range(len(table))]


def _label_of(table, label_col: str, where):
    """Example i's label; an example without one is refused by number."""
    labels = table[label_col][:]  # a list: indexing the column itself reads Arrow one value at a time

    def label(i: int):
        if labels[i] is None:
            raise ConfigError(f"data.label_column: {where}: example {i + 1} has no {label_col!r}")
        return labels[i]

    return label


def _lm_columns(table, src: _Source, where, group) -> list[tuple]:
    """(text, prompt, group, label) rows of causal-LM data: plain text (prompt None), prompt/response columns,
    or a messages column whose last message is the assistant's answer (prompt: the messages before it); the
    label is the row's class in src.label_column (set for a label-skewed partition), else None."""
    rows = []
    if src.label_column:
        if src.label_column not in table.column_names:
            raise ConfigError(f"data.label_column: {where} has no column {src.label_column!r} (has "
                              f"{list(table.column_names)}): a causal-lm run split by class (data.partition = "
                              f"dirichlet or pathological) takes each row's class from it; name the class column, "
                              f"or use iid or natural")
        label = _label_of(table, src.label_column, where)
    else:
        label = lambda i: None
    if src.messages_column:
        _require(table, [(src.messages_column, "data.messages_column")], where)
        for i, msgs in enumerate(table[src.messages_column]):
            ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                         for m in msgs)
            if not ok or msgs[-1]["role"] != "assistant" or not str(msgs[-1]["content"] or "").strip():
                raise ConfigError(f"data.messages_column: {where}: example {i + 1}'s {src.messages_column!r} is not a "
                                  f"list of {{role, content}} messages ending in a non-empty assistant answer")
            prompt = tuple((str(m["role"]), str(m["content"] or "")) for m in msgs[:-1])
            rows.append((str(msgs[-1]["content"]), prompt, group(i), label(i)))
        return rows
    if src.prompt_column:
        _require(table, [(src.prompt_column, "data.prompt_column"), (src.response_column, "data.response_column")],
                 where)
        for i, (p, r) in enumerate(zip(table[src.prompt_column], table[src.response_column])):
            if r is None or not str(r).strip():
                raise ConfigError(f"data.response_column: {where}: example {i + 1} has no response "
                                  f"({src.response_column!r} is empty): instruction data needs an answer to learn")
            rows.append((str(r), (("user", "" if p is None else str(p)),), group(i), label(i)))
        return rows
    what = "data.text_columns" if len(src.text_columns) > 1 else "data.text_column"
    _require(table, [(c, what) for c in src.text_columns], where)
    text = _text_of(table, src.text_columns)
    return [(t, None, group(i), label(i)) for i in range(len(table)) if (t := text(i)).strip()]


def _lm_from_rows(train_rows, test_rows, names=None, explicit: tuple[str, ...] = ()) -> Corpus:
    """Causal-LM examples: zero labels, or, when the rows carry a class, class ids by _from_rows' rule (the
    classifier's ids of the same file, so both split alike)."""
    label_names, ids = (), (np.zeros(len(train_rows), np.int64), np.zeros(len(test_rows), np.int64))
    if any(r[3] is not None for r in train_rows + test_rows):
        label_names, *ids = _class_ids([r[3] for r in train_rows], [r[3] for r in test_rows], names, explicit)

    def ex(rows, labels) -> Examples:
        prompts = tuple(r[1] for r in rows) if rows and rows[0][1] is not None else None
        groups = tuple(r[2] for r in rows) if rows and rows[0][2] is not None else None
        return Examples(tuple(r[0] for r in rows), labels, prompts, groups)

    return Corpus(ex(train_rows, ids[0]), ex(test_rows, ids[1]), label_names)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _from_rows(train_rows, test_rows, names=None, explicit: tuple[str, ...] = ()) -> Corpus:
    """Classifier examples, their labels mapped to class ids by _class_ids."""
    label_names, train_ids, test_ids = _class_ids([l for _, l, _ in train_rows], [l for _, l, _ in test_rows],
                                                  names, explicit)

    def ex(rows, labels) -> Examples:
        groups = tuple(g for _, _, g in rows) if rows and rows[0][2] is not None else None
        return Examples(tuple(t for t, _, _ in rows), labels, groups=groups)

    return Corpus(ex(train_rows, train_ids), ex(test_rows, test_ids), label_names)


def _class_ids(train_labels: list, test_labels: list, names=None,
               explicit: tuple[str, ...] = ()) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(class names, train ids, test ids): labels mapped to class ids by one rule for every source.

    The class list is `explicit` (data.label_names) when given, else `names` (a dataset's own list, indexed
    by integer labels), else the sorted set of observed labels: numbers sorted as numbers (CSV cells that
    all parse as integers count as numbers), everything else as strings. Labels 1, 2, 10 are 3 classes in
    that order, never 11 classes or ('1', '10', '2').
    """
    raw = list(train_labels) + list(test_labels)
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
    ids = lambda labels: np.asarray([index[key(l)] for l in labels], np.int64)
    train_ids = ids(train_labels)
    seen = set(train_ids.tolist())
    empty = [n for i, n in enumerate(label_names) if i not in seen]
    if empty:
        log.warning("%d of %d classes have no training example: %s%s", len(empty), len(label_names),
                    ", ".join(empty[:8]), " ..." if len(empty) > 8 else "")
    return label_names, train_ids, ids(test_labels)


def _label_key(raw: list):
    """How labels compare: as integers when every label is one (or a string of one: CSV cells), else as
    strings."""
    def is_int(l) -> bool:
        if isinstance(l, bool):
            return False
        return isinstance(l, int) or isinstance(l, str) and _INT.fullmatch(l.strip()) is not None

    return (lambda l: int(l)) if raw and all(is_int(l) for l in raw) else str


_INT = re.compile(r"[+-]?\d+")


def partition_indices(labels: np.ndarray, cfg: DataConfig, groups: tuple[str, ...] | None = None) -> list[np.ndarray]:
    """Indices of each device's examples, derived from the config alone (flwr-datasets partitioners)."""
    n = cfg.num_devices
    if cfg.partition == "natural":
        return _cap_all(natural_partition(groups, cfg), cfg)
    # Shuffle first (seeded): IidPartitioner takes contiguous shards, and files are often sorted by label.
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    if cfg.partition == "iid":
        return _cap_all(iid_shards(order, n), cfg)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    if cfg.partition == "dirichlet":
        part = DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.alpha,
                                    min_partition_size=1, self_balancing=False, seed=cfg.seed)
    else:
        part = PathologicalPartitioner(num_partitions=n, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_device,
                                       class_assignment_mode="random", seed=cfg.seed)
    ds = Dataset.from_dict({"label": labels[order].tolist(), "idx": order.tolist()})
    part.dataset = ds
    try:
        out = [np.sort(np.asarray(part.load_partition(i)["idx"], np.int64)) for i in range(n)]
    except ValueError as e:
        raise ConfigError(f"data.partition: {cfg.partition} could not split {len(labels)} examples over {n} "
                          f"devices: {e}") from None
    return _cap_all(out, cfg)


def iid_shards(order: np.ndarray, n: int) -> list[np.ndarray]:
    """flwr-datasets' IidPartitioner over `order` without building a Dataset (importing `datasets` costs a
    process ~2 s): n contiguous shards, the first len % n one longer (Dataset.shard(contiguous=True)), each
    sorted. The same indices as the partitioner's, tested."""
    size, extra = divmod(len(order), n)
    bounds = [size * i + min(i, extra) for i in range(n + 1)]
    return [np.sort(order[bounds[i]:bounds[i + 1]]).astype(np.int64) for i in range(n)]


def natural_partition(groups: tuple[str, ...] | None, cfg: DataConfig) -> list[np.ndarray]:
    """A device per value of data.partition_column(s), as flwr-datasets' NaturalIdPartitioner and LEAF's
    Shakespeare (a device per role): the values with at least data.min_partition_examples training examples,
    sorted, then a seeded choice of data.num_devices of them; device i holds every example of its value.
    (Grouped with numpy: the partitioner keeps its per-value indices private and loads one Dataset per value,
    1,294 of them for Shakespeare.)"""
    columns = ", ".join(cfg.group_columns)
    if groups is None:
        raise ConfigError(f"data.partition: natural needs data.partition_column ({columns or 'none given'})")
    values, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(values)))[:-1]
    members = np.split(order, bounds)
    eligible = [v for v in range(len(values)) if len(members[v]) >= cfg.min_partition_examples]
    if len(eligible) < cfg.num_devices:
        raise ConfigError(f"data.partition_column: {columns!r} has {len(eligible)} value(s) with >= "
                          f"{cfg.min_partition_examples} training examples (of {len(values)}), fewer than "
                          f"data.num_devices = {cfg.num_devices}")
    chosen = np.random.default_rng([cfg.seed, 0x4E41]).permutation(len(eligible))[:cfg.num_devices]
    return [np.sort(members[eligible[i]]).astype(np.int64) for i in chosen]


def _cap_all(parts: list[np.ndarray], cfg: DataConfig) -> list[np.ndarray]:
    if cfg.max_examples_per_device:
        return [_cap(ix, cfg.max_examples_per_device, cfg.seed * 1_000_003 + i) for i, ix in enumerate(parts)]
    return parts


def _cap(idx: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if len(idx) <= cap:
        return np.sort(idx)
    return np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))


def device_examples(cfg: DataConfig, device_index: int, task: str = "classification") -> Examples:
    if not 0 <= device_index < cfg.num_devices:
        raise ConfigError(f"device index {device_index} is outside 0..{cfg.num_devices - 1} (data.num_devices)")
    corpus = load_corpus(cfg, task)
    return corpus.train.subset(_partitions(cfg, task)[device_index])


@lru_cache(maxsize=4)
def _partitions_cached(src: _Source, partition: str, alpha: float, classes: int, n: int, cap: int, seed: int,
                       min_examples: int):
    cfg = DataConfig(seed=seed, partition=partition, alpha=alpha, classes_per_device=classes, num_devices=n,
                     max_examples_per_device=cap, partition_columns=list(src.group_columns),
                     min_partition_examples=min_examples)
    train = _load_corpus_cached(src).train
    return partition_indices(train.labels, cfg, train.groups)


def _partitions(cfg: DataConfig, task: str = "classification") -> list[np.ndarray]:
    return _partitions_cached(_Source.of(cfg, task), cfg.partition, cfg.alpha, cfg.classes_per_device,
                              cfg.num_devices, cfg.max_examples_per_device, cfg.seed, cfg.min_partition_examples)


def partition_sizes(cfg: DataConfig, task: str = "classification") -> list[int]:
    """Examples per device: the server knows them from the config, so FedAvg never trusts a device's count."""
    return [len(ix) for ix in _partitions(cfg, task)]


def partition_names(cfg: DataConfig, task: str = "classification") -> list[str]:
    """What each device holds, for logs: its natural-partition value (data.partition = natural), else its index."""
    train = load_corpus(cfg, task).train
    if cfg.partition != "natural" or train.groups is None:
        return [str(i) for i in range(cfg.num_devices)]
    return [train.groups[int(ix[0])] if len(ix) else "" for ix in _partitions(cfg, task)]


def held_out_examples(cfg: DataConfig, task: str = "classification") -> Examples:
    test = _own_test(cfg, task) if cfg.mode == "own" else load_corpus(cfg, task).test
    if cfg.test_max_examples and len(test) > cfg.test_max_examples:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(test), cfg.test_max_examples, replace=False))
        return test.subset(idx)
    return test


def label_names(cfg: DataConfig, task: str = "classification") -> tuple[str, ...]:
    """The class of each classifier output, in order (none for a causal LM)."""
    if task != "classification":
        return ()
    return tuple(cfg.label_names) if cfg.mode == "own" else load_corpus(cfg).label_names


def _own_test(cfg: DataConfig, task: str = "classification") -> Examples:
    """data.mode = own: the server's test split is data.test_path when given (labels mapped to
    data.label_names), else none: the devices' federated evaluation reports instead."""
    if not cfg.test_path:
        return Examples((), np.zeros(0, np.int64), () if task == "causal-lm" else None)
    src = _Source.of(cfg, task)
    rows = _read_rows(Path(cfg.test_path), src, "data.test_path")
    if src.lm:
        return _lm_from_rows([], rows).test
    return _from_rows([], rows, explicit=tuple(cfg.label_names)).test


def own_lm_examples(path: str | Path, cfg: DataConfig, eval_fraction: float = 0.2,
                    seed: int = 0) -> tuple[Examples, Examples]:
    """A device's own causal-LM file (text, or the run's prompt/response or messages columns) as (train,
    held-out evaluation) examples."""
    path = Path(path)
    kind = _file_kind(path)
    src = dataclasses.replace(_Source.of(cfg, "causal-lm"), dataset=kind, path=str(path), group_columns=(),
                              label_column="")
    corpus = _lm_from_rows(_read_rows(path, src, "--data"), [])
    return _split(corpus.train, eval_fraction, seed)


def _file_kind(path: Path) -> str:
    kind = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "jsonl", ".gz": "jsonl"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"--data {path}: expected a .csv, .json, .jsonl(.gz) or .parquet file")
    return kind


def _split(examples: Examples, eval_fraction: float, seed: int) -> tuple[Examples, Examples]:
    order = np.random.default_rng(seed).permutation(len(examples))
    cut = int(round(len(order) * eval_fraction))
    return examples.subset(np.sort(order[cut:])), examples.subset(np.sort(order[:cut]))


def own_examples(path: str | Path, label_names: tuple[str, ...], text_column: str = "text",
                 label_column: str = "label", eval_fraction: float = 0.2, seed: int = 0) -> tuple[Examples, Examples]:
    """A device's own file (csv, json/jsonl or parquet, by extension) as (train, held-out evaluation)
    examples, labels mapped to the run's classes. A label the run does not know is refused by name."""
    path = Path(path)
    kind = _file_kind(path)
    src = _Source(kind, None, str(path), "", 0.0, (text_column,), label_column, (), "", (), seed,
                  tuple(label_names), 0)
    rows = _read_rows(path, src, "--data")
    try:
        corpus = _from_rows(rows, [], explicit=tuple(label_names))
    except ConfigError as e:
        raise ConfigError(f"--data {path}: {str(e).replace('data.label_names: the data has', 'the file has')}; "
                          f"the run's classes (data.label_names) are {list(label_names)[:8]}"
                          f"{' ...' if len(label_names) > 8 else ''}") from None
    return _split(corpus.train, eval_fraction, seed)


def with_num_labels(run):
    """The run config with model.num_labels filled in from the data when it was left at 0 (auto)."""
    import dataclasses

    if run.model.num_labels or run.model.task != "classification":
        return run
    n = len(label_names(run.data))
    return run.replace(model=dataclasses.replace(run.model, num_labels=n))
