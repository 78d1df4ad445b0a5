"""Named evaluation sets (`data.eval_sets`) and the WiSE-FT curve (`regularization.wise_ft_alpha` as a list):
corruptions are seeded and grow with severity; sets shifted from config, read from a folder or a table in the
training format, logged as `test/<name>/<metric>`; the WiSE-FT curve agrees with single-alpha runs; the feature
cache serves the sets on a second run; bad settings are refused in one line before any compute."""

from __future__ import annotations

import csv
import json
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image

from src.backbones.base import Preprocessing
from src.config import validate
from src.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from src.data.digits import shift_images
from src.data.text_noise import TEXT_NOISES, noisy
from src.schema import ConfigError
from tests.conftest import composed
from tests.test_data import GREY, image_tree
from tests.test_failures import restore_signals, run_in_process  # noqa: F401 (fixture)
from tests.test_tasks import digit_manifest, setup, write

NOISE = "+data.eval_sets.noise={corruption:gaussian_noise,severity:3}"
ROT = "+data.eval_sets.rot={shift:rotate}"
FAST = ("trainer.max_epochs=2", "tracking.log_model=false", "tracking.log_checkpoint=false")


def textured(size: int = 96) -> np.ndarray:
    """An RGB test image with smooth gradients, an edge and fine noise (what blur, JPEG and pixelation change)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack(
        [0.5 + 0.4 * np.sin(6 * xx + 3 * yy), 0.5 + 0.3 * np.cos(9 * yy), ((xx > 0.3) & (yy < 0.6)) * 0.8 + 0.1], -1
    )
    return np.clip(image + np.random.default_rng(0).normal(scale=0.05, size=image.shape), 0, 1)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corruption_is_seeded_and_grows_with_severity(name: str) -> None:
    for image in (textured(), textured()[..., :1]):  # RGB and grey
        once, again = (corrupt(image, name, 3, np.random.default_rng(7)) for _ in range(2))
        assert np.array_equal(once, again) and once.shape == image.shape and once.dtype == np.float32
        assert once.min() >= 0 and once.max() <= 1
        change = [float(np.abs(corrupt(image, name, s, np.random.default_rng(7)) - image).mean()) for s in SEVERITIES]
        assert all(np.diff(change) > 0), change


def built(node: dict, preprocessing: Preprocessing = GREY) -> Any:
    """The data module of `node` for a classification task, set up as a run sets it up."""
    return setup(node, preprocessing, "classification")


@pytest.mark.parametrize("kind", TEXT_NOISES)
def test_text_noise_is_seeded_and_grows_with_severity(kind: str) -> None:
    texts = [f"sentence number {i} says the quick brown fox jumps over the lazy dog again" for i in range(40)]

    def changed(severity: int) -> float:
        """Mean dissimilarity (1 - difflib's ratio) of the noisy texts to the clean ones."""
        noisy_texts = [noisy(t, kind, severity, np.random.default_rng([0, i])) for i, t in enumerate(texts)]
        pairs = zip(texts, noisy_texts, strict=True)
        return float(np.mean([1 - SequenceMatcher(None, a, b).ratio() for a, b in pairs]))

    assert noisy(texts[0], kind, 3, np.random.default_rng(1)) == noisy(texts[0], kind, 3, np.random.default_rng(1))
    assert all(np.diff([changed(s) for s in SEVERITIES]) > 0)
    assert all(noisy("a", kind, 5, np.random.default_rng(i)).strip() for i in range(20))  # never empty


def digits(**node: object) -> Any:
    return built({"name": "digits", **node})


def test_digits_sets_shift_the_test_split_the_same_way_every_time() -> None:
    sets = {"noise": {"corruption": "gaussian_noise", "severity": 3}, "rot": {"shift": "rotate"}}
    dm, again = digits(eval_sets=sets), digits(eval_sets=sets)
    test = dm.splits["test"]
    noise, rot = dm.splits["eval/noise"], dm.splits["eval/rot"]
    assert len(noise) == len(rot) == len(test) and torch.equal(noise.labels, test.labels)
    for i in (0, 7, len(test) - 1):
        assert torch.equal(noise[i]["pixel_values"], again.splits["eval/noise"][i]["pixel_values"])
        assert not torch.equal(noise[i]["pixel_values"], test[i]["pixel_values"])
        # digits' domain-adaptation shift, as an evaluation set without adaptation
        expected = test.transform(shift_images(test.images[i : i + 1], "rotate", 0)[0])
        assert torch.allclose(rot[i]["pixel_values"], expected)
    assert set(dm.eval_dataloaders()) == {"noise", "rot"}
    # a 224 px blur radius scaled to 8 px is sub-pixel: refused rather than a silent copy of the test split
    with pytest.raises(ConfigError, match=r"data.eval_sets.blur: changes no pixel of these 8x8 px images"):
        digits(eval_sets={"blur": {"corruption": "defocus_blur", "severity": 5}})
    # the training splits' cache identity does not depend on which evaluation sets a run adds
    assert digits().identity() == dm.identity()


def test_a_folder_set_in_the_training_format_maps_classes_by_name(tmp_path: Path) -> None:
    train = image_tree(tmp_path / "train", per_class=4)
    other = image_tree(tmp_path / "other", per_class=2, classes=("dog", "owl"))
    node = {"name": "image_folder", "train_dir": str(train), "image_size": 8, "cache_images": False}
    bright = {"corruption": "brightness", "severity": 5}
    with pytest.warns(UserWarning):
        dm = built({**node, "eval_sets": {"other": {"path": str(other)}, "bright": bright}})
    assert sorted(dm.splits["eval/other"].labels) == [1, 1, 2, 2]  # dog, owl: train's indices, not the folder's
    tested, shifted = dm.splits["val"], dm.splits["eval/bright"]  # no test_dir: the validation split is tested
    assert shifted.labels == tested.labels
    assert (shifted[0]["pixel_values"] > tested[0]["pixel_values"] + 0.1).any()
    (other / "cow").mkdir()
    Image.new("RGB", (8, 8)).save(other / "cow" / "0.png")
    with pytest.warns(UserWarning), pytest.raises(ConfigError) as e:
        built({**node, "eval_sets": {"other": {"path": str(other)}}})
    assert "data.eval_sets.other.path:" in str(e.value) and "['cow']" in str(e.value) and "\n" not in str(e.value)


def test_a_table_set_uses_the_training_labels_and_refuses_unknown_ones(tmp_path: Path, text_pre: Preprocessing) -> None:
    rows = [[f"{'great' if i % 2 else 'awful'} film {i}", "pos" if i % 2 else "neg"] for i in range(20)]
    train = write(tmp_path / "train.csv", ["text", "label"], rows)
    other = write(tmp_path / "other.csv", ["text", "label"], [["a great film", "pos"], ["so awful", "neg"]])
    node = {"name": "text_table", "train_path": str(train), "text_column": "text"}
    dm = built({**node, "eval_sets": {"other": {"path": str(other)}}}, text_pre)
    assert dm.names == ["neg", "pos"] and dm.splits["eval/other"].labels.tolist() == [1, 0]
    typos = {"text_noise": "char", "severity": 5}  # no test_path: the validation rows (of train.csv) are tested
    dm = built({**node, "eval_sets": {"typos": typos}}, text_pre)
    tested, noisy_set = dm.splits["val"], dm.splits["eval/typos"]
    assert np.array_equal(noisy_set.labels, tested.labels) and np.array_equal(noisy_set.rows, tested.rows)
    ids = [noisy_set[i]["input_ids"] for i in range(len(tested))]
    assert ids != [tested[i]["input_ids"] for i in range(len(tested))]
    again = built({**node, "eval_sets": {"typos": typos}}, text_pre).splits["eval/typos"]
    assert ids == [again[i]["input_ids"] for i in range(len(tested))]
    write(tmp_path / "bad.csv", ["text", "label"], [["a great film", "pos"], ["meh", "neutral"]])
    with pytest.raises(ConfigError, match=r"data.eval_sets.bad.path: .*bad.csv.*'neutral'") as e:
        built({**node, "eval_sets": {"bad": {"path": str(tmp_path / "bad.csv")}}}, text_pre)
    assert "\n" not in str(e.value)


def test_a_multilabel_manifest_set_reads_tags_with_the_training_names(tmp_path: Path) -> None:
    pre = Preprocessing(modality="image", channels=1, image_size=8, mean=[0.5], std=[0.5])
    train, other = digit_manifest(tmp_path / "train", 40), digit_manifest(tmp_path / "other", 10, start=40)
    node = {"name": "image_manifest", "train_path": str(train), "image_column": "path", "label_column": "tags"}
    node |= {"label_separator": ",", "eval_sets": {"other": {"path": str(other)}}}
    dm = setup(node, pre, "multilabel")
    rows = list(csv.reader(other.open()))[1:]
    expected = [[float(name in row[1].split(",")) for name in dm.names] for row in rows]
    assert dm.splits["eval/other"].labels.tolist() == expected  # tag columns in the training order
    rows[0][1] = "huge"
    write(other, ["path", "tags", "digit"], rows)
    with pytest.raises(ConfigError, match=r"data.eval_sets.other.path: .*'huge'") as e:
        setup(node, pre, "multilabel")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+data.eval_sets.x={corruption:fog,severity:2}"], "data.eval_sets.x.corruption: unknown 'fog'; choose one"),
        (["+data.eval_sets.x={corruption:contrast,severity:6}"], "data.eval_sets.x.severity: must be 1..5; got 6"),
        (["+data.eval_sets.x={corruption:contrast}"], "data.eval_sets.x.severity: required with a corruption or"),
        (["+data.eval_sets.x={text_noise:char,severity:2}"], "data.eval_sets.x.text_noise: data 'digits' makes"),
        (["+data.eval_sets.x={shift:flip}"], "data.eval_sets.x.shift: unknown 'flip'; choose one of invert, rotate"),
        (["+data.eval_sets.x={path:/tmp}"], "data.eval_sets.x.path: data 'digits' makes evaluation sets from"),
        (["+data.eval_sets.x={shift:rotate,path:/tmp}"], "data.eval_sets.x: set exactly one of path, corruption"),
        (["+data.eval_sets.wise_ft={shift:rotate}"], "data.eval_sets.wise_ft: a set name is part of its metric"),
        (["regularization.wise_ft_alpha=[0,1.5]"], "regularization.wise_ft_alpha: must be in [0, 1], a list of"),
        (["regularization.wise_ft_alpha=-0.1"], "regularization.wise_ft_alpha: must be in [0, 1], a list of"),
        (["+data.eval_sets_every_val=true"], "data.eval_sets_every_val: true, but no eval_sets are defined"),
    ],
)
def test_bad_settings_are_refused_in_one_line_at_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(composed(*overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def only_run(cwd: Path) -> tuple[MlflowClient, Run]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    return client, run


@pytest.mark.usefixtures("restore_signals")
def test_sets_and_the_wise_ft_curve_are_logged_and_agree_with_single_alpha_runs(tmp_path: Path) -> None:
    (tmp_path / "curve").mkdir()
    curve = ("regularization.wise_ft_alpha=[0,0.5,1]", "+data.eval_sets_every_val=true")
    assert run_in_process(tmp_path / "curve", *FAST, NOISE, ROT, *curve) == 0
    client, run = only_run(tmp_path / "curve")
    m = run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "eval/rot/acc")) == 2  # one per validation (2 epochs)
    assert run.data.tags["eval_sets"] == "noise,rot"
    assert run.info.run_name.startswith("full·ep=2·noise·rot·wise_ft_alpha=[0,0.5,1]·")  # a set by its name
    assert {"test/noise/acc", "test/rot/acc", "test/noise/loss"} <= set(m)
    for alpha in ("0.0", "0.5", "1.0"):
        assert {f"test/wise_ft/{alpha}/{k}" for k in ("acc", "noise/acc", "rot/acc", "rot/f1")} <= set(m)
    for key in ("acc", "noise/acc", "rot/acc"):  # the last alpha (1.0, the fine-tuned weights) is the one tested
        assert m[f"test/wise_ft/1.0/{key}"] == pytest.approx(m[f"test/{key}"], abs=1e-6)
    assert m["test/wise_ft/0.0/acc"] != m["test/acc"]
    assert {"wise_ft_curve.png", "wise_ft_curve.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    points = json.loads(
        Path(client.download_artifacts(run.info.run_id, "wise_ft_curve.json", str(tmp_path))).read_text()
    )
    assert list(points) == ["0.0", "0.5", "1.0"]
    assert points["1.0"]["test/wise_ft/1.0/rot/acc"] == pytest.approx(m["test/rot/acc"], abs=1e-6)

    (tmp_path / "zero").mkdir()  # alpha 0 alone: the pretrained backbone under the fine-tuned head
    assert run_in_process(tmp_path / "zero", *FAST, NOISE, ROT, "regularization.wise_ft_alpha=0.0") == 0
    _, zero = only_run(tmp_path / "zero")
    for key in ("acc", "noise/acc", "rot/acc", "loss"):
        assert zero.data.metrics[f"test/{key}"] == pytest.approx(m[f"test/wise_ft/0.0/{key}"], abs=1e-6)
    assert not any(k.startswith("test/wise_ft/") for k in zero.data.metrics)


@pytest.mark.usefixtures("restore_signals")
def test_a_linear_probe_reads_its_sets_features_from_the_cache_on_a_second_run(tmp_path: Path) -> None:
    probe = ("finetune=linear_probe", "trainer.max_epochs=1", "tracking.log_model=false", f"cache.dir={tmp_path}/c")

    def misses_hits(name: str, *sets: str) -> tuple[float, float, dict[str, float]]:
        (tmp_path / name).mkdir()
        assert run_in_process(tmp_path / name, *probe, *sets) == 0
        m = only_run(tmp_path / name)[1].data.metrics
        return m["cache/features/misses"], m["cache/features/hits"], m

    assert misses_hits("first", NOISE)[:2] == (4, 0)  # train, val, test, eval/noise
    misses, hits, m = misses_hits("second", NOISE)
    assert (misses, hits) == (0, 4) and "test/noise/acc" in m
    assert misses_hits("third", NOISE, ROT)[:2] == (1, 4)  # only the new set is encoded
