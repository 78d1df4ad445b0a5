"""The data options' config schemas (torch-free: a config is validated before any heavy import) and the checks
their `__post_init__` runs; each implementation module imports its schema from here."""

from __future__ import annotations

import codecs
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING

from src.data.corruptions import CORRUPTIONS, SEVERITIES
from src.data.text_noise import TEXT_NOISES
from src.registry import Registry
from src.regularization.config import WISE_FT

DATA: Registry[Any] = Registry("data")

# Built-in target domains for domain adaptation: the same digits, shifted (also digits' `shift` evaluation sets).
TARGET_SHIFTS = ("invert", "rotate", "noise")
# Where an evaluation set's examples come from: a labelled file/folder in the training data's format, a corruption
# of the test split's images, one of digits' shifts of them, or noise on the test split's texts.
EVAL_SET_KINDS = ("path", "corruption", "shift", "text_noise")
GRADED_KINDS = ("corruption", "text_noise")  # the kinds that take a severity
RESERVED_EVAL_SET_NAMES = (WISE_FT,)  # metric prefixes of their own (test/wise_ft/<alpha>/...)


@dataclass
class EvalSetConfig:
    """One named evaluation set (`data.eval_sets.<name>`): exactly one of `path`, `corruption`, `shift` or
    `text_noise`."""

    path: str | None = None  # labelled data in the training format: a table, a manifest or a class-folder root
    corruption: str | None = None  # an ImageNet-C corruption of the test images (src/data/corruptions.py)
    severity: int | None = None  # of the corruption or text noise: 1..5
    shift: str | None = None  # digits: invert | rotate | noise of the test images
    text_noise: str | None = None  # char | word noise on the test texts (src/data/text_noise.py)
    seed: int = 0  # draws the random part of a corruption, shift or noise per example: the same in every run

    def kind(self) -> str:
        return next(k for k in EVAL_SET_KINDS if getattr(self, k) is not None)


@dataclass
class DataConfig:
    """Fields every data module accepts; subclasses override ``name`` with their registry name."""

    name: str = "???"
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    max_train_samples: int | None = None  # seeded random subset of the training split (seed = run seed)
    max_train_per_class: int | None = None  # seeded per-class cap on the training split (learning curves)
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=dict)  # evaluated after test: test/<name>/<metric>
    eval_sets_every_val: bool = False  # also score them at each validation: eval/<name>/<metric> (never a monitor)

    eval_set_kinds: ClassVar[tuple[str, ...]] = ()  # which EVAL_SET_KINDS this data module can make

    def __post_init__(self) -> None:
        for name, spec in self.eval_sets.items():
            self.check_eval_set(name, spec)
        if self.eval_sets_every_val and not self.eval_sets:
            raise ValueError("eval_sets_every_val: true, but no eval_sets are defined (data.eval_sets.<name>=...)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be >= 1 or null, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples: must be >= 1 or null, got {self.max_train_samples}")
        if self.max_train_per_class is not None and self.max_train_per_class < 1:
            raise ValueError(f"max_train_per_class: must be >= 1 or null, got {self.max_train_per_class}")

    @property
    def has_target(self) -> bool:
        """Whether the config defines a target domain for domain adaptation (data modules that support one
        override this)."""
        return False

    def val_source(self) -> str | None:
        """The key that gives the validation split explicitly (k-fold needs it drawn from train), or None."""
        return None

    def check_eval_set(self, name: str, spec: EvalSetConfig) -> None:
        """Refuse, at config validation, a set this data module cannot make or whose settings are out of range."""
        key = f"eval_sets.{name}"
        if not name.replace("_", "").replace("-", "").isalnum() or name in RESERVED_EVAL_SET_NAMES:
            raise ValueError(
                f"{key}: a set name is part of its metric names (test/<name>/...): letters, digits, _ and - only, "
                f"not {', '.join(RESERVED_EVAL_SET_NAMES)}"
            )
        given = [k for k in EVAL_SET_KINDS if getattr(spec, k) is not None]
        if len(given) != 1:
            raise ValueError(f"{key}: set exactly one of {', '.join(EVAL_SET_KINDS)}; got {given or 'none'}")
        kind = given[0]
        if kind not in self.eval_set_kinds:
            raise ValueError(
                f"{key}.{kind}: data '{self.name}' makes evaluation sets from "
                f"{', '.join(self.eval_set_kinds) or 'nothing'}, not {kind}"
            )
        if kind == "corruption" and spec.corruption not in CORRUPTIONS:
            raise ValueError(f"{key}.corruption: unknown {spec.corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
        if (kind in GRADED_KINDS) != (spec.severity is not None):
            raise ValueError(f"{key}.severity: required with a corruption or text_noise (1..5), and only with one")
        if spec.severity is not None and spec.severity not in SEVERITIES:
            raise ValueError(f"{key}.severity: must be 1..5; got {spec.severity}")
        if kind == "text_noise" and spec.text_noise not in TEXT_NOISES:
            raise ValueError(f"{key}.text_noise: unknown {spec.text_noise!r}; choose one of {', '.join(TEXT_NOISES)}")
        if kind == "shift" and spec.shift not in TARGET_SHIFTS:
            raise ValueError(f"{key}.shift: unknown {spec.shift!r}; choose one of {', '.join(TARGET_SHIFTS)}")
        if kind == "path":
            self.check_eval_path(f"{key}.path", spec.path)

    def check_eval_path(self, key: str, path: str) -> None:
        """A labelled evaluation set in the training format: a table file (image folders: a class-folder root)."""
        check_path(key, path)


def check_path(key: str, path: str | None, directory: bool = False) -> None:
    """Fail at config validation, before any model is loaded, when an input file/folder is missing."""
    if path is None:
        return
    found = Path(path).is_dir() if directory else Path(path).is_file()
    if not found:
        kind = "directory" if directory else "file"
        raise FileNotFoundError(
            f"{key}: no such {kind} {path!r} (relative paths resolve against the launch directory {Path.cwd()})"
        )


def check_fraction(field_name: str, value: float) -> None:
    """Validation split fractions must leave something on both sides."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"{field_name}: must be in (0, 1), got {value}")


def read_label_names(key: str, value: str | list[Any]) -> list[str]:
    """Class names in index order: a list, or a text file with one name per line (AG News' ``classes.txt``)."""
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{key}: no such file {value!r} (a list of names or a file with one name per line)")
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    else:
        names = [str(name) for name in value]
    if len(names) < 2:
        raise ValueError(f"{key}: need at least 2 class names, got {names}")
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"{key}: duplicate class name(s) {duplicates}")
    return names


def label_columns(value: Any) -> list[str]:
    """``label_column`` as a list of column names (several: 0/1 tag columns or regression targets)."""
    return [str(c) for c in value] if isinstance(value, list | tuple) else [str(value)]


def check_label_keys(cfg: Any) -> None:
    """The label keys every table-reading data module shares (label_column, label_separator, label_names,
    label_base, bad_rows), checked the same way at config validation."""
    columns = label_columns(cfg.label_column)
    if not columns or len(set(columns)) < len(columns):
        raise ValueError(f"label_column: a column name or a list of distinct ones, got {cfg.label_column!r}")
    if cfg.label_separator is not None and not cfg.label_separator:
        raise ValueError("label_separator: must be a non-empty string or null")
    if cfg.label_names is not None:
        read_label_names("label_names", cfg.label_names)
    if cfg.label_base not in (None, 0, 1):
        raise ValueError(f"label_base: must be 0, 1 or null (inferred), got {cfg.label_base}")
    if cfg.bad_rows not in BAD_ROWS:
        raise ValueError(f"bad_rows: must be one of {', '.join(BAD_ROWS)}, got {cfg.bad_rows!r}")


FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet")
FORMAT_BY_EXTENSION = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
COMPRESSION_BY_EXTENSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4", ".br": "brotli"}
BAD_ROWS = ("error", "skip")


def split_suffixes(path: str | Path) -> tuple[str, str | None]:
    """``(format suffix, compression codec)``: ``train.csv.gz`` -> ``(".csv", "gzip")``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    codec = COMPRESSION_BY_EXTENSION.get(suffixes[-1]) if suffixes else None
    if codec is not None:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), codec


def infer_format(key: str, path: str, fmt: str) -> str:
    """The table format of ``path``: explicit ``fmt``, else from its extension (compression suffixes skipped)."""
    if fmt != "auto":
        return fmt
    suffix, _ = split_suffixes(path)
    if suffix not in FORMAT_BY_EXTENSION:
        raise ValueError(
            f"{key}: cannot infer the format of {path!r} from its extension ({', '.join(FORMAT_BY_EXTENSION)}, "
            f"optionally + {', '.join(COMPRESSION_BY_EXTENSION)}); set format: {' | '.join(FORMATS[1:])}"
        )
    return FORMAT_BY_EXTENSION[suffix]


@DATA.register("digits", "src.data.digits:DigitsDataModule")
@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    source_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # for backbone pretraining
    target_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])  # re-indexed 0..k-1 in order
    labels_per_class: int = 10  # labelled target training images per class (few-shot)
    val_per_class: int = 20  # validation images per target class; the rest of the target images are test
    target_shift: str | None = None  # domain adaptation: invert | rotate | noise (a shifted target domain)

    eval_set_kinds: ClassVar[tuple[str, ...]] = ("corruption", "shift")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("source_classes", "target_classes"):
            classes = getattr(self, key)
            if any(not 0 <= c <= 9 for c in classes) or len(set(classes)) != len(classes):
                raise ValueError(f"{key}: must be distinct digits 0..9, got {classes}")
        if len(self.target_classes) < 2:
            raise ValueError(f"target_classes: need at least 2 classes, got {self.target_classes}")
        if overlap := sorted(set(self.source_classes) & set(self.target_classes)):
            raise ValueError(f"target_classes: must be disjoint from source_classes, both contain {overlap}")
        if self.labels_per_class < 1:
            raise ValueError(f"labels_per_class: must be >= 1, got {self.labels_per_class}")
        if self.val_per_class < 1:
            raise ValueError(f"val_per_class: must be >= 1, got {self.val_per_class}")
        if self.target_shift is not None and self.target_shift not in TARGET_SHIFTS:
            raise ValueError(
                f"target_shift: must be one of {', '.join(TARGET_SHIFTS)} or null, got {self.target_shift!r}"
            )

    def val_source(self) -> str | None:
        return "data.val_per_class (digits draws its own validation images)"

    @property
    def has_target(self) -> bool:
        return self.target_shift is not None


@dataclass
class ImageConfig(DataConfig):
    """How every image data module decodes, caches and augments (class folders or a manifest)."""

    val_fraction: float = 0.2
    image_size: int | None = None  # None: the backbone's preprocessing.image_size, else 224
    hflip: bool = True  # random horizontal flip, training split only
    cache_images: bool = True  # decoded, resized images in memory + disk cache (uint8: 3 * image_size**2 bytes each)
    cache_dir: str | None = None  # disk cache root; None: $TRANSFER_LAB_CACHE, else ~/.cache/transfer-lab
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "bmp", "gif", "webp"])

    eval_set_kinds: ClassVar[tuple[str, ...]] = ("corruption", "path")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("val_fraction", self.val_fraction)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1 or null, got {self.image_size}")
        if not self.extensions:
            raise ValueError(f"extensions: must list at least one file extension, got {self.extensions}")

    def suffixes(self) -> set[str]:
        return {"." + ext.lower().lstrip(".") for ext in self.extensions}


@DATA.register("image_folder", "src.data.image_folder:ImageFolderDataModule")
@dataclass
class ImageFolderConfig(ImageConfig):
    name: str = "image_folder"
    train_dir: str = MISSING  # required
    val_dir: str | None = None  # None: a seeded stratified val_fraction of train_dir
    test_dir: str | None = None  # None: test on the validation split
    target_dir: str | None = None  # domain adaptation: unlabelled target-domain images (any layout under it)
    target_test_dir: str | None = None  # labelled target-domain class folders, for evaluation only
    label_names: Any = None  # class names for the sorted sub-folders, in that order: a list or a file; None: folders

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_dir == MISSING:
            raise ValueError(f"train_dir: required, got {self.train_dir!r}")
        for key in ("train_dir", "val_dir", "test_dir", "target_dir", "target_test_dir"):
            check_path(key, getattr(self, key), directory=True)
        if self.target_test_dir is not None and self.target_dir is None:
            raise ValueError("target_test_dir: needs target_dir (the unlabelled target training images) too")
        suffixes = self.suffixes()
        for key in ("target_dir", "target_test_dir"):  # the target must be the same kind of input as the source
            root = getattr(self, key)
            if root is not None and not any(p.suffix.lower() in suffixes for p in Path(root).rglob("*")):
                raise ValueError(
                    f"{key}: no files with extensions {sorted(suffixes)} under {root} (the target domain must be "
                    "images, like the source)"
                )
        if self.label_names is not None:
            read_label_names("label_names", self.label_names)

    def val_source(self) -> str | None:
        return "data.val_dir" if self.val_dir is not None else None

    def check_eval_path(self, key: str, path: str) -> None:
        check_path(key, path, directory=True)

    @property
    def has_target(self) -> bool:
        return self.target_dir is not None


PATH_KEYS = ("train_path", "val_path", "test_path")
TARGET_KEYS = ("target_path", "target_test_path")  # domain adaptation: target-domain tables (src.adapt)


@DATA.register("text_table", "src.data.text_table:TextTableDataModule")
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
    label_column: Any = "label"  # a column, or a list of columns: 0/1 tags (multilabel) or targets (regression)
    label_separator: str | None = None  # multilabel: the character between tags in one cell, e.g. "," in "8,20"
    label_names: Any = None  # class names in index order: a list, or a file with one name per line
    label_base: int | None = None  # integer labels index label_names from 0 or 1; None: inferred from train
    bad_rows: str = "error"  # rows with a wrong field count, an empty text/label or an unknown label: error | skip
    val_fraction: float = 0.1
    max_length: int = 128  # tokens; longer inputs are truncated
    group_by_length: bool = False  # training batches of similar length: less padding, batches still random
    lowercase: bool = False
    cache: bool = True  # keep parsed, tokenised tables in the shared on-disk cache (namespace "tokenized")
    cache_dir: str | None = None  # None: $TRANSFER_LAB_CACHE or ~/.cache/transfer-lab

    eval_set_kinds: ClassVar[tuple[str, ...]] = ("path", "text_noise")

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
        check_label_keys(self)
        check_fraction("val_fraction", self.val_fraction)
        if self.max_length < 1:
            raise ValueError(f"max_length: must be >= 1, got {self.max_length}")

    def val_source(self) -> str | None:
        given = [f"data.{k}" for k in ("val_path", "val_split") if getattr(self, k) is not None]
        return given[0] if given else None

    @property
    def has_target(self) -> bool:
        return self.target_path is not None

    def _check_target_columns(self, key: str) -> None:
        path, fmt = Path(getattr(self, key)), self.format_of(key)
        columns = peek_columns(path, fmt, self.encoding) if self.column_names is None else self.column_names
        needed = [*self.text_columns(), self.text_pair_column, *(self.label_columns() if key != "target_path" else [])]
        if missing := [c for c in needed if c is not None and c not in columns]:
            raise ValueError(
                f"{key}: {path} has no column {missing[0]!r} (the target domain needs the source's columns); "
                f"columns: {columns}"
            )

    def check_eval_path(self, key: str, path: str) -> None:
        check_path(key, path)
        infer_format(key, path, self.format)

    def format_of(self, key: str) -> str:
        """The table format of the file in config field ``key`` (explicit, or from its extension)."""
        return infer_format(key, getattr(self, key), self.format)

    def text_columns(self) -> list[str]:
        """``text_column`` as a list of column names (integers address the columns of a headerless file)."""
        value = self.text_column
        return [str(c) for c in value] if isinstance(value, list | tuple) else [str(value)]

    def label_columns(self) -> list[str]:
        return label_columns(self.label_column)

    def has_header(self) -> bool:
        return self.header if self.header is not None else self.column_names is None


def peek_columns(path: Path, fmt: str, encoding: str) -> list[str]:
    """A table's column names without reading it all (none for a file that is not a table, e.g. an image)."""
    from src.data.tables import read_text_bytes  # pyarrow: imported only when a target table is configured

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


@DATA.register("image_manifest", "src.data.image_manifest:ImageManifestDataModule")
@dataclass
class ImageManifestConfig(ImageConfig):
    name: str = "image_manifest"
    train_path: str = MISSING  # required: a table (csv, tsv, jsonl, parquet) with a header row
    val_path: str | None = None  # None: a seeded stratified val_fraction of train
    test_path: str | None = None  # None: test on the validation split
    image_column: str = "image"  # image file paths, relative to image_root
    image_root: str | None = None  # None: each manifest's own folder
    label_column: Any = "label"  # a column, or a list of columns: 0/1 tags (multilabel) or targets (regression)
    label_separator: str | None = None  # multilabel: the character between tags in one cell, e.g. "," in "8,20"
    label_names: Any = None  # class / tag names in index order: a list, or a file with one name per line
    label_base: int | None = None  # integer labels index label_names from 0 or 1; None: inferred from train
    bad_rows: str = "error"  # rows with a missing or unreadable image, no label or an invalid one: error | skip
    format: str = "auto"  # auto (from the extension) | csv | tsv | jsonl | parquet
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_path == MISSING:
            raise ValueError("train_path: required (a table with an image path column and the label column(s))")
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for key in PATH_KEYS:
            check_path(key, getattr(self, key))
            if getattr(self, key) is not None:
                infer_format(key, getattr(self, key), self.format)
        check_path("image_root", self.image_root, directory=True)
        check_label_keys(self)

    def val_source(self) -> str | None:
        return "data.val_path" if self.val_path is not None else None

    def check_eval_path(self, key: str, path: str) -> None:
        check_path(key, path)
        infer_format(key, path, self.format)
