"""The frozen-feature cache on real runs: same results cached or not, hits on repeat, misses on any key change,
racing workers, corrupt entries, augmentation bypass."""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from src.backbones import BACKBONES
from src.cache import Cache
from src.cache import main as cache_main
from src.config import CacheConfig, validate
from src.context import hydra_context
from src.data import DATA
from src.features import CachedSplit, FeatureCache, preprocessing_identity
from src.finetune import FINETUNE
from src.module import Head, TransferModule
from src.train import run
from tests.conftest import REPO, classification

DIGITS = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_in_process(tmp: Path, *overrides: str) -> dict[str, float]:
    """`python -m src.run OVERRIDES` in this process, stores under tmp; returns the run's MLflow metrics."""
    store = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.artifact_location={tmp / 'mlruns'}"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=[*store, "cache.dir=" + str(tmp / "cache"), *overrides])
    OmegaConf.resolve(raw)  # as src.train.execute does
    run(validate(raw), raw, hydra_context(), None)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    latest = max(client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id]), key=_start)
    return latest.data.metrics


def _start(r: Any) -> int:
    return r.info.start_time


@pytest.mark.parametrize(
    "strategy",
    [
        ["finetune=linear_probe"],
        ["finetune=partial", "finetune.k=2"],
        pytest.param(["finetune=lp_ft", "finetune.probe_epochs=2"], marks=pytest.mark.slow),
        pytest.param(["finetune=lp_ft", "finetune.probe_fit=true", "finetune.probe_epochs=0"], marks=pytest.mark.slow),
    ],
    ids=["linear_probe", "partial", "lp_ft", "lp_ft_probe_fit"],
)
def test_cached_run_matches_uncached_and_hits_on_repeat(tmp_path: Path, strategy: list[str]) -> None:
    off = run_in_process(tmp_path, *DIGITS, *strategy, "cache.enabled=false")
    first = run_in_process(tmp_path, *DIGITS, *strategy)
    again = run_in_process(tmp_path, *DIGITS, *strategy)
    assert first["cache/features/misses"] == 3 and first["cache/features/hits"] == 0  # train, val, test
    assert again["cache/features/hits"] == 3 and again["cache/features/misses"] == 0
    assert again["cache/features/seconds_computing"] == 0 and again["cache/features/bytes"] > 0
    # small_cnn has no dropout and frozen BN runs on its running statistics: the same function cached or not.
    for key in ("val/acc", "test/acc", "test/loss"):
        assert first[key] == pytest.approx(off[key], abs=2e-3), key
        assert again[key] == first[key], key  # a hit and a miss leave the same random stream


def test_checkpoints_leave_out_the_groups_no_epoch_changes(tmp_path: Path) -> None:
    """`partial k=2`: the Lightning checkpoints hold the trained groups and the head, not the two frozen groups,
    which loading takes from the module as built (same pretrained weights); the test pass loaded it (the cached vs
    uncached test above checks the metrics)."""
    run_in_process(tmp_path, *DIGITS, "finetune=partial", "finetune.k=2")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    saved = torch.load(Path(found.data.tags["output_dir"], "checkpoints", "best.ckpt"), weights_only=False)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=["cache.dir=" + str(tmp_path / "cache")])
    backbone = BACKBONES.build(raw.backbone)
    groups = backbone.layer_groups()
    names = {id(m): f"backbone.{name}" for name, m in backbone.named_modules()}
    frozen = {f"{names[id(m)]}.{k}" for g in groups[:2] for m in g.modules for k in m.state_dict()}
    trained = {f"{names[id(m)]}.{k}" for g in groups[2:] for m in g.modules for k in m.state_dict()}
    keys = set(saved["state_dict"])
    assert frozen and not frozen & keys
    assert trained <= keys and {"head.1.weight", "head.1.bias"} <= keys


def test_a_prefix_cache_beyond_the_memory_budget_trains_uncached(tmp_path: Path, caplog) -> None:
    """The estimate (per-sample bytes x samples) runs before encoding; over `cache.max_memory_gb` nothing is cached
    and the run trains on raw inputs, with the same result as a run without the cache."""
    strategy = [*DIGITS, "finetune=partial", "finetune.k=2"]
    off = run_in_process(tmp_path, *strategy, "cache.enabled=false")
    with caplog.at_level("WARNING", logger="src.features"):
        tight = run_in_process(tmp_path, *strategy, "cache.max_memory_gb=1e-6")
    assert "above cache.max_memory_gb=1e-06: training without the feature cache" in caplog.text
    assert tight["cache/features/misses"] == 0 and tight["cache/features/bytes"] == 0
    assert tight["test/acc"] == pytest.approx(off["test/acc"], abs=2e-3)
    roomy = run_in_process(tmp_path, *strategy, "cache.max_memory_gb=1")  # the digits prefix: well under 1 GB
    assert roomy["cache/features/misses"] == 3


def test_distillation_teacher_logits_are_cached(tmp_path: Path) -> None:
    short = [*DIGITS, "trainer.max_epochs=1"]
    run_in_process(tmp_path, *short, "tracking.run_name=teacher")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (teacher,) = client.search_runs(
        [client.get_experiment_by_name("transfer-lab").experiment_id], "tags.`mlflow.runName` = 'teacher'"
    )
    distill = [*short, "finetune=distill", f"finetune.teacher={teacher.info.run_id}"]
    off = run_in_process(tmp_path, *distill, "cache.enabled=false")
    on = run_in_process(tmp_path, *distill)
    assert on["cache/features/misses"] == 3  # the teacher's logits of train, val, test
    for key in ("teacher/val/acc", "teacher/test/acc", "test/acc"):
        assert on[key] == pytest.approx(off[key], abs=2e-3), key


# --- keys, races, damage, augmentation: FeatureCache on real data modules ------------------------------------------


def attach(root: Path, backbone: Any, dm: Any, augmented: bool = False, **strategy: Any) -> FeatureCache:
    """The run's hook on a built backbone and data module (default strategy: linear_probe)."""
    module = TransferModule(backbone, Head(backbone.feature_dim, dm.task.num_outputs), dm.task, configure_optim=dict)
    features = FeatureCache(CacheConfig(dir=str(root)), dm, "cpu")
    strategy = {"name": "linear_probe", **strategy}
    features.attach(FINETUNE.build(strategy), module, augmented=augmented, epochs=1)
    return features


@pytest.fixture(scope="module")
def minilm() -> Any:
    return BACKBONES.build({"name": "minilm"})


def sst_like(tmp: Path, rows: int = 12) -> Path:
    path = tmp / "train.tsv"
    words = ["good", "bad", "a fine film", "dull and long", "wonderful acting", "a mess"]
    lines = [f"{words[i % len(words)]} number {i}\t{i % 2}" for i in range(rows)]
    path.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    return path


def text_data(path: Path, backbone: Any, seed: int = 0, **cfg: Any) -> Any:
    dm = DATA.build(
        {"name": "text_table", "train_path": str(path), "val_path": str(path), **cfg},
        preprocessing=backbone.preprocessing,
        seed=seed,
        task=classification(),
    )
    dm.setup("fit")
    return dm


def test_every_part_of_the_key_misses(tmp_path: Path, minilm: Any) -> None:
    data = sst_like(tmp_path)
    root = tmp_path / "cache"

    def misses(backbone: Any = minilm, seed: int = 0, **cfg: Any) -> int:
        return attach(root, backbone, text_data(data, backbone, seed, **cfg)).cache.stats.misses

    assert misses() == 2 and misses() == 0  # train, val computed once, then read
    assert misses(max_length=4) == 2
    assert misses(max_train_samples=6) == 2 and misses(max_train_samples=6, seed=1) == 2  # another seeded subset
    minilm.pooling = "cls"
    try:
        assert misses() == 2
    finally:
        minilm.pooling = "mean"
    weight = minilm.model.encoder.layer[5].output.dense.bias
    with torch.no_grad():  # what init_from does: other weights under the same name
        weight[0] += 1e-3
    try:
        assert misses() == 2
    finally:
        with torch.no_grad():
            weight[0] -= 1e-3
    assert misses() == 0
    data.write_text(data.read_text().replace("number 3", "number three"))  # the data file edited in place
    assert misses() == 2


def test_tokenizer_call_settings_are_not_part_of_the_key(minilm: Any) -> None:
    """Calling a fast tokenizer leaves its truncation/padding settings in the backend's definition: a sweep's
    third trial missed every entry until the key ignored them (max_length is in the data key)."""
    before = preprocessing_identity(minilm.preprocessing)
    minilm.preprocessing.tokenizer(["a fine film"], truncation=True, max_length=7, padding="max_length")
    assert preprocessing_identity(minilm.preprocessing) == before


@pytest.mark.parametrize(("strategy", "cut"), [({}, 8), ({"name": "partial", "k": 3}, 3)])
def test_cached_text_states_give_the_backbone_forward(
    tmp_path: Path, minilm: Any, strategy: dict[str, Any], cut: int
) -> None:
    """linear_probe caches MiniLM's pooled features; partial k=3 its hidden states after 2 blocks, per token."""
    data = sst_like(tmp_path, rows=20)
    raw = text_data(data, minilm)
    dm = text_data(data, minilm)
    attach(tmp_path / "cache", minilm, dm, **strategy)
    cached = dm.splits["val"]
    assert isinstance(cached, CachedSplit)
    batch = dm.collate_fn([cached[i] for i in range(len(cached))])
    reference = raw.collate_fn([raw.splits["val"][i] for i in range(len(cached))])
    minilm.eval()
    with torch.no_grad():
        expected = minilm(reference)
        got = minilm.forward_from(cut, batch["frozen"])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(batch["labels"], reference["labels"])


def digits(augmented: bool = False, root: Path | None = None, **strategy: Any) -> tuple[FeatureCache, Any]:
    """small_cnn (seeded random init: the same weights in every process) on digits, with the cache attached."""
    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None}, pretrained=False)
    dm = DATA.build({"name": "digits"}, preprocessing=backbone.preprocessing, seed=0, task=classification())
    dm.setup("fit")
    return attach(root, backbone, dm, augmented, **strategy), dm


def _race(root: str, out: str) -> None:
    features, dm = digits(root=Path(root))
    torch.save({"values": dm.splits["test"].values, "misses": features.cache.stats.misses}, out)


def test_two_workers_racing_on_an_empty_cache_get_identical_features(tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [mp.get_context("spawn").Process(target=_race, args=(str(tmp_path / "cache"), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    a, b = (torch.load(o, weights_only=True) for o in outs)
    assert torch.equal(a["values"], b["values"])
    assert a["misses"] + b["misses"] == 3  # each split computed by exactly one worker
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3


def test_a_truncated_entry_is_detected_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, dm = digits(root=tmp_path)
    before = dm.splits["test"].values
    for entry in (tmp_path / "features").glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        features, dm = digits(root=tmp_path)
    assert caplog.text.count("corrupt") == 3 and features.cache.stats.misses == 3
    assert torch.equal(dm.splits["test"].values, before)


def test_augmented_training_batches_bypass_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        features, dm = digits(augmented=True, root=tmp_path)
    assert "bypass" in caplog.text and features.cache.stats.misses == 2  # val and test only
    assert not isinstance(dm.splits["train"], CachedSplit) and isinstance(dm.splits["val"], CachedSplit)
    batch = dm.collate_fn([dm.splits["train"][i] for i in range(4)])
    assert set(batch) == {"pixel_values", "labels"}  # raw inputs, for the augmentation to transform


def test_augmented_run_trains_on_raw_batches(tmp_path: Path) -> None:
    metrics = run_in_process(tmp_path, *DIGITS, "finetune=linear_probe", "regularization.augment.hflip=0.5")
    assert metrics["cache/features/misses"] == 2 and metrics["test/acc"] > 0.3


def test_cli_reports_size_and_clears(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    digits(root=tmp_path)
    cache_main(["--dir", str(tmp_path), "--size"])
    assert "features" in capsys.readouterr().out
    cache_main(["--dir", str(tmp_path), "--clear", "features"])
    assert Cache("features", tmp_path).size() == 0
