"""Text classification from a table file (CSV, TSV or JSON lines): one text (or a text pair) and a label per row.

Any GLUE-style task is one YAML away: point ``train_path``/``val_path``/``test_path`` at the files and name the
columns. Texts are tokenised once in ``setup`` without padding; batches are padded to their own longest
sequence, which is much cheaper than padding everything to ``max_length``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import MISSING
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from src.data import DATA
from src.data.common import ClassificationDataModule, DataConfig, check_fraction, check_path, fraction_split

if TYPE_CHECKING:  # no runtime import: src.backbones imports src.data
    from src.backbones.base import Preprocessing

FORMATS = ("auto", "csv", "tsv", "jsonl")
FORMAT_BY_EXTENSION = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class TextTableConfig(DataConfig):
    name: str = "text_table"
    train_path: str = MISSING  # required
    val_path: str | None = None  # None: a seeded stratified val_fraction of train
    test_path: str | None = None  # None: test on the validation split
    target_path: str | None = None  # domain adaptation: unlabelled target-domain table (same text columns)
    target_test_path: str | None = None  # labelled target-domain table, for evaluation only
    format: str = "auto"  # auto (from the extension) | csv | tsv | jsonl
    text_column: str = "sentence"
    text_pair_column: str | None = None  # second text, e.g. the hypothesis in NLI
    label_column: str = "label"
    val_fraction: float = 0.1
    max_length: int = 128  # tokens; longer inputs are truncated
    lowercase: bool = False

    @property
    def has_target(self) -> bool:
        return self.target_path is not None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_path == MISSING:
            raise ValueError(f"train_path: required, got {self.train_path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for key in ("train_path", "val_path", "test_path", "target_path", "target_test_path"):
            if getattr(self, key) is not None:
                self.format_of(key)
                check_path(key, getattr(self, key))
        if self.target_test_path is not None and self.target_path is None:
            raise ValueError("target_test_path: needs target_path (the unlabelled target training table) too")
        for key in ("target_path", "target_test_path"):  # the target must be the same kind of input as the source
            if getattr(self, key) is not None:
                columns = read_columns(Path(getattr(self, key)), self.format_of(key))
                needed = [self.text_column, self.text_pair_column] + (
                    [self.label_column] if key == "target_test_path" else []
                )
                if missing := [c for c in needed if c is not None and c not in columns]:
                    what = "text columns and labels" if key == "target_test_path" else "text columns"
                    raise ValueError(
                        f"{key}: {getattr(self, key)} has no column {missing[0]!r} (the target domain needs the "
                        f"source's {what}); columns: {columns}"
                    )
        check_fraction("val_fraction", self.val_fraction)
        if self.max_length < 1:
            raise ValueError(f"max_length: must be >= 1, got {self.max_length}")

    def format_of(self, key: str) -> str:
        """The table format of the file in config field ``key`` (explicit, or from its extension)."""
        if self.format != "auto":
            return self.format
        path = getattr(self, key)
        suffix = Path(path).suffix.lower()
        if suffix not in FORMAT_BY_EXTENSION:
            raise ValueError(
                f"{key}: cannot infer the format of {path!r} from its extension "
                f"({', '.join(FORMAT_BY_EXTENSION)}); set format explicitly"
            )
        return FORMAT_BY_EXTENSION[suffix]


def read_table(path: Path, fmt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as dicts plus the column names. TSV is read unquoted (GLUE texts contain bare quote characters)."""
    with path.open(newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
            return rows, list(dict.fromkeys(key for row in rows for key in row))
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        reader = csv.DictReader(f, **dialect)
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def read_columns(path: Path, fmt: str) -> list[str]:
    """The column names of a table from its header (CSV/TSV) or first record (JSON lines), without reading it all;
    none for a file that is not text (e.g. an image given as a table)."""
    try:
        return _columns(path, fmt)
    except UnicodeDecodeError:
        return []


def _columns(path: Path, fmt: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            first = next((line for line in f if line.strip()), "{}")
            try:
                record = json.loads(first)
            except json.JSONDecodeError:
                return []
            return list(record) if isinstance(record, dict) else []
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        return list(next(csv.reader(f, **dialect), []))


def sorted_labels(labels: list[str]) -> list[str]:
    """Unique labels, numerically ordered when they are all integers ("2" before "10"), else alphabetically."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


class EncodedTexts(Dataset):
    """Pre-tokenised (unpadded) examples; the collator pads each batch."""

    def __init__(self, encoding: dict[str, list[list[int]]], labels: list[int] | None) -> None:
        self.encoding, self.labels = encoding, labels  # labels None: an unlabelled target table

    def __len__(self) -> int:
        return len(self.encoding["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: values[index] for key, values in self.encoding.items()}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


@dataclass
class _Table:
    """One file's cleaned columns."""

    path: Path
    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None  # None: a target table without the label column


@DATA.register("text_table", TextTableConfig)
class TextTableDataModule(ClassificationDataModule):
    """Train/val/test tables -> tokenised datasets; labels are the sorted unique train labels."""

    modality = "text"
    cfg: TextTableConfig

    def __init__(self, cfg: TextTableConfig, preprocessing: Preprocessing, seed: int) -> None:
        super().__init__(cfg, preprocessing, seed)
        if preprocessing.tokenizer is None:
            raise ValueError(f"data '{cfg.name}' needs a tokenizer, but the backbone's preprocessing has none")
        self.collate_fn = DataCollatorWithPadding(preprocessing.tokenizer, return_tensors="pt")

    def _read(self, key: str, labelled: bool = True) -> _Table:
        """`labelled=False`: the label column is optional (unlabelled target tables)."""
        path = Path(getattr(self.cfg, key))
        rows, columns = read_table(path, self.cfg.format_of(key))

        def column(name: str) -> list[str]:
            if name not in columns:
                raise ValueError(f"{key}: {path} has no column {name!r}; available columns: {columns}")
            missing = next((i for i, row in enumerate(rows) if row.get(name) is None), None)
            if missing is not None:
                raise ValueError(f"{key}: {path} row {missing + 1} has no value in column {name!r}")
            return [str(row[name]).strip() for row in rows]

        def clean(texts: list[str]) -> list[str]:
            return [text.lower() for text in texts] if self.cfg.lowercase else texts

        pair_column = self.cfg.text_pair_column
        return _Table(
            path=path,
            texts=clean(column(self.cfg.text_column)),
            pairs=clean(column(pair_column)) if pair_column is not None else None,
            labels=column(self.cfg.label_column) if labelled or self.cfg.label_column in columns else None,
        )

    def _encode(self, table: _Table, indices: np.ndarray, label_mapping: dict[str, int], key: str) -> EncodedTexts:
        """Tokenise the selected rows in one batched call (truncated, unpadded)."""
        unseen = sorted({table.labels[i] for i in indices} - label_mapping.keys()) if table.labels is not None else []
        if unseen:
            raise ValueError(
                f"{key}: {table.path} has label(s) {unseen} that do not occur in train_path "
                f"{self.cfg.train_path}; train labels: {list(label_mapping)}"
            )
        texts = [table.texts[i] for i in indices]
        pairs = [table.pairs[i] for i in indices] if table.pairs is not None else None
        encoding = self.preprocessing.tokenizer(texts, pairs, truncation=True, max_length=self.cfg.max_length)
        labels = [label_mapping[table.labels[i]] for i in indices] if table.labels is not None else None
        return EncodedTexts(dict(encoding), labels)

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        train = self._read("train_path")
        class_names = sorted_labels(train.labels)
        mapping = {label: i for i, label in enumerate(class_names)}
        if self.cfg.val_path is None:
            train_idx, val_idx = fraction_split(train.labels, self.cfg.val_fraction, self.seed)
            val, val_key = train, "train_path"
        else:
            val, val_key = self._read("val_path"), "val_path"
            train_idx, val_idx = np.arange(len(train.labels)), np.arange(len(val.labels))
        train_idx = train_idx[self.train_indices(len(train_idx))]
        splits: dict[str, Dataset] = {
            "train": self._encode(train, train_idx, mapping, "train_path"),
            "val": self._encode(val, val_idx, mapping, val_key),
        }
        if self.cfg.test_path is not None:
            test = self._read("test_path")
            splits["test"] = self._encode(test, np.arange(len(test.labels)), mapping, "test_path")
        for split, key in (("target_train", "target_path"), ("target_test", "target_test_path")):
            if getattr(self.cfg, key) is not None:
                table = self._read(key, labelled=split == "target_test")
                splits[split] = self._encode(table, np.arange(len(table.texts)), mapping, key)
        return splits, class_names
