"""Text classification from users' tables or hub datasets: one text (or a text pair) and a label per row.

Any classic text-classification file is one config away: CSV / TSV / JSON lines / Parquet (plain or compressed),
with or without a header (``column_names``), text from one column, several joined columns or a sentence pair,
labels as strings or 0-/1-based integers with ``label_names``; or a Hugging Face dataset by name and splits.

Each table is parsed and tokenised once: the result (token ids without padding, labels, source lines) lives in the
shared on-disk cache (`src.cache`, namespace ``tokenized``) under a key of the file's content, the reading
settings and the tokenizer, so later runs and sweep trials skip both steps. Batches are padded to their own
longest sequence, which is much cheaper than padding everything to ``max_length``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from src.cache import Cache, file_digest, fingerprint
from src.data import DATA
from src.data.common import (
    ClassificationDataModule,
    DataConfig,
    check_fraction,
    check_path,
    fraction_split,
    read_label_names,
)
from src.data.tables import (
    BAD_ROWS,
    FORMATS,
    RawTable,
    hub_split,
    hub_table,
    infer_format,
    listed,
    load_hub_dataset,
    looks_like_data,
    read_table,
    read_text_bytes,
)
from src.schema import ConfigError

if TYPE_CHECKING:  # no runtime import: src.backbones imports src.data
    from src.backbones.base import Preprocessing

log = logging.getLogger(__name__)

CACHE_NAMESPACE = "tokenized"
CACHE_LAYOUT = 1  # part of every key: bump when the cached entry's layout changes
PATH_KEYS = ("train_path", "val_path", "test_path")
TARGET_KEYS = ("target_path", "target_test_path")  # domain adaptation: target-domain tables (src.adapt)


@dataclass
class TextTableConfig(DataConfig):
    name: str = "text_table"
    train_path: str | None = None  # a table file, or set hf_dataset instead
    val_path: str | None = None  # None: a seeded stratified val_fraction of train
    test_path: str | None = None  # None: test on the validation split
    target_path: str | None = None  # domain adaptation: unlabelled target-domain table (same text columns)
    target_test_path: str | None = None  # labelled target-domain table, for evaluation only
    hf_dataset: str | None = None  # a Hugging Face dataset (hub id or local dataset folder) instead of files
    hf_config: str | None = None  # the dataset's configuration (subset), e.g. glue's "sst2"
    train_split: str = "train"
    val_split: str | None = None  # None: a seeded stratified val_fraction of train_split
    test_split: str | None = None  # None: test on the validation split
    format: str = "auto"  # auto (from the extension) | csv | tsv | jsonl | parquet
    header: bool | None = None  # csv/tsv: whether line 1 holds column names; None: yes unless column_names is set
    column_names: list[str] | None = None  # csv/tsv: names of the columns, in file order
    encoding: str = "utf-8"  # text encoding of csv/tsv/jsonl files
    text_column: Any = "sentence"  # a column, or a list of columns joined with text_separator
    text_separator: str = " "
    text_pair_column: str | None = None  # second text, e.g. the hypothesis in NLI
    label_column: str = "label"
    label_names: Any = None  # class names in index order: a list, or a file with one name per line
    label_base: int | None = None  # integer labels index label_names from 0 or 1; None: inferred from train
    bad_rows: str = "error"  # rows with a wrong field count, an empty text/label or an unknown label: error | skip
    val_fraction: float = 0.1
    max_length: int = 128  # tokens; longer inputs are truncated
    lowercase: bool = False
    cache: bool = True  # keep parsed, tokenised tables in the shared on-disk cache (namespace "tokenized")
    cache_dir: str | None = None  # None: $TRANSFER_LAB_CACHE or ~/.cache/transfer-lab

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.train_path is None) == (self.hf_dataset is None):
            raise ValueError(
                f"train_path: set exactly one of train_path (a table file) and hf_dataset (a Hugging Face dataset); "
                f"got train_path={self.train_path!r}, hf_dataset={self.hf_dataset!r}"
            )
        if self.hf_dataset is not None and (given := [k for k in PATH_KEYS[1:] if getattr(self, k) is not None]):
            raise ValueError(f"{given[0]}: with hf_dataset, name splits (val_split, test_split) instead of files")
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.target_test_path is not None and self.target_path is None:
            raise ValueError("target_test_path: needs target_path (the unlabelled target training table) too")
        formats = set()
        for key in (*PATH_KEYS, *TARGET_KEYS):
            if getattr(self, key) is not None:
                formats.add(self.format_of(key))
                check_path(key, getattr(self, key))
        for key in TARGET_KEYS:  # the target domain must be the same kind of input as the source, checked up front
            if getattr(self, key) is not None:
                self._check_target_columns(key)
        if self.column_names is not None and (
            not self.column_names or len(set(self.column_names)) < len(self.column_names)
        ):
            raise ValueError(f"column_names: must be distinct names, one per column; got {self.column_names}")
        for key in ("header", "column_names"):
            if getattr(self, key) is not None and not formats & {"csv", "tsv"}:
                raise ValueError(
                    f"{key}: applies to csv/tsv files only (the files are {sorted(formats) or 'hub data'})"
                )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(
                f"encoding: unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)"
            ) from None
        columns = self.text_columns()
        if not columns:
            raise ValueError(f"text_column: a column name or a non-empty list of them, got {self.text_column!r}")
        if self.label_names is not None:
            read_label_names("label_names", self.label_names)
        if self.label_base not in (None, 0, 1):
            raise ValueError(f"label_base: must be 0, 1 or null (inferred), got {self.label_base}")
        if self.bad_rows not in BAD_ROWS:
            raise ValueError(f"bad_rows: must be one of {', '.join(BAD_ROWS)}, got {self.bad_rows!r}")
        check_fraction("val_fraction", self.val_fraction)
        if self.max_length < 1:
            raise ValueError(f"max_length: must be >= 1, got {self.max_length}")

    @property
    def has_target(self) -> bool:
        return self.target_path is not None

    def _check_target_columns(self, key: str) -> None:
        path, fmt = Path(getattr(self, key)), self.format_of(key)
        columns = peek_columns(path, fmt, self.encoding) if self.column_names is None else self.column_names
        needed = [*self.text_columns(), self.text_pair_column, *([self.label_column] if key != "target_path" else [])]
        if missing := [c for c in needed if c is not None and c not in columns]:
            raise ValueError(
                f"{key}: {path} has no column {missing[0]!r} (the target domain needs the source's columns); "
                f"columns: {columns}"
            )

    def format_of(self, key: str) -> str:
        """The table format of the file in config field ``key`` (explicit, or from its extension)."""
        return infer_format(key, getattr(self, key), self.format)

    def text_columns(self) -> list[str]:
        """``text_column`` as a list of column names (integers address the columns of a headerless file)."""
        value = self.text_column
        return [str(c) for c in value] if isinstance(value, list | tuple) else [str(value)]

    def has_header(self) -> bool:
        return self.header if self.header is not None else self.column_names is None


def peek_columns(path: Path, fmt: str, encoding: str) -> list[str]:
    """A table's column names without reading it all (none for a file that is not a table, e.g. an image)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        text = read_text_bytes(str(path), path, encoding).decode("utf-8")
        first = next((line for line in text.splitlines() if line.strip()), "")
        if fmt == "jsonl":
            record = json.loads(first)
            return list(record) if isinstance(record, dict) else []
        return next(csv.reader([first], delimiter="\t" if fmt == "tsv" else ","), [])
    except (json.JSONDecodeError, OSError, ValueError):  # ConfigError (undecodable bytes) is a ValueError
        return []


def sorted_labels(labels: list[str]) -> list[str]:
    """Unique labels, numerically ordered when they are all integers ("2" before "10"), else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def check_class_labels(labels: list[str], where: str, column: str) -> None:
    """Refuse a label column that cannot be classes, before any compute: real numbers (a regression target such as
    STS-B's `score`, which would silently become hundreds of classes) or a distinct value on every row."""
    distinct = set(labels)
    numbers = [as_float(x) for x in distinct]
    if len(distinct) > 2 and all(x is not None for x in numbers):
        fractional = sum(not float(x).is_integer() for x in numbers)
        if fractional > len(distinct) / 2 or len(distinct) > max(50, len(labels) / 2):
            shown = ", ".join(sorted(distinct, key=lambda x: float(x))[:5])
            raise ConfigError(
                f"{where}: label_column {column!r} looks continuous: {len(distinct)} distinct numbers in "
                f"{len(labels)} rows ({shown}, ...), which a classifier would treat as that many classes: a regression "
                "target needs a regression task, which this version does not have yet (integer class ids: declare "
                "them with label_names)"
            )
    if len(labels) > 2 and len(distinct) == len(labels):
        raise ConfigError(
            f"{where}: label_column {column!r} has as many distinct values as rows ({len(labels)}): every row would "
            "be its own class; point label_column at the class column"
        )


def as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def label_text(value: Any) -> str | None:
    """A label cell as text: None/empty -> None; integral floats (Parquet/JSON ``1.0``) -> ``"1"``."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    """What determines the token ids: the tokenizer's full spec (vocab, normaliser, special tokens) by content, so
    the same tokenizer at another path shares cache entries and a retrained one never does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else fingerprint(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "spec": hashlib.sha256(spec.encode()).hexdigest(),
        "truncation_side": str(getattr(tokenizer, "truncation_side", "right")),
    }


def _packed(sequences: list[list[int]], total: int) -> torch.Tensor:
    """Concatenated token sequences in the smallest integer dtype that holds them (int8 masks, int32 ids)."""
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=total)
    lo, hi = (int(flat.min()), int(flat.max())) if total else (0, 0)
    dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
    return torch.from_numpy(flat.astype(dtype))


class EncodedTexts(Dataset):
    """Selected rows of a tokenised table (packed, unpadded sequences); the collator pads each batch."""

    def __init__(self, entry: dict[str, Any], rows: np.ndarray, labels: np.ndarray | None) -> None:
        self.encoding = {key: values.numpy() for key, values in entry["encoding"].items()}
        self.offsets = entry["offsets"].numpy()
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        start, end = self.offsets[row], self.offsets[row + 1]
        item: dict[str, Any] = {key: values[start:end].tolist() for key, values in self.encoding.items()}
        if self.labels is not None:  # None: an unlabelled target-domain table
            item["labels"] = int(self.labels[index])
        return item


@dataclass
class Source:
    """Where one split's table comes from: its identity (for the cache key) and how to read it."""

    key: str  # the config key that names it, e.g. "val_path"
    where: str  # how messages name it: "val_path: data/dev.csv", "test_split: ag_news[test]"
    identity: dict[str, Any]
    read: Callable[[], RawTable]
    headerless: bool = False
    labelled: bool = True


def encode_table(
    raw: RawTable, cfg: TextTableConfig, tokenizer: Any, headerless: bool, labelled: bool = True
) -> dict[str, Any]:
    """Join/clean the text columns, drop or reject bad rows, tokenise: the value the cache stores per table.
    `labelled=False` (an unlabelled target-domain table): no label column is read.

    Warnings are issued as they arise (before a later error) and kept in the entry, to repeat on cache hits.
    """
    warned: list[str] = []

    def note(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=3)
        warned.append(message)

    for message in raw.warnings:
        note(message)
    hint = ""
    if looks_like_data(list(raw.columns)):
        hint = "; the header row looks like data: if the file has no header, set column_names: [...] or header: false"

    def texts_of(names: list[str]) -> list[str]:
        parts = [[("" if v is None else str(v)).strip() for v in raw.column(name, hint)] for name in names]
        joined = [cfg.text_separator.join(p for p in row if p) for row in zip(*parts, strict=True)]
        return [text.lower() for text in joined] if cfg.lowercase else joined

    texts = texts_of(cfg.text_columns())
    pairs = texts_of([cfg.text_pair_column]) if cfg.text_pair_column is not None else None
    labels = [label_text(v) for v in raw.column(cfg.label_column, hint)] if labelled else [""] * len(texts)
    if (
        headerless
        and len(labels) > 1
        and as_int(labels[0] or "") is None
        and all(as_int(x or "") is not None for x in labels[1:])
    ):
        note(
            f"{raw.where}: line {raw.lines[0]} looks like a header (label {labels[0]!r}, all other labels are "
            "integers); if the file has a header row, set header: true"
        )
    problems = {
        "an empty text": [i for i, t in enumerate(texts) if not t],
        "an empty text pair": [i for i, t in enumerate(pairs or []) if not t],
        "no label": [i for i, label in enumerate(labels) if label is None],
    }
    bad = sorted(set().union(*problems.values()))
    if bad:
        detail = "; ".join(
            f"{what} on line(s) {listed([raw.lines[i] for i in rows])}" for what, rows in problems.items() if rows
        )
        if cfg.bad_rows == "error":
            raise ConfigError(f"{raw.where}: {len(bad)} row(s) with {detail}; fix them or set bad_rows: skip")
        note(f"{raw.where}: skipped {len(bad)} row(s) with {detail} (bad_rows: skip)")
        keep = np.setdiff1d(np.arange(len(texts)), bad)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        pairs = [pairs[i] for i in keep] if pairs is not None else None
        lines = [raw.lines[i] for i in keep]
    else:
        lines = raw.lines
    if not texts:
        raise ConfigError(f"{raw.where}: no usable rows")
    encoding = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    lengths = np.fromiter(map(len, encoding["input_ids"]), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {
        "encoding": {key: _packed(seqs, int(offsets[-1])) for key, seqs in encoding.items()},
        "offsets": torch.from_numpy(offsets),
        "labels": labels,
        "lines": torch.tensor(lines, dtype=torch.int64),
        "label_names": raw.label_names.get(cfg.label_column),
        "warnings": warned,
    }


class LabelIndex:
    """Label text -> class index: by name when ``names`` are known (integers index them from ``base``), else
    the sorted unique labels of the training table."""

    def __init__(self, train_labels: list[str], names: list[str] | None, base: int | None, key: str) -> None:
        self.base: int | None = None  # None: no label_names, labels are class names as written
        if names is None:
            self.class_names = sorted_labels(train_labels)
        else:
            self.class_names = names
            ints = [n for n in map(as_int, set(train_labels) - set(names)) if n is not None]
            self.base = base if base is not None else (self._infer_base(ints, len(names), key) if ints else 0)
        self.by_name = {name: i for i, name in enumerate(self.class_names)}

    @staticmethod
    def _infer_base(ints: list[int], k: int, key: str) -> int:
        """The base under which more of the distinct integer labels name a class; a tie is ambiguous."""
        fits = [sum(base <= n < k + base for n in ints) for base in (0, 1)]
        if fits[0] == fits[1] > 0:
            raise ConfigError(
                f"label_base: the integer labels of {key} ({min(ints)}..{max(ints)}) index the {k} label_names "
                "either from 0 or from 1; set label_base: 0 or 1"
            )
        return int(fits[1] > fits[0])  # the labels outside the range are then reported as unknown

    def index(self, label: str) -> int:
        """The class index of ``label``, -1 when it is not a class."""
        i = self.by_name.get(label)
        if (
            i is None
            and self.base is not None
            and (n := as_int(label)) is not None
            and 0 <= n - self.base < len(self.class_names)
        ):
            i = n - self.base
        return -1 if i is None else i

    def describe(self) -> str:
        if self.base is None:
            return f"train labels: {self.class_names}"
        k = len(self.class_names)
        return f"label_names: {self.class_names} (or their {self.base}-based indices {self.base}..{k - 1 + self.base})"


@DATA.register("text_table", TextTableConfig)
class TextTableDataModule(ClassificationDataModule):
    """Train/val/test tables -> tokenised datasets; classes are ``label_names`` or the sorted unique train labels."""

    modality = "text"
    cfg: TextTableConfig

    def __init__(self, cfg: TextTableConfig, preprocessing: Preprocessing, seed: int) -> None:
        super().__init__(cfg, preprocessing, seed)
        if preprocessing.tokenizer is None:
            raise ValueError(f"data '{cfg.name}' needs a tokenizer, but the backbone's preprocessing has none")
        self.collate_fn = DataCollatorWithPadding(preprocessing.tokenizer, return_tensors="pt")
        self.cache = Cache(CACHE_NAMESPACE, cfg.cache_dir)

    def _sources(self) -> dict[str, Source]:
        """The split -> table source plan, from files or from a hub dataset."""
        cfg = self.cfg
        sources: dict[str, Source] = {}
        if cfg.hf_dataset is None:
            splits = ("train", "val", "test", "target_train", "target_test")
            for split, key in zip(splits, (*PATH_KEYS, *TARGET_KEYS), strict=True):
                path = getattr(cfg, key)
                if path is None:
                    continue
                fmt = cfg.format_of(key)
                delimited = fmt in ("csv", "tsv")
                settings = {"fmt": fmt, "encoding": cfg.encoding, "bad_rows": cfg.bad_rows}
                if delimited:
                    settings |= {"header": cfg.has_header(), "column_names": cfg.column_names}
                sources[split] = Source(
                    key,
                    f"{key}: {path}",
                    {"file": file_digest(path), **settings},
                    lambda key=key, path=path, settings=settings: read_table(key, path, **settings),
                    headerless=delimited and not cfg.has_header(),
                    labelled=key != "target_path",
                )
            return sources
        dataset_dict = load_hub_dataset(cfg.hf_dataset, cfg.hf_config)
        for split, key in (("train", "train_split"), ("val", "val_split"), ("test", "test_split")):
            name = getattr(cfg, key)
            if name is None:
                continue
            ds = hub_split(key, dataset_dict, cfg.hf_dataset, name)
            files = [file_digest(f["filename"]) for f in ds.cache_files] or [ds._fingerprint]
            where = f"{key}: {cfg.hf_dataset}[{name}]"
            sources[split] = Source(
                key,
                where,
                {"hub": cfg.hf_dataset, "config": cfg.hf_config, "split": name, "content": files},
                lambda where=where, ds=ds: hub_table(where, ds),
            )
        return sources

    def _encoded(self, source: Source) -> dict[str, Any]:
        """The source's tokenised table, from the cache when an earlier run or trial made it."""
        cfg, tokenizer = self.cfg, self.preprocessing.tokenizer
        settings = {
            "text_columns": cfg.text_columns(),
            "text_separator": cfg.text_separator,
            "text_pair_column": cfg.text_pair_column,
            "label_column": cfg.label_column,
            "lowercase": cfg.lowercase,
            "bad_rows": cfg.bad_rows,
            "max_length": cfg.max_length,
            "labelled": source.labelled,
        }
        key = fingerprint(CACHE_LAYOUT, source.identity, settings, tokenizer_identity(tokenizer))

        def compute() -> dict[str, Any]:
            return encode_table(source.read(), cfg, tokenizer, source.headerless, source.labelled)

        start, hits = time.perf_counter(), self.cache.stats.hits
        entry = self.cache.get_or_compute(key, compute) if cfg.cache else compute()
        how = "loaded from the cache" if self.cache.stats.hits > hits else "read and tokenised"
        log.info(
            "text_table: %s: %d rows %s in %.2f s", source.key, len(entry["labels"]), how, time.perf_counter() - start
        )
        for message in entry["warnings"]:
            warnings.warn(message, UserWarning, stacklevel=2)
        return entry

    def _labels(self, entry: dict[str, Any], index: LabelIndex, where: str) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, class indices)`` of an entry's rows; unknown labels fail (or are skipped with bad_rows: skip)."""
        labels = np.array([index.index(label) for label in entry["labels"]], dtype=np.int64)
        rows = np.arange(len(labels))
        unknown = np.flatnonzero(labels < 0)
        if unknown.size:
            values = sorted({entry["labels"][i] for i in unknown}, key=str)
            lines = listed(entry["lines"][unknown].tolist())
            if index.base is None:
                train = self.cfg.train_path or self.cfg.hf_dataset
                message = f"{where} has label(s) {values} that do not occur in train_path {train}"
            else:
                message = f"{where} has label(s) {values} outside label_names"
            message = f"{message} (line(s) {lines}); {index.describe()}"
            if self.cfg.bad_rows == "error":
                raise ConfigError(message)
            warnings.warn(f"{message}; skipped (bad_rows: skip)", UserWarning, stacklevel=2)
            rows = np.flatnonzero(labels >= 0)
        return rows, labels[rows]

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        sources = self._sources()
        entries = {split: self._encoded(source) for split, source in sources.items()}
        train, base = entries["train"], self.cfg.label_base
        if self.cfg.label_names is not None:
            names = read_label_names("label_names", self.cfg.label_names)
        else:  # class names the source declares (hub ClassLabel): its labels are 0-based indices
            names, base = train["label_names"], 0 if base is None else base
        if names is None:  # classes come from the data: make sure they are classes
            check_class_labels(train["labels"], sources["train"].where, self.cfg.label_column)
        index = LabelIndex(train["labels"], names, base, sources["train"].key)
        rows, labels = self._labels(train, index, sources["train"].where)
        if "val" in entries:
            train_idx = np.arange(len(rows))
            val_rows, val_labels = self._labels(entries["val"], index, sources["val"].where)
            val = EncodedTexts(entries["val"], val_rows, val_labels)
        else:
            train_idx, val_idx = fraction_split(labels.tolist(), self.cfg.val_fraction, self.seed)
            val = EncodedTexts(train, rows[val_idx], labels[val_idx])
        train_idx = train_idx[self.train_indices(labels[train_idx].tolist())]
        splits: dict[str, Dataset] = {"train": EncodedTexts(train, rows[train_idx], labels[train_idx]), "val": val}
        if "test" in entries:
            test_rows, test_labels = self._labels(entries["test"], index, sources["test"].where)
            splits["test"] = EncodedTexts(entries["test"], test_rows, test_labels)
        if "target_train" in entries:
            splits["target_train"] = EncodedTexts(
                entries["target_train"], np.arange(len(entries["target_train"]["labels"])), None
            )
        if "target_test" in entries:
            target_rows, target_labels = self._labels(entries["target_test"], index, sources["target_test"].where)
            splits["target_test"] = EncodedTexts(entries["target_test"], target_rows, target_labels)
        return splits, index.class_names
