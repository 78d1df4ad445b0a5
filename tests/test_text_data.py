"""Users' text data as it comes: formats, headerless files, joined columns, label names, the read+tokenise cache,
hub datasets, and every bad input failing with a message that names the file and line."""

from __future__ import annotations

import bz2
import csv
import gzip
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from src.backbones.base import Preprocessing
from src.cache import Cache
from src.data import DATA
from src.data.tables import read_table
from src.data.text_table import CACHE_NAMESPACE
from src.schema import ConfigError
from tests.test_data import all_labels, build, token_rows

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
TOPIC_WORDS = ["election summit minister", "match goal coach", "market shares profit", "software chip research"]


def news_rows(n: int = 24) -> list[list[str]]:
    """AG News layout: ``"<1-based class>","<title>","<description>"``, texts with commas and quotes."""
    return [
        [str(i % 4 + 1), f"Title {i}: {TOPIC_WORDS[i % 4]}", f'Story {i}, "quoted", about {TOPIC_WORDS[i % 4]}']
        for i in range(n)
    ]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    return path


def write_parquet(path: Path, rows: list[list[str]], names: list[str]) -> Path:
    columns = list(zip(*rows, strict=True))
    pq.write_table(pa.table({name: list(col) for name, col in zip(names, columns, strict=True)}), path)
    return path


NEWS = {"column_names": ["label", "title", "description"], "text_column": ["title", "description"]}


@pytest.fixture
def classes_txt(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def news_node(train: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "text_table", "train_path": str(train), "val_fraction": 0.25, **extra}


def decoded(dm: Any, split: str, tokenizer: Any) -> list[str]:
    dataset = getattr(dm, f"{split}_dataloader")().dataset
    return [tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True) for i in range(len(dataset))]


# --- formats and layouts --------------------------------------------------------------------------------------


def test_headerless_ag_news_csv_with_class_file(tmp_path: Path, text_pre: Preprocessing, classes_txt: Path) -> None:
    train = write_csv(tmp_path / "train.csv", news_rows())
    test = write_csv(tmp_path / "test.csv", news_rows(8))
    dm = build(news_node(train, test_path=str(test), label_names=str(classes_txt), **NEWS), text_pre)
    assert dm.names == CLASSES and dm.label_mapping == {name: i for i, name in enumerate(CLASSES)}
    # 1-based file labels 1..4 -> class indices 0..3; row i has class i % 4
    assert all_labels(dm.test_dataloader().dataset) == [i % 4 for i in range(8)]
    first = decoded(dm, "test", text_pre.tokenizer)[0]
    assert first == 'title 0 : election summit minister story 0, " quoted ", about election summit minister'


def test_text_pair_instead_of_joined_columns(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_csv(tmp_path / "train.csv", news_rows())
    node = news_node(train, column_names=NEWS["column_names"], text_column="title", text_pair_column="description")
    batch = next(iter(build(node, text_pre).train_dataloader()))
    assert batch["token_type_ids"].max() == 1  # description is the second segment
    joined = next(iter(build(news_node(train, **NEWS), text_pre).train_dataloader()))
    assert joined["token_type_ids"].max() == 0


def test_header_false_addresses_columns_by_index(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = tmp_path / "train.tsv"  # unquoted, as GLUE writes TSV: the quotes are part of the text
    train.write_text("".join("\t".join(row) + "\n" for row in news_rows()))
    node = news_node(train, header=False, text_column=[1, 2], label_column="0")
    dm = build(node, text_pre)
    assert dm.names == ["1", "2", "3", "4"]  # no label_names: the labels as written, numerically sorted
    assert '" quoted ", about' in decoded(dm, "val", text_pre.tokenizer)[0]


def test_parquet_gives_the_same_splits_as_csv(tmp_path: Path, text_pre: Preprocessing, classes_txt: Path) -> None:
    rows = news_rows(40)
    csv_dm = build(news_node(write_csv(tmp_path / "news.csv", rows), label_names=str(classes_txt), **NEWS), text_pre)
    parquet = write_parquet(tmp_path / "news.parquet", rows, NEWS["column_names"])
    node = news_node(parquet, label_names=str(classes_txt), text_column=NEWS["text_column"])
    parquet_dm = build(node, text_pre)
    assert parquet_dm.names == csv_dm.names
    for split in ("train", "val", "test"):
        a, b = (getattr(dm, f"{split}_dataloader")().dataset for dm in (csv_dm, parquet_dm))
        assert token_rows(a) == token_rows(b) and all_labels(a) == all_labels(b)


def test_parquet_written_by_datasets_keeps_class_names(tmp_path: Path, text_pre: Preprocessing) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSES)})
    rows = {"text": [f"{TOPIC_WORDS[i % 4]} {i}" for i in range(16)], "label": [i % 4 for i in range(16)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "train.parquet")
    dm = build(news_node(tmp_path / "train.parquet", text_column="text"), text_pre)
    assert dm.names == CLASSES  # from the file's metadata; integer labels are 0-based indices


@pytest.mark.parametrize("name", ["t.csv.gz", "t.tsv.bz2", "t.jsonl.zst", "t.json", "t.jsonl"])
def test_compressed_and_json_variants(tmp_path: Path, text_pre: Preprocessing, name: str) -> None:
    rows = [{"sentence": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    if ".json" in name:
        body = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    else:
        sep = "\t" if ".tsv" in name else ","
        body = f"sentence{sep}label\n" + "".join(f"{r['sentence']}{sep}{r['label']}\n" for r in rows)
    data = body.encode()
    path = tmp_path / name
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".bz2"):
        data = bz2.compress(data)
    elif name.endswith(".zst"):
        data = pa.Codec("zstd").compress(data, asbytes=True)
    path.write_bytes(data)
    dm = build({"name": "text_table", "train_path": str(path), "val_fraction": 0.2}, text_pre)
    assert dm.names == ["neg", "pos"] and len(dm.train_dataloader().dataset) == 8


def test_explicit_format_for_an_unknown_extension(tmp_path: Path, text_pre: Preprocessing) -> None:
    path = tmp_path / "data.txt"
    path.write_text("".join(f"text {i}\t{i % 2}\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"cannot infer the format of .*data.txt.*set format: csv \| tsv"):
        DATA.config({"name": "text_table", "train_path": str(path)})
    dm = build(
        {"name": "text_table", "train_path": str(path), "format": "tsv", "column_names": ["sentence", "label"]},
        text_pre,
    )
    assert dm.names == ["0", "1"]


def test_more_column_names_than_fields_names_column_names(tmp_path: Path, text_pre: Preprocessing) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("".join(f"text {i}\t{i % 2}\n" for i in range(10)))
    node = {"name": "text_table", "train_path": str(path), "column_names": ["id", "sentence", "label"]}
    with pytest.raises(
        ConfigError,
        match=r"column_names has 3 names \['id', 'sentence', 'label'\], but the file's "
        r"rows have 2 fields",
    ):
        build(node, text_pre)


# --- label names ----------------------------------------------------------------------------------------------


def label_table(tmp_path: Path, labels: list[str], name: str = "train.csv") -> Path:
    return write_csv(tmp_path / name, [["sentence", "label"]] + [[f"text {i}", y] for i, y in enumerate(labels)])


@pytest.mark.parametrize(
    ("labels", "extra", "expected"),
    [
        (["0", "1", "2"] * 4, {}, [0, 1, 2]),  # 0-based: 0 occurs
        (["1", "2", "3"] * 4, {}, [0, 1, 2]),  # 1-based: 3 (= k) occurs
        (["neg", "neu", "pos"] * 4, {}, [0, 1, 2]),  # by name
        (["pos", "neg", "neu"] * 4, {}, [2, 0, 1]),
        (["1", "2"] * 6, {"label_base": 1}, [0, 1]),  # ambiguous 1..2 of 3 names: explicit base
        (["1", "2"] * 6, {"label_base": 0}, [1, 2]),
    ],
)
def test_label_names_map_names_and_integer_labels(
    tmp_path: Path, text_pre: Preprocessing, labels: list[str], extra: dict[str, Any], expected: list[int]
) -> None:
    node = {
        "name": "text_table",
        "train_path": str(label_table(tmp_path, labels)),
        "label_names": ["neg", "neu", "pos"],
    }
    node["val_path"] = node["train_path"]
    dm = build({**node, **extra}, text_pre)
    assert dm.names == ["neg", "neu", "pos"]
    assert all_labels(dm.val_dataloader().dataset)[: len(expected)] == expected


def test_ambiguous_integer_labels_ask_for_label_base(tmp_path: Path, text_pre: Preprocessing) -> None:
    node = {
        "name": "text_table",
        "train_path": str(label_table(tmp_path, ["1", "2"] * 6)),
        "label_names": ["a", "b", "c"],
    }
    with pytest.raises(ConfigError, match=r"label_base: .*\(1\.\.2\) index the 3 label_names either from 0 or from 1"):
        build(node, text_pre)


def test_labels_outside_label_names(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = label_table(tmp_path, ["1", "2", "3", "4"] * 3 + ["7", "x"])
    node = {"name": "text_table", "train_path": str(train), "label_names": CLASSES}
    message = (
        rf"train_path: {train} has label\(s\) \['7', 'x'\] outside label_names \(line\(s\) 14, 15\); "
        r"label_names: \['World', 'Sports', 'Business', 'Sci/Tech'\] \(or their 1-based indices 1\.\.4\)"
    )
    with pytest.raises(ConfigError, match=message):
        build(node, text_pre)
    with pytest.warns(UserWarning, match=r"outside label_names .*; skipped \(bad_rows: skip\)"):
        dm = build({**node, "bad_rows": "skip", "val_fraction": 0.25}, text_pre)
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 12


def test_label_names_config_errors(tmp_path: Path) -> None:
    train = label_table(tmp_path, ["0", "1"] * 4)
    node = {"name": "text_table", "train_path": str(train)}
    with pytest.raises(ValueError, match="label_names: no such file 'nope.txt'"):
        DATA.config({**node, "label_names": "nope.txt"})
    with pytest.raises(ValueError, match=r"label_names: duplicate class name\(s\) \['a'\]"):
        DATA.config({**node, "label_names": ["a", "b", "a"]})
    with pytest.raises(ValueError, match="label_base: must be 0, 1 or null"):
        DATA.config({**node, "label_base": 2})


# --- the read + tokenise cache --------------------------------------------------------------------------------


def cached_entries(cache_dir: Path) -> set[str]:
    return {p.stem for p in (cache_dir / CACHE_NAMESPACE).glob("*.pt")}


def test_second_setup_reads_from_the_cache(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_csv(tmp_path / "train.csv", news_rows(40))
    node = news_node(train, cache_dir=str(tmp_path / "cache"), **NEWS)
    first = build(node, text_pre)
    assert first.cache.stats.misses == 1 and first.cache.stats.hits == 0
    again = build({**node, "max_train_samples": 10, "batch_size": 4}, text_pre, seed=1)  # subset/seed: same entry
    assert again.cache.stats.hits == 1 and again.cache.stats.misses == 0
    assert len(cached_entries(tmp_path / "cache")) == 1
    assert set(token_rows(again.train_dataloader().dataset)) <= set(
        token_rows(first.train_dataloader().dataset) + token_rows(first.val_dataloader().dataset)
    )
    off = build({**node, "cache": False, "cache_dir": str(tmp_path / "unused")}, text_pre)
    assert token_rows(off.val_dataloader().dataset) == token_rows(first.val_dataloader().dataset)
    assert not (tmp_path / "unused").exists()


def test_cache_key_follows_content_columns_tokenizer_and_max_length(tmp_path: Path, text_pre: Preprocessing) -> None:
    from transformers import AutoTokenizer

    train = write_csv(tmp_path / "train.csv", news_rows(20))
    cache_dir = tmp_path / "cache"
    node = news_node(train, cache_dir=str(cache_dir), **NEWS)
    build(node, text_pre)
    keys = cached_entries(cache_dir)
    variants: list[tuple[dict[str, Any], Preprocessing]] = [
        ({"max_length": 16}, text_pre),
        ({"text_column": "title"}, text_pre),
        ({"text_separator": " | "}, text_pre),
        ({"lowercase": True}, text_pre),
    ]
    other = AutoTokenizer.from_pretrained(text_pre.tokenizer.name_or_path)
    other.add_tokens(["zzqxnews"])  # another vocabulary, same name and path
    variants.append(({}, Preprocessing(modality="text", tokenizer=other)))
    for change, pre in variants:
        build({**node, **change}, pre)
        new = cached_entries(cache_dir) - keys
        assert len(new) == 1, change
        keys |= new
    write_csv(train, news_rows(20)[::-1])  # same name, other content
    dm = build(node, text_pre)
    assert dm.cache.stats.misses == 1 and len(cached_entries(cache_dir) - keys) == 1
    # labels/names are applied after the cache: changing them reuses the entry
    dm = build({**node, "label_names": CLASSES}, text_pre)
    assert dm.cache.stats.hits == 1 and dm.names == CLASSES


def test_cached_warnings_are_repeated(tmp_path: Path, text_pre: Preprocessing) -> None:
    rows = news_rows(12) + [["1", "only two fields"]]
    node = news_node(write_csv(tmp_path / "t.csv", rows), bad_rows="skip", cache_dir=str(tmp_path / "c"), **NEWS)
    for hits in (0, 1):
        with pytest.warns(
            UserWarning, match=r"1 row\(s\) with the wrong number of fields: 2 instead of 3 fields on line\(s\) 13"
        ):
            dm = build(node, text_pre)
        assert dm.cache.stats.hits == hits


# --- bad input ------------------------------------------------------------------------------------------------


def test_headerless_file_read_with_a_header(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_csv(tmp_path / "train.csv", news_rows())
    with (
        pytest.warns(
            UserWarning, match=r"the header row \['1', 'Title 0: election summit minister', .*looks like data"
        ),
        pytest.raises(ConfigError, match=r"has no column 'sentence'; .*the header row looks like data: .*column_names"),
    ):
        build(news_node(train), text_pre)


def test_header_row_read_as_data(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = write_csv(tmp_path / "train.csv", [["label", "title", "description"], *news_rows()])
    with (
        pytest.warns(UserWarning, match=r"line 1 looks like a header \(label 'label'.*set header: true"),
        pytest.raises(ConfigError, match=r"label\(s\) \['label'\] outside label_names \(line\(s\) 1\)"),
    ):
        build(news_node(train, label_names=CLASSES, **NEWS), text_pre)
    dm = build(news_node(train, header=True, label_names=CLASSES, **NEWS), text_pre)  # header replaced by names
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 24


def test_rows_with_the_wrong_number_of_fields(tmp_path: Path, text_pre: Preprocessing) -> None:
    rows = news_rows(12)
    rows[3] = rows[3] + ["extra"]
    rows[7] = rows[7][:2]
    train = write_csv(tmp_path / "train.csv", rows)
    message = (
        r"2 row\(s\) with the wrong number of fields: 4 instead of 3 fields on line\(s\) 4; "
        r"2 instead of 3 fields on line\(s\) 8; fix them or set bad_rows: skip"
    )
    with pytest.raises(ConfigError, match=message):
        build(news_node(train, **NEWS), text_pre)
    with pytest.warns(UserWarning, match="skipped"):
        dm = build(news_node(train, bad_rows="skip", **NEWS), text_pre)
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 10


def test_empty_texts_and_labels(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = label_table(tmp_path, ["a", "b"] * 5)
    lines = train.read_text().splitlines()
    lines[3] = '"  ",a'  # empty text on line 4
    lines[6] = "text 5,"  # no label on line 7
    train.write_text("\n".join(lines) + "\n")
    node = {"name": "text_table", "train_path": str(train), "val_fraction": 0.25}
    with pytest.raises(ConfigError, match=r"2 row\(s\) with an empty text on line\(s\) 4; no label on line\(s\) 7"):
        build(node, text_pre)
    with pytest.warns(UserWarning, match=r"skipped 2 row\(s\)"):
        dm = build({**node, "bad_rows": "skip"}, text_pre)
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 8


def test_undecodable_bytes_name_the_offset_and_encoding_fixes_it(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = tmp_path / "train.csv"
    train.write_bytes(b"sentence,label\n" + "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(10)).encode("latin-1"))
    node = {"name": "text_table", "train_path": str(train)}
    message = r"train\.csv is not valid utf-8: byte b'\\xe9' at byte offset 18 \(line 2\) .*set the file's encoding"
    with pytest.raises(ConfigError, match=message):
        build(node, text_pre)
    dm = build({**node, "encoding": "latin-1", "val_path": str(train)}, text_pre)
    assert decoded(dm, "val", text_pre.tokenizer)[0] == "cafe 0"  # MiniLM strips accents
    with pytest.raises(ValueError, match="encoding: unknown text encoding 'latin-9x'"):
        DATA.config({**node, "encoding": "latin-9x"})


def test_bad_json_lines(tmp_path: Path, text_pre: Preprocessing) -> None:
    path = tmp_path / "t.jsonl"
    good = [json.dumps({"sentence": f"t {i}", "label": i % 2}) for i in range(8)]
    path.write_text("\n".join(good[:3] + ["{not json"] + good[3:] + ['["a list"]']) + "\n")
    with pytest.raises(ConfigError, match=r"t\.jsonl: line\(s\) 4, 10 are not JSON objects .*set bad_rows: skip"):
        build({"name": "text_table", "train_path": str(path)}, text_pre)
    with pytest.warns(UserWarning, match=r"line\(s\) 4, 10 are not JSON objects .*skipped"):
        dm = build({"name": "text_table", "train_path": str(path), "bad_rows": "skip", "val_path": str(path)}, text_pre)
    assert len(dm.val_dataloader().dataset) == 8


def test_config_errors(tmp_path: Path) -> None:
    train = label_table(tmp_path, ["0", "1"] * 4)
    with pytest.raises(ValueError, match="set exactly one of train_path .* and hf_dataset"):
        DATA.config({"name": "text_table"})
    with pytest.raises(ValueError, match="set exactly one of train_path"):
        DATA.config({"name": "text_table", "train_path": str(train), "hf_dataset": "ag_news"})
    with pytest.raises(ValueError, match="val_path: with hf_dataset, name splits"):
        DATA.config({"name": "text_table", "hf_dataset": "ag_news", "val_path": str(train)})
    parquet = write_parquet(tmp_path / "t.parquet", [["a", "0"]], ["sentence", "label"])
    with pytest.raises(
        ValueError, match=r"column_names: applies to csv/tsv files only \(the files are \['parquet'\]\)"
    ):
        DATA.config({"name": "text_table", "train_path": str(parquet), "column_names": ["a", "b"]})
    with pytest.raises(ValueError, match="column_names: must be distinct"):
        DATA.config({"name": "text_table", "train_path": str(train), "column_names": ["a", "a"]})
    with pytest.raises(ValueError, match="bad_rows: must be one of error, skip"):
        DATA.config({"name": "text_table", "train_path": str(train), "bad_rows": "ignore"})


def test_read_table_line_numbers_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b,c\n1,x,y\n2\n3,z,z\n\n4,w,w\n5,v,v,v\n\n\n")  # a blank line inside, two at the end
    table = read_table("train_path", path, bad_rows="skip")
    # the blank line is a row of empty fields (the data module then reports an empty text on line 5)
    assert table.column("a") == ["1", "3", "", "4"] and table.lines == [2, 4, 5, 6]
    assert "1 instead of 3 fields on line(s) 3; 4 instead of 3 fields on line(s) 7" in table.warnings[0]
    with pytest.raises(ConfigError, match="t.csv: 2 row"):
        read_table("train_path", path)
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="train_path: .*t.csv is empty"):
        read_table("train_path", path)


# --- hub datasets (offline: the local Hugging Face cache, a local folder, save_to_disk) ----------------------


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Hugging Face datasets cache holding 'tiny_news' as a download would leave it."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSES)})
    repo = tmp_path / "repo" / "tiny_news"
    (repo / "data").mkdir(parents=True)
    for split, n in (("train", 24), ("test", 8)):
        rows = {"text": [f"{TOPIC_WORDS[i % 4]} {split} {i}" for i in range(n)], "label": [i % 4 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            repo / "data" / f"{split}-00000-of-00001.parquet"
        )
    datasets.load_dataset(str(repo))  # fills the cache, as load_dataset("tiny_news") online would
    return repo


def test_hub_dataset_from_the_local_cache(hub_cache: Path, text_pre: Preprocessing) -> None:
    node = {"name": "text_table", "hf_dataset": "tiny_news", "text_column": "text", "test_split": "test"}
    dm = build({**node, "cache": False, "val_fraction": 0.25}, text_pre)
    assert dm.names == CLASSES  # from the ClassLabel feature
    assert all_labels(dm.test_dataloader().dataset) == [i % 4 for i in range(8)]
    assert decoded(dm, "test", text_pre.tokenizer)[1] == "match goal coach test 1"
    local = build({**node, "hf_dataset": str(hub_cache), "cache": False, "val_fraction": 0.25}, text_pre)
    assert token_rows(local.test_dataloader().dataset) == token_rows(dm.test_dataloader().dataset)
    with pytest.raises(
        ConfigError,
        match=r"val_split: 'validation' is not a split of hf_dataset 'tiny_news'; splits: \['train', 'test'\]",
    ):
        build({**node, "val_split": "validation"}, text_pre)


def test_hub_dataset_saved_to_disk(tmp_path: Path, text_pre: Preprocessing) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": [f"text {i}" for i in range(12)], "label": ["neg", "pos"] * 6}
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "dev": datasets.Dataset.from_dict(rows)})
    data.save_to_disk(tmp_path / "saved")
    node = {"name": "text_table", "hf_dataset": str(tmp_path / "saved"), "val_split": "dev"}
    node["cache_dir"] = str(tmp_path / "c")
    dm = build(node, text_pre)
    assert dm.names == ["neg", "pos"] and len(dm.val_dataloader().dataset) == 12
    again = build(node, text_pre)
    assert again.cache.stats.hits == 2


def test_hub_dataset_neither_cached_nor_reachable_fails_fast(hub_cache: Path, text_pre: Preprocessing) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"hf_dataset: .*'surely_absent_news_xyz'"):
        build({"name": "text_table", "hf_dataset": "surely_absent_news_xyz"}, text_pre)
    assert time.perf_counter() - start < 30  # one short probe, not datasets' minute of retries


def test_cache_is_the_shared_store(tmp_path: Path, text_pre: Preprocessing) -> None:
    train = label_table(tmp_path, ["a", "b"] * 5)
    dm = build({"name": "text_table", "train_path": str(train), "cache_dir": str(tmp_path / "c")}, text_pre)
    assert isinstance(dm.cache, Cache) and dm.cache.namespace == CACHE_NAMESPACE and dm.cache.size() > 0


def test_max_train_per_class_caps_every_class(tmp_path: Path, text_pre: Preprocessing) -> None:
    rows = [["sentence", "label"], *([f"text {i} of {c}", c] for c in ("neg", "pos", "mid") for i in range(12))]
    node = {"name": "text_table", "train_path": str(write_csv(tmp_path / "t.csv", rows)), "val_fraction": 0.25}
    dm = build({**node, "max_train_per_class": 2, "cache": False}, text_pre)
    assert sorted(all_labels(dm.train_dataloader().dataset)) == [0, 0, 1, 1, 2, 2]
    assert len(dm.val_dataloader().dataset) == 9  # the cap applies to train only


def test_evaluation_by_length_and_training_batches_grouped_by_length(tmp_path: Path, text_pre: Preprocessing) -> None:
    """Validation batches hold texts of near-equal length (little padding), in a shuffled order; `group_by_length`
    training batches pad far less than shuffled ones yet hold every item once per epoch, change every epoch and
    follow the seed."""
    rng = random.Random(0)
    words = [min(60, 1 + int(rng.expovariate(1 / 10))) for _ in range(240)]  # short texts and a long tail
    rows = [["sentence", "label"], *([" ".join(["word"] * n), str(i % 2)] for i, n in enumerate(words))]
    node = {
        "name": "text_table",
        "train_path": str(write_csv(tmp_path / "t.csv", rows)),
        "batch_size": 8,
        "val_fraction": 0.5,
        "cache": False,
    }
    plain, grouped = build(node, text_pre), build({**node, "group_by_length": True}, text_pre)

    def padded(loader: Any) -> int:
        return sum(batch["input_ids"].numel() for batch in loader)

    val = plain.val_dataloader()
    lengths = [len(val.dataset[i]["input_ids"]) for i in range(len(val.dataset))]
    assert sorted(val.sampler) == list(range(len(lengths)))
    order = list(val.sampler)
    batches = [[lengths[i] for i in order[k : k + 8]] for k in range(0, len(order), 8)]
    by_length = sorted(batches, key=max, reverse=True)
    assert all(min(a) >= max(b) for a, b in itertools.pairwise(by_length)), "batches are cut from the length order"
    assert batches != by_length, "and come in a shuffled order (a partial pass sees every length)"
    assert padded(val) < 0.8 * padded(DataLoader(val.dataset, 8, collate_fn=plain.collate_fn))
    loader = grouped.train_dataloader()
    epochs = [list(loader.sampler) for _ in range(2)]
    assert all(sorted(order) == list(range(len(loader.dataset))) for order in epochs) and epochs[0] != epochs[1]
    assert list(build({**node, "group_by_length": True}, text_pre).train_dataloader().sampler) == epochs[0]
    assert padded(loader) < 0.7 * padded(plain.train_dataloader())
