"""`python -m src.compare`: statistics against numbers worked out by hand, on real MLflow stores built here with
MlflowClient (runs with params, tags and metrics as src.run logs them), plus one end-to-end check on real digits
runs and the regime-map recipes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from src.compare.analysis import compare, grouping_keys, recommend
from src.compare.cli import main, parse
from src.compare.cli import run as run_compare
from src.compare.plots import pareto_front
from src.compare.runs import open_store, select
from src.compare.stats import difference, expected_max, mean_interval
from tests.conftest import REPO, composed

T2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom
T3 = 3.182446305284263  # ... 3 degrees of freedom


def test_mean_interval_known_numbers() -> None:
    est = mean_interval([0.80, 0.82, 0.84, 0.86])
    std = math.sqrt(0.002 / 3)
    assert est.n == 4 and est.mean == pytest.approx(0.83) and est.std == pytest.approx(std)
    assert (est.low, est.high) == pytest.approx((0.83 - T3 * std / 2, 0.83 + T3 * std / 2))
    one = mean_interval([0.7])
    assert one.n == 1 and one.std is None and not one.has_interval and one.contains(0.7) is None


def test_pairing_by_seed_removes_shared_noise() -> None:
    a, b = {0: 0.90, 1: 0.80, 2: 0.85}, {0: 0.88, 1: 0.79, 2: 0.83}
    paired = difference(a, b)
    half = T2 * math.sqrt(1 / 3e4) / math.sqrt(3)  # diffs .02, .01, .02: std = 0.005774
    assert paired.paired and paired.mean == pytest.approx(0.05 / 3)
    assert (paired.low, paired.high) == pytest.approx((0.05 / 3 - half, 0.05 / 3 + half))
    assert paired.contains(0.0) is False  # the seed-to-seed spread (0.05) hides this without pairing:
    welch = difference(a, {s + 10: v for s, v in b.items()})
    assert welch.paired is False and welch.mean == pytest.approx(paired.mean) and welch.contains(0.0)
    assert not difference({0: 0.8}, b).has_interval


def test_expected_max_over_k_trials() -> None:
    mean, std = expected_max([3.0, 1.0, 2.0])
    assert mean == pytest.approx([2.0, 22 / 9, 8 / 3])
    assert std[0] == pytest.approx(math.sqrt(2 / 3))
    low, _ = expected_max([3.0, 1.0, 2.0], maximize=False)
    assert low == pytest.approx([2.0, 14 / 9, 4 / 3])


def test_pareto_front() -> None:
    points = [(10, 0.8), (100, 0.9), (50, 0.7), (1000, 0.85), (5, 0.6)]
    assert pareto_front(points, maximize=True) == [4, 0, 1]


# val/acc per seed (0, 1, 2); full is the best, lp_ft within noise of it, linear_probe worse beyond noise but a
# real gain over scratch, partial below scratch beyond noise (negative transfer), lora one seed only.
VAL = {
    "scratch": [0.60, 0.70, 0.65],
    "full": [0.80, 0.84, 0.82],
    "lp_ft": [0.79, 0.845, 0.815],
    "linear_probe": [0.70, 0.75, 0.71],
    "partial": [0.55, 0.64, 0.60],
    "lora": [0.78],
}
TRAINABLE = {"scratch": 5000, "full": 5000, "lp_ft": 5000, "linear_probe": 50, "partial": 3000, "lora": 400}


class Store:
    """A real MLflow sqlite store filled with runs shaped like src.run's."""

    def __init__(self, root: Path) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment("exp", (root / "mlruns").as_uri())
        self.n = 0

    def add(
        self,
        finetune: str,
        seed: int,
        val: float | None,
        status: str = "FINISHED",
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        trainable: float = 1000,
        logged: dict[str, float] | None = None,  # further final metrics: test/<set>/acc, ...
    ) -> str:
        self.n += 1
        start = 1_000_000 + 100_000 * self.n
        run = self.client.create_run(
            self.exp,
            start_time=start,
            run_name=f"{finetune}-s{seed}-{self.n}",
            tags={"finetune": finetune, "seed": str(seed), **(tags or {})},
        )
        run_id = run.info.run_id
        all_params = {
            "seed": str(seed),
            "finetune.name": finetune,
            "objective.metric": "val/acc",
            "objective.direction": "maximize",
            "optim.lr": "0.001",
            "tracking.run_name": f"run{self.n}",  # differs between every run, never a grouping key
            **(params or {}),
        }
        metrics = [Metric("trainable_params", trainable, start, 0)]
        if val is not None:  # the best of three validations is `val`; test = val - 0.01
            metrics += [Metric("val/acc", v, start, step) for step, v in enumerate([val - 0.1, val, val - 0.05])]
            metrics.append(Metric("test/acc", val - 0.01, start, 0))
        metrics += [Metric(k, v, start, 0) for k, v in (logged or {}).items()]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in all_params.items()])
        if status != "RUNNING":
            self.client.set_terminated(run_id, status, end_time=start + 12_000)
        return run_id


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    for finetune, values in VAL.items():
        for seed, v in enumerate(values):
            s.add(finetune, seed, v, trainable=TRAINABLE[finetune])
    s.add("full", 3, None, status="FAILED")
    s.add("full", 4, 0.99, status="RUNNING")
    s.add("full", 5, 0.10, tags={"report": "compare"})  # an earlier report: never a compared run
    return s


def test_groups_statistics_and_flags(store: Store) -> None:
    selection = select(store.client, "exp")
    assert selection.metric == "val/acc" and selection.maximize
    assert dict(selection.excluded) == {"failed": 1, "running": 1}
    comparison = compare(selection)
    assert comparison.keys == ["finetune"]
    groups = {g.values["finetune"]: g for g in comparison.groups}
    assert set(groups) == set(VAL)
    full, lp_ft, probe, partial, lora = (groups[k] for k in ("full", "lp_ft", "linear_probe", "partial", "lora"))
    assert full.is_best and full.val.mean == pytest.approx(0.82) and full.test.mean == pytest.approx(0.81)
    assert full.seconds == pytest.approx(12.0) and full.seconds_per_epoch == pytest.approx(4.0)
    # lp_ft - full per seed: -.01, +.005, -.005
    assert lp_ft.vs_best.paired and lp_ft.vs_best.mean == pytest.approx(-0.01 / 3)
    half = (
        T2
        * math.sqrt(((-0.01 + 0.01 / 3) ** 2 + (0.005 + 0.01 / 3) ** 2 + (-0.005 + 0.01 / 3) ** 2) / 2)
        / math.sqrt(3)
    )
    assert (lp_ft.vs_best.low, lp_ft.vs_best.high) == pytest.approx((-0.01 / 3 - half, -0.01 / 3 + half))
    assert lp_ft.within_noise is True
    # linear_probe - full: -.10, -.09, -.11 (std .01); its gain over scratch: .10, .05, .06
    assert probe.vs_best.high == pytest.approx(-0.10 + T2 * 0.01 / math.sqrt(3)) and probe.within_noise is False
    assert probe.baseline is groups["scratch"] and probe.gain.mean == pytest.approx(0.07)
    assert probe.gain.low == pytest.approx(0.07 - T2 * math.sqrt(0.0014 / 2) / math.sqrt(3))
    assert probe.negative_transfer is False
    assert partial.gain.mean == pytest.approx(-0.16 / 3) and partial.negative_transfer is True
    assert lora.metric.n == 1 and not lora.metric.has_interval and lora.within_noise is None
    assert lora.negative_transfer is None
    assert groups["scratch"].gain is None and groups["scratch"].is_scratch


def test_automatic_grouping_drops_redundant_and_bookkeeping_keys(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for seed in (0, 1):
        s.add("full", seed, 0.8, params={"optim.lr": "0.001", "data.num_workers": str(seed)})
        s.add("full", seed, 0.7, params={"optim.lr": "0.01"})
        s.add("lp_ft", seed, 0.8, params={"optim.lr": "0.001", "finetune.probe_epochs": "1"})
    selection = select(s.client, "exp")
    assert grouping_keys(selection.runs) == ["finetune", "optim.lr"]  # not probe_epochs, num_workers, run_name
    assert [len(g.runs) for g in compare(selection).groups] == [2, 2, 2]
    assert grouping_keys(selection.runs, ["optim.lr"]) == ["optim.lr"]


def test_recommendation_at_the_nearest_size_cheapest_first(tmp_path: Path) -> None:
    s = Store(tmp_path)
    at = {  # size -> strategy -> val per seed
        "4": {"linear_probe": [0.70, 0.72, 0.71], "full": [0.60, 0.66, 0.70], "scratch": [0.3, 0.32, 0.31]},
        "64": {"linear_probe": [0.75, 0.76, 0.74], "full": [0.85, 0.86, 0.87], "scratch": [0.5, 0.52, 0.51]},
    }
    cost = {"linear_probe": 50, "full": 5000, "scratch": 5000}
    for size, by in at.items():
        for finetune, values in by.items():
            for seed, v in enumerate(values):
                s.add(finetune, seed, v, params={"data.max_train_per_class": size}, trainable=cost[finetune])
    comparison = compare(select(s.client, "exp"))
    assert comparison.size_key == "data.max_train_per_class" and comparison.data_keys == [comparison.size_key]
    small = recommend(comparison, 6)  # nearest on a log scale: 4
    assert small.size == 4 and [g.values["finetune"] for g in small.candidates] == ["linear_probe", "full"]
    large = recommend(comparison, 40)
    assert large.size == 64 and [g.values["finetune"] for g in large.candidates] == ["full"]
    out, _ = run_compare(parse([f"uri={s.uri}", "experiment=exp", "out=r", "log=false", "recommend=6"]), tmp_path)
    text = (out / "report.md").read_text()
    assert "## Regime map" in text and (out / "learning_curve.png").is_file()
    assert (
        "`full` overtakes `linear_probe` from data.max_train_per_class = 64 (0.86 vs 0.75); beyond noise from 64"
        in text
    )
    assert "1. finetune=linear_probe: val/acc 0.71 ± 0.01 [" in text  # cheapest first, with its CI


def test_cli_writes_and_logs_the_report(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, run_id = run_compare(parse([f"uri={store.uri}", "experiment=exp", "out=report"]), tmp_path)
    text = (out / "report.md").read_text()
    assert "Excluded runs: 1 failed, 1 running." in text and "n = 1, no interval" in text and "NEGATIVE" in text
    rows = {r["finetune"]: r for r in csv.DictReader((out / "groups.csv").open())}
    assert rows["partial"]["negative_transfer"] == "True" and rows["lp_ft"]["within_noise"] == "True"
    assert {p.name for p in out.glob("*.png")} == {"metric_by_group.png", "pareto.png"}
    logged = store.client.get_run(run_id)
    assert logged.data.tags["report"] == "compare" and logged.info.status == "FINISHED"
    assert {a.path for a in store.client.list_artifacts(run_id)} >= {"report.md", "groups.csv", "pareto.png"}
    # Comparing again ignores the report run.
    again = select(store.client, "exp")
    assert len(again.runs) == sum(len(v) for v in VAL.values())
    assert f"Report written to {out}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment=nope"], "experiment: no experiment 'nope'"),
        (["metric=val/f1"], "metric: no finished run logged 'val/f1'"),
        (["filter=tags.finetune = 'none'"], "no runs match"),
        (["by=[no_such_key]"], "by: no run has a value for 'no_such_key'"),
        (["recommend=10"], "recommend: these runs do not vary a training-set size"),
        (["colour=red"], "colour: unknown option"),
        (["direction=up"], "direction: must be maximize or minimize"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    store: Store, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([f"uri={store.uri}", "experiment=exp", "log=false", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_missing_store_is_an_error_not_a_new_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no MLflow store"):
        open_store(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_sweep_selects_the_children_of_a_parent(store: Store) -> None:
    parent = store.client.create_run(store.exp, run_name="grid").info.run_id
    for seed in (0, 1):
        store.add("full", seed, 0.9, tags={MLFLOW_PARENT_RUN_ID: parent})
    assert len(select(store.client, "exp", sweep="grid").runs) == 2
    whole = select(store.client, "exp")
    assert parent not in {r.run_id for r in whole.runs} and sum(whole.excluded.values()) == 2


# End to end on real runs: tiny digits trainings in-process, then the CLI's compare on their store.


def test_end_to_end_on_real_digits_runs(tmp_path: Path) -> None:
    from src.train import execute

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for finetune in ("scratch", "full"):
        for seed in (0, 1):
            raw = composed(
                f"finetune={finetune}",
                f"seed={seed}",
                f"tracking.uri={uri}",
                f"tracking.artifact_location={tmp_path / 'mlruns'}",
                "tracking.log_checkpoint=false",
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=1",
                "trainer.enable_progress_bar=false",
            )
            execute(raw)
    out, run_id = run_compare(parse([f"uri={uri}", "out=report"]), tmp_path)
    comparison_csv = list(csv.DictReader((out / "groups.csv").open()))
    assert {r["finetune"] for r in comparison_csv} == {"scratch", "full"}
    assert all(r["n"] == "2" and r["val_low"] and r["seconds_per_epoch"] for r in comparison_csv)
    full = next(r for r in comparison_csv if r["finetune"] == "full")
    assert full["baseline"] == "finetune=scratch" and full["gain_low"]
    assert MlflowClient(uri).get_run(run_id).data.tags["report"] == "compare"


@pytest.mark.parametrize("sweep", ["regime_map_digits", "regime_map"])
def test_regime_map_recipes_compose_and_validate(sweep: str) -> None:
    """Every recipe the regime maps grid over composes with its sweep file into a valid run config."""
    from src.config import validate

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={sweep}"], return_hydra_config=True)
    names = str(cfg.hydra.sweeper.params["+recipe"]).split(",")
    assert len(names) == 6
    for name in names:
        run_cfg = validate(composed(f"sweep={sweep}", f"+recipe={name}"))
        assert run_cfg.finetune.name == name.split("_", 1)[1]


def test_optuna_sweep_gets_the_expected_max_plot(tmp_path: Path) -> None:
    s = Store(tmp_path)
    study = s.client.create_run(s.exp, run_name="study", tags={"optuna_role": "study", "optuna_study": "st"})
    parent = {MLFLOW_PARENT_RUN_ID: study.info.run_id, "optuna_role": "trial"}
    for trial, (lr, val) in enumerate([("0.1", 0.5), ("0.01", 0.8), ("0.001", 0.7), ("0.03", 0.6)]):
        s.add("full", 0, val, params={"optim.lr": lr}, tags={**parent, "optuna_trial": str(trial)})
    s.add("full", 0, 0.4, params={"optim.lr": "0.5"}, tags={**parent, "optuna_trial": "4", "optuna_state": "PRUNED"})
    out, _ = run_compare(parse([f"uri={s.uri}", "experiment=exp", "sweep=st", "out=r", "log=false"]), tmp_path)
    assert (out / "sweep_expected_max.png").is_file()
    text = (out / "report.md").read_text()
    assert "Excluded runs: 1 pruned." in text and text.count("n = 1, no interval") >= 4
