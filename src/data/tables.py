"""Reading users' tables as they come: CSV / TSV / JSON lines / Parquet (plain or compressed), with or without a
header row, in any text encoding; and Hugging Face hub datasets by name and split.

Files are parsed with pyarrow (already installed with MLflow): its CSV reader is fast, reports the line of every
row with the wrong number of fields, and reads Parquet and compressed files natively. Hub datasets go through
Hugging Face `datasets` (optional extra ``hub``), read from its local cache first so an offline machine with the
data cached never touches the network, and fail fast with a `ConfigError` when neither cache nor hub has them.

Every user-caused problem raises `src.schema.ConfigError` naming the config key, the file, the line (or byte
offset) and what would be valid.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from src.data.config import infer_format, split_suffixes
from src.schema import ConfigError

log = logging.getLogger(__name__)

MAX_LISTED = 10  # line numbers quoted in one message


@dataclass
class RawTable:
    """One source's columns as Python lists, the file line of each row, and what was noticed while reading."""

    where: str  # "train_path: data/train.csv" -- how messages name this source
    columns: dict[str, list[Any] | pa.ChunkedArray]  # Arrow columns become lists when first used
    lines: list[int]  # 1-based line (record) number of each row, for messages
    warnings: list[str] = field(default_factory=list)
    label_names: dict[str, list[str]] = field(default_factory=dict)  # class names a source declares per column

    def column(self, name: str, hint: str = "") -> list[Any]:
        if name not in self.columns:
            raise ConfigError(f"{self.where} has no column {name!r}; available columns: {list(self.columns)}{hint}")
        values = self.columns[name]
        if isinstance(values, pa.ChunkedArray):
            values = self.columns[name] = values.to_pylist()
        return values

    def label_cells(self, columns: list[str], hint: str = "") -> list[Any]:
        """Each row's label as text (None: empty), a tuple of texts for several label columns (None when one is
        empty): what a task's codec turns into targets."""
        cells = [[label_text(v) for v in self.column(name, hint)] for name in columns]
        return cells[0] if len(cells) == 1 else [None if None in row else row for row in zip(*cells, strict=True)]


def label_text(value: Any) -> str | None:
    """A label cell as text: None/empty -> None; integral floats (Parquet/JSON ``1.0``) -> ``"1"``; a list (JSON,
    Parquet or hub tags) -> its JSON text."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return json.dumps([label_text(v) for v in value]) if len(value) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def listed(lines: list[int]) -> str:
    """``"3, 7, 9"`` or ``"3, 7, ... (25 in all)"``: line numbers for a message."""
    shown = ", ".join(map(str, lines[:MAX_LISTED]))
    return shown if len(lines) <= MAX_LISTED else f"{shown}, ... ({len(lines)} in all)"


def read_text_bytes(where: str, path: Path, encoding: str) -> bytes:
    """The file's content (decompressed) as UTF-8 bytes; a decoding error names the byte offset and line."""
    _, codec = split_suffixes(path)
    with pa.input_stream(str(path), compression=codec) as stream:
        raw = stream.read()
    codec_name = encoding.lower().replace("_", "-")
    if codec_name in ("utf-8", "utf8", "utf-8-sig"):
        with contextlib.suppress(UnicodeDecodeError):  # the common case: valid UTF-8 goes to the parser as is
            raw.decode("utf-8")
            return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        text = raw.decode("utf-8-sig" if codec_name in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where_bytes = "of the decompressed content " if codec else ""
        raise ConfigError(
            f"{where} is not valid {encoding}: byte {raw[e.start : e.start + 1]!r} at byte offset {e.start} "
            f"{where_bytes}(line {line}) ({e.reason}); set the file's encoding, e.g. encoding: latin-1 | cp1252 | "
            "utf-16"
        ) from None
    return text.encode("utf-8")


def looks_like_data(names: list[str]) -> bool:
    """A header row whose fields are numbers or sentences was probably the first data row."""

    def data_like(name: str) -> bool:
        with contextlib.suppress(ValueError):
            return math.isfinite(float(name))
        return len(name.split()) >= 4

    return any(data_like(name) for name in names)


def _read_delimited(
    where: str,
    data: bytes,
    fmt: str,
    header: bool,
    column_names: list[str] | None,
    bad_rows: str,
) -> RawTable:
    """CSV (RFC 4180 quoting) or TSV (unquoted, as GLUE writes it: texts contain bare quotes) via pyarrow."""
    invalid: list[tuple[int, int, int]] = []  # (line, expected fields, actual fields)

    def on_invalid(row: Any) -> str:
        invalid.append((row.number, row.expected_columns, row.actual_columns))
        return "skip"

    if not data.strip():
        raise ConfigError(f"{where} is empty")
    data = data.rstrip(b"\r\n") + b"\n"  # trailing blank lines are no rows; blank lines inside are bad rows
    parse = pa_csv.ParseOptions(
        delimiter="\t" if fmt == "tsv" else ",",
        quote_char=False if fmt == "tsv" else '"',
        newlines_in_values=fmt == "csv",
        ignore_empty_lines=False,  # so that pyarrow's row numbers are line numbers
        invalid_row_handler=on_invalid,
    )
    # use_threads=False: pyarrow then reports each invalid row's line number (it is None with threads)
    read = pa_csv.ReadOptions(
        use_threads=False,
        column_names=column_names,
        autogenerate_column_names=not header and column_names is None,
        skip_rows=1 if header and column_names is not None else 0,
    )
    try:
        names = pa_csv.open_csv(io.BytesIO(data), read_options=read, parse_options=parse).schema.names
        invalid.clear()  # the probe above parses the first block; the full read below reports every row
        convert = pa_csv.ConvertOptions(  # every column as text: "007" stays "007", labels stay as written
            column_types={name: pa.string() for name in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        table = pa_csv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        raise ConfigError(f"{where}: cannot parse as {fmt}: {e}") from None
    warnings = []
    actual = {count for _, _, count in invalid}
    if column_names is not None and len(actual) == 1 and len(invalid) > table.num_rows:  # most rows: the names
        raise ConfigError(
            f"{where}: column_names has {len(column_names)} names {column_names}, but the file's rows have "
            f"{actual.pop()} fields; give one name per field"
        )
    if invalid:
        by_count: dict[tuple[int, int], list[int]] = {}
        for line, expected, actual in invalid:
            by_count.setdefault((expected, actual), []).append(line)
        detail = "; ".join(
            f"{actual} instead of {expected} fields on line(s) {listed(lines)}"
            for (expected, actual), lines in by_count.items()
        )
        message = f"{where}: {len(invalid)} row(s) with the wrong number of fields: {detail}"
        if bad_rows == "error":
            raise ConfigError(f"{message}; fix them or set bad_rows: skip")
        warnings.append(f"{message}; skipped (bad_rows: skip)")
    if not header and column_names is None:  # pyarrow names them f0, f1, ...: users address them as 0, 1, ...
        table = table.rename_columns([str(i) for i in range(table.num_columns)])
    elif header and column_names is None and looks_like_data(table.column_names):
        warnings.append(
            f"{where}: the header row {table.column_names[:4]} looks like data; if the file has no header, "
            f"set column_names: [...] ({table.num_columns} names) or header: false"
        )
    bad = {line for line, _, _ in invalid}
    first = 2 if header else 1  # the line of the first data row
    lines = [n for n in range(first, first + table.num_rows + len(bad)) if n not in bad]
    return RawTable(where, arrow_columns(table), lines, warnings)


def _read_json_lines(where: str, data: bytes, bad_rows: str) -> RawTable:
    """One JSON object per line (blank lines ignored); a file holding one JSON array of objects works too."""
    text = data.decode("utf-8")
    warnings = []
    if text.lstrip().startswith("["):
        try:
            numbered = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        numbered, bad = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                (numbered.append((n, record)) if isinstance(record, dict) else bad.append(n))
        if bad:
            message = f'{where}: line(s) {listed(bad)} are not JSON objects ({{"column": value, ...}})'
            if bad_rows == "error":
                raise ConfigError(f"{message}; fix them or set bad_rows: skip")
            warnings.append(f"{message}; skipped (bad_rows: skip)")
    if not_objects := [n for n, record in numbered if not isinstance(record, dict)]:
        raise ConfigError(f'{where}: record(s) {listed(not_objects)} are not JSON objects ({{"column": value, ...}})')
    names = list(dict.fromkeys(key for _, record in numbered for key in record))
    columns = {name: [record.get(name) for _, record in numbered] for name in names}
    return RawTable(where, columns, [n for n, _ in numbered], warnings)


def _read_parquet(where: str, path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{where}: cannot read as Parquet: {e}") from None
    return RawTable(
        where, arrow_columns(table), list(range(1, table.num_rows + 1)), label_names=class_label_names(table.schema)
    )


def arrow_columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table.column(name) for name in table.column_names}


def class_label_names(schema: pa.Schema) -> dict[str, list[str]]:
    """Class names that Hugging Face `datasets` stores in a Parquet file's metadata (``ClassLabel`` columns)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    with contextlib.suppress(ValueError, AttributeError):
        features = json.loads(meta).get("info", {}).get("features", {})
        return {
            name: list(feature["names"])
            for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names")
        }
    return {}


def read_table(
    key: str,
    path: str | Path,
    fmt: str = "auto",
    *,
    header: bool = True,
    column_names: list[str] | None = None,
    encoding: str = "utf-8",
    bad_rows: str = "error",
) -> RawTable:
    """Parse one table file into columns. ``key`` is the config key that named it (used in every message)."""
    path = Path(path)
    where = f"{key}: {path}"
    fmt = infer_format(key, str(path), fmt)
    if fmt == "parquet":
        return _read_parquet(where, path)
    data = read_text_bytes(where, path, encoding)
    if fmt == "jsonl":
        return _read_json_lines(where, data, bad_rows)
    return _read_delimited(where, data, fmt, header, column_names, bad_rows)


# --- Hugging Face hub datasets ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make `datasets` answer from its local cache only (it reads these two flags on every call)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


HUB_PROBE_TIMEOUT_S = 10.0


def load_hub_dataset(name: str, config_name: str | None) -> Any:
    """The `datasets.DatasetDict` of hub dataset ``name`` (or a local dataset folder / `save_to_disk` folder).

    Order: a local folder; the local Hugging Face cache (no network, so offline machines work and online ones
    skip a round trip); the hub, after one short reachability probe, so an offline machine gets an error in
    seconds instead of `datasets`' minute of retries.
    """
    try:
        import datasets
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise ConfigError(
            "hf_dataset: reading hub datasets needs the Hugging Face `datasets` library: pip install -e '.[hub]'"
        ) from None
    local = Path(name)
    if local.is_dir() and any((local / f).exists() for f in ("dataset_dict.json", "state.json")):
        return datasets.load_from_disk(str(local))
    try:
        with _hub_offline():
            return datasets.load_dataset(name, config_name)
    except ValueError as e:  # e.g. an unknown config name: the cache answered, the request is wrong
        raise ConfigError(f"hf_dataset: {name!r}: {e}") from None
    except (ConnectionError, FileNotFoundError) as e:
        if local.exists():
            raise ConfigError(f"hf_dataset: cannot read the local dataset folder {name!r}: {e}") from None
    where = f"not in the local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"hf_dataset: {name!r} is {where} and HF_HUB_OFFLINE is set; run once with network access to cache it, "
            "or use train_path for local files"
        ) from None
    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"hf_dataset: no dataset {name!r} on the Hugging Face hub (and {where})") from None
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub means: cannot download it
        raise ConfigError(
            f"hf_dataset: {name!r} is {where} and the hub is unreachable ({type(e).__name__}: {e}); run once with "
            "network access to cache it, or use train_path for local files"
        ) from None
    try:
        return datasets.load_dataset(name, config_name)
    except ValueError as e:
        raise ConfigError(f"hf_dataset: {name!r}: {e}") from None


def hub_split(key: str, dataset_dict: Any, name: str, split: str) -> Any:
    """Split ``split`` of a loaded hub dataset (a memory-mapped `datasets.Dataset`)."""
    if split not in dataset_dict:
        raise ConfigError(f"{key}: {split!r} is not a split of hf_dataset {name!r}; splits: {list(dataset_dict)}")
    return dataset_dict[split]


def hub_table(where: str, dataset: Any) -> RawTable:
    """A hub split's columns; ``ClassLabel`` features contribute their class names."""
    table = dataset.with_format("arrow")[:]
    label_names = {}
    for column, feature in dataset.features.items():
        inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) / List(ClassLabel): tags
        if type(inner).__name__ == "ClassLabel":
            label_names[column] = list(inner.names)
    return RawTable(where, arrow_columns(table), list(range(1, table.num_rows + 1)), label_names=label_names)
