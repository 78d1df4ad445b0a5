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

import hashlib
import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from src.cache import Cache, file_digest, fingerprint
from src.data.common import EVAL_PREFIX, DataModule
from src.data.config import PATH_KEYS, TARGET_KEYS, EvalSetConfig, TextTableConfig, infer_format, read_label_names
from src.data.tables import (
    RawTable,
    hub_split,
    hub_table,
    listed,
    load_hub_dataset,
    looks_like_data,
    read_table,
)
from src.data.text_noise import TEXT_NOISE_VERSION, noisy
from src.schema import ConfigError
from src.tasks.base import LabelFormat, as_int

if TYPE_CHECKING:  # no runtime import: src.backbones imports src.data
    from src.backbones.base import Preprocessing
    from src.config import CVConfig
    from src.tasks.base import Task

log = logging.getLogger(__name__)

CACHE_NAMESPACE = "tokenized"
CACHE_LAYOUT = 1  # part of every key: bump when the cached entry's layout changes


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

    def lengths(self) -> np.ndarray:
        """Each item's token count (what its padded batch costs)."""
        return self.offsets[self.rows + 1] - self.offsets[self.rows]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        start, end = self.offsets[row], self.offsets[row + 1]
        item: dict[str, Any] = {key: values[start:end].tolist() for key, values in self.encoding.items()}
        if self.labels is not None:  # None: an unlabelled target-domain table
            item["labels"] = self.labels[index].tolist()  # a class index, or a row of tags / targets
        return item

    def subset(self, indices: np.ndarray) -> EncodedTexts:
        subset = EncodedTexts.__new__(EncodedTexts)
        subset.encoding, subset.offsets = self.encoding, self.offsets
        subset.rows, subset.labels = self.rows[indices], None if self.labels is None else self.labels[indices]
        return subset


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
    raw: RawTable,
    cfg: TextTableConfig,
    tokenizer: Any,
    headerless: bool,
    labelled: bool = True,
    empty_label: bool = False,
) -> dict[str, Any]:
    """Join/clean the text columns, drop or reject bad rows, tokenise: the value the cache stores per table.
    `labelled=False` (an unlabelled target-domain table): no label column is read. Labels stay text (a tuple per
    row for several label columns): the task turns them into targets. `empty_label`: a row without a label is an
    example (multi-label: no tag).

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
    labels: list[Any] = [""] * len(texts)
    if labelled:
        labels = raw.label_cells(cfg.label_columns(), hint)
    if (
        headerless
        and len(labels) > 1
        and isinstance(labels[0], str)
        and as_int(labels[0]) is None
        and all(as_int(x or "") is not None for x in labels[1:])
    ):
        note(
            f"{raw.where}: line {raw.lines[0]} looks like a header (label {labels[0]!r}, all other labels are "
            "integers); if the file has a header row, set header: true"
        )
    problems = {
        "an empty text": [i for i, t in enumerate(texts) if not t],
        "an empty text pair": [i for i, t in enumerate(pairs or []) if not t],
        "no label": [] if empty_label else [i for i, label in enumerate(labels) if label is None],
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
        "label_names": raw.label_names.get(cfg.label_columns()[0]),
        "warnings": warned,
    }


class TextTableDataModule(DataModule):
    """Train/val/test tables -> tokenised datasets; classes are ``label_names`` or the sorted unique train labels."""

    modality = "text"
    cfg: TextTableConfig

    def __init__(
        self, cfg: TextTableConfig, preprocessing: Preprocessing, seed: int, task: Task, cv: CVConfig | None = None
    ) -> None:
        super().__init__(cfg, preprocessing, seed, task, cv)
        if preprocessing.tokenizer is None:
            raise ValueError(f"data '{cfg.name}' needs a tokenizer, but the backbone's preprocessing has none")
        self.collate_fn = DataCollatorWithPadding(preprocessing.tokenizer, return_tensors="pt")
        self.cache = Cache(CACHE_NAMESPACE, cfg.cache_dir)

    @property
    def groups_by_length(self) -> bool:
        return self.cfg.group_by_length

    def _file_source(self, key: str, path: str, labelled: bool = True) -> Source:
        """A table file read with the data config's format settings (format from its extension unless given)."""
        cfg = self.cfg
        fmt = infer_format(key, path, cfg.format)
        delimited = fmt in ("csv", "tsv")
        settings = {"fmt": fmt, "encoding": cfg.encoding, "bad_rows": cfg.bad_rows}
        if delimited:
            settings |= {"header": cfg.has_header(), "column_names": cfg.column_names}
        return Source(
            key,
            f"{key}: {path}",
            {"file": file_digest(path), **settings},
            lambda: read_table(key, path, **settings),
            headerless=delimited and not cfg.has_header(),
            labelled=labelled,
        )

    def _sources(self) -> dict[str, Source]:
        """The split -> table source plan, from files or from a hub dataset; named evaluation sets are files."""
        cfg = self.cfg
        sources: dict[str, Source] = {
            EVAL_PREFIX + name: self._file_source(f"data.eval_sets.{name}.path", spec.path)
            for name, spec in cfg.eval_sets.items()
            if spec.path is not None
        }
        if cfg.hf_dataset is None:
            splits = ("train", "val", "test", "target_train", "target_test")
            for split, key in zip(splits, (*PATH_KEYS, *TARGET_KEYS), strict=True):
                path = getattr(cfg, key)
                if path is not None:
                    sources[split] = self._file_source(key, path, labelled=key != "target_path")
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
            "label_column": cfg.label_columns(),
            "empty_label": self.task.empty_label,
            "lowercase": cfg.lowercase,
            "bad_rows": cfg.bad_rows,
            "max_length": cfg.max_length,
            "labelled": source.labelled,
        }
        key = fingerprint(CACHE_LAYOUT, source.identity, settings, tokenizer_identity(tokenizer))

        def compute() -> dict[str, Any]:
            return encode_table(
                source.read(), cfg, tokenizer, source.headerless, source.labelled, self.task.empty_label
            )

        start, hits = time.perf_counter(), self.cache.stats.hits
        entry = self.cache.get_or_compute(key, compute) if cfg.cache else compute()
        how = "loaded from the cache" if self.cache.stats.hits > hits else "read and tokenised"
        log.info(
            "text_table: %s: %d rows %s in %.2f s", source.key, len(entry["labels"]), how, time.perf_counter() - start
        )
        for message in entry["warnings"]:
            warnings.warn(message, UserWarning, stacklevel=2)
        return entry

    def _build(self) -> tuple[dict[str, Dataset], list[str]]:
        sources = self._sources()
        entries = {split: self._encoded(source) for split, source in sources.items()}
        train, base, names = entries["train"], self.cfg.label_base, None
        if self.cfg.label_names is not None:
            names = read_label_names("label_names", self.cfg.label_names)
        elif train["label_names"] is not None:  # names the source declares (hub ClassLabel): 0-based indices
            names, base = train["label_names"], 0 if base is None else base
        fmt = LabelFormat(self.cfg.label_columns(), names, base, self.cfg.label_separator, self.cfg.bad_rows)
        codec = self.task.codec(train["labels"], fmt, sources["train"].where)

        def labelled(split: str) -> EncodedTexts:
            entry = entries[split]
            rows, targets = codec.encode(entry["labels"], entry["lines"].tolist(), sources[split].where)
            return EncodedTexts(entry, rows, targets)

        whole = labelled("train")
        strata = self.task.strata(whole.labels)
        if "val" in entries:
            train_idx, val = self.train_indices(strata), labelled("val")
        else:
            train_idx, val_idx = self.val_split(strata, self.cfg.val_fraction)
            val = whole.subset(val_idx)
        splits: dict[str, Dataset] = {"train": whole.subset(train_idx), "val": val}
        for split in ("test", "target_test"):
            if split in entries:
                splits[split] = labelled(split)
        if "target_train" in entries:
            splits["target_train"] = EncodedTexts(
                entries["target_train"], np.arange(len(entries["target_train"]["labels"])), None
            )
        origin = sources[next(s for s in ("test", "val", "train") if s in sources)]  # the table tested rows are of

        def noised(name: str, spec: EvalSetConfig, tested: Dataset) -> Dataset:
            """The tested rows of a copy of their table with noisy texts: noise keeps every row (and its text
            non-empty), so the row numbers and targets of the clean rows apply."""
            entry = self._encoded(self._noisy_source(origin, name, spec))
            return EncodedTexts(entry, tested.rows, tested.labels)

        by_name = self.eval_splits(splits, lambda name, key, path: labelled(EVAL_PREFIX + name), noised)
        return {**splits, **by_name}, codec.names

    def _noisy_source(self, source: Source, name: str, spec: EvalSetConfig) -> Source:
        """``source`` with `spec.text_noise` on its text (and text pair) columns, each row seeded on its own."""
        assert spec.text_noise is not None and spec.severity is not None  # config validation: a text_noise set
        kind, severity, seed = spec.text_noise, spec.severity, spec.seed
        columns = [*self.cfg.text_columns(), *([self.cfg.text_pair_column] if self.cfg.text_pair_column else [])]

        def read() -> RawTable:
            raw = source.read()
            for c, column in enumerate(columns):
                values = raw.column(column)
                raw.columns[column] = [
                    v if v is None else noisy(str(v), kind, severity, np.random.default_rng([seed, c, row]))
                    for row, v in enumerate(values)
                ]
            return raw

        noise = {"text_noise": kind, "severity": severity, "seed": seed, "version": TEXT_NOISE_VERSION}
        where = f"data.eval_sets.{name} ({kind} noise on {source.where})"
        return Source(source.key, where, {**source.identity, **noise}, read, source.headerless, source.labelled)
