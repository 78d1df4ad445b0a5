"""`python -m src.compare` under distribution shift: runs that log named eval sets (`test/<set>/<metric>`, tag
`eval_sets`) and WiSE-FT interpolations (`test/wise_ft/<alpha>/...`) get a shift table, noise flags and an
effective-robustness plot; numbers are checked against values worked out by hand on real MLflow stores."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from src.compare.analysis import compare
from src.compare.cli import main, parse
from src.compare.cli import run as run_compare
from src.compare.runs import MetricName, select
from src.compare.shift import MEAN, Shift, ShiftRow, analyse
from tests.test_compare import T2, Store

SETS = ("gaussian_noise_3", "rotate")
# Per seed 0, 1, 2: ID test/acc, then each eval set. Per-run means over the two sets: scratch .375 .405 .42 (.40),
# linear_probe .49 .50 .51 (.50), full .53 .53 .56 (.54); drops ID - mean: scratch .225 .215 .22 (.22, std .005),
# linear_probe .21 .22 .23 (.22, std .01), full .27 .29 .28 (.28, std .01). Trend through the three (ID, mean) points
# (.62, .40), (.72, .50), (.82, .54): slope .014 / .02 = 0.7, intercept .48 - .7 * .72 = -.024, so it predicts .41,
# .48, .55 and the effective robustness is -.01, +.02, -.01.
RESULTS = {
    "scratch": {"id": [0.60, 0.62, 0.64], "gaussian_noise_3": [0.45, 0.47, 0.49], "rotate": [0.30, 0.34, 0.35]},
    "linear_probe": {"id": [0.70, 0.72, 0.74], "gaussian_noise_3": [0.58, 0.61, 0.61], "rotate": [0.40, 0.39, 0.41]},
    "full": {"id": [0.80, 0.82, 0.84], "gaussian_noise_3": [0.64, 0.66, 0.68], "rotate": [0.42, 0.40, 0.44]},
}


def add_runs(store: Store, results: dict[str, dict[str, list[float]]], prefix: str = "") -> None:
    """One run per strategy and seed, as src.run logs eval sets: test/<set>/acc and the tag eval_sets; `prefix`
    (wise_ft/<alpha>/) logs a WiSE-FT interpolation's metrics instead of more runs."""
    for finetune, by in results.items():
        for seed in range(3):
            logged = {f"test/{prefix}{s}/acc": by[s][seed] for s in SETS}
            store.add(finetune, seed, by["id"][seed] + 0.01, tags={"eval_sets": ",".join(SETS)}, logged=logged)


@pytest.fixture
def shifted(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    add_runs(store, RESULTS)
    return store


def rows_by_strategy(shift: Shift) -> dict[str, ShiftRow]:
    return {r.label(["finetune"]): r for r in shift.rows}


def test_shift_table_by_hand(shifted: Store) -> None:
    comparison = compare(select(shifted.client, "exp"))
    shift = analyse(comparison)
    assert shift is not None and shift.sets == list(SETS) and shift.alphas == []
    assert shift.columns == [*SETS, MEAN] and shift.metric.test() == "test/acc"
    rows = rows_by_strategy(shift)
    scratch, probe, full = rows["finetune=scratch"], rows["finetune=linear_probe"], rows["finetune=full"]
    for row, means in ((scratch, (0.62, 0.47, 0.33, 0.40)), (probe, (0.72, 0.60, 0.40, 0.50))):
        assert [row.estimates[c].mean for c in (None, *SETS, MEAN)] == pytest.approx(means)
    assert full.estimates[MEAN].mean == pytest.approx(0.54) and full.estimates[MEAN].n == 3
    assert {r.worst for r in shift.rows} == {"rotate"}
    # Drops, paired per seed: full .27 .29 .28 -> .28 +- T2 * .01 / sqrt(3)
    assert full.drop.mean == pytest.approx(0.28) and full.drop.std == pytest.approx(0.01)
    assert (full.drop.low, full.drop.high) == pytest.approx(
        (0.28 - T2 * 0.01 / math.sqrt(3), 0.28 + T2 * 0.01 / 3**0.5)
    )
    assert scratch.drop.mean == pytest.approx(0.22) and scratch.drop.std == pytest.approx(0.005)
    (trend,) = shift.trends.values()
    assert (trend.slope, trend.intercept) == pytest.approx((0.7, -0.024))
    assert [r.effective_robustness for r in (scratch, probe, full)] == pytest.approx([-0.01, 0.02, -0.01])


def test_shift_metrics_are_flagged_against_the_best_paired_by_seed(shifted: Store) -> None:
    rows = rows_by_strategy(analyse(compare(select(shifted.client, "exp"))))
    scratch, probe, full = rows["finetune=scratch"], rows["finetune=linear_probe"], rows["finetune=full"]
    assert full.best_on == {*SETS, MEAN} and full.within_noise("rotate") is True
    # rotate, linear_probe - full per seed: -.02 -.01 -.03 (std .01): within noise; scratch - full: -.12 -.06 -.09
    half = T2 * 0.01 / math.sqrt(3)
    assert probe.vs_best["rotate"].paired and probe.vs_best["rotate"].mean == pytest.approx(-0.02)
    assert probe.vs_best["rotate"].high == pytest.approx(-0.02 + half) and probe.within_noise("rotate") is True
    assert scratch.vs_best["rotate"].high == pytest.approx(-0.09 + T2 * 0.03 / math.sqrt(3))
    assert scratch.within_noise("rotate") is False
    # gaussian_noise_3: -.06 -.05 -.07; the mean over sets: -.04 -.03 -.05; both beyond noise
    assert probe.vs_best["gaussian_noise_3"].mean == pytest.approx(-0.06) and not probe.within_noise("gaussian_noise_3")
    assert probe.vs_best[MEAN].high == pytest.approx(-0.04 + half) and probe.within_noise(MEAN) is False
    assert probe.vs_best[MEAN].paired


def test_report_has_the_shift_table_and_logs_the_robustness_plot(shifted: Store, tmp_path: Path) -> None:
    out, run_id = run_compare(parse([f"uri={shifted.uri}", "experiment=exp", "out=report"]), tmp_path)
    text = (out / "report.md").read_text()
    assert "## Under distribution shift" in text and "eval sets: gaussian_noise_3, rotate" in text
    assert "| linear_probe | 3 | 0.72 [" in text and "+0.0200 |" in text  # ID mean, effective robustness
    rows = {r["finetune"]: r for r in csv.DictReader((out / "shift.csv").open())}
    assert float(rows["full"]["drop_mean"]) == pytest.approx(0.28)
    assert float(rows["scratch"]["effective_robustness"]) == pytest.approx(-0.01)
    assert rows["linear_probe"]["rotate within_noise"] == "True" and rows["scratch"]["worst_set"] == "rotate"
    assert (out / "effective_robustness.png").stat().st_size > 10_000
    logged = {a.path for a in shifted.client.list_artifacts(run_id)}
    assert {"effective_robustness.png", "shift.csv", "report.md"} <= logged


def test_wise_ft_alphas_are_rows_measured_against_the_trend(tmp_path: Path) -> None:
    """full's WiSE-FT at alpha 0.5: ID .78 .80 .82, sets (.68 .46) (.70 .44) (.72 .48), per-run means .57 .57 .60
    (.58); the trend of the three strategies is unchanged (alphas are not fitted), so its effective robustness is
    .58 - (.7 * .80 - .024) = .044; alpha 1.0 repeats the fine-tuned model."""
    store = Store(tmp_path)
    add_runs(store, RESULTS)
    wise = {"id": [0.78, 0.80, 0.82], "gaussian_noise_3": [0.68, 0.70, 0.72], "rotate": [0.46, 0.44, 0.48]}
    for run in store.client.search_runs([store.exp], "tags.finetune = 'full'"):
        seed = int(run.data.tags["seed"])
        for alpha, by in (("0.5", wise), ("1.0", RESULTS["full"])):
            store.client.log_metric(run.info.run_id, f"test/wise_ft/{alpha}/acc", by["id"][seed])
            for s in SETS:
                store.client.log_metric(run.info.run_id, f"test/wise_ft/{alpha}/{s}/acc", by[s][seed])
    shift = analyse(compare(select(store.client, "exp")))
    assert shift.alphas == ["0.5", "1.0"]
    rows = rows_by_strategy(shift)
    assert set(rows) == {"finetune=scratch", "finetune=linear_probe", "finetune=full", "finetune=full·α=0.5",
                         "finetune=full·α=1.0"}  # fmt: skip
    half = rows["finetune=full·α=0.5"]
    assert half.estimates[None].mean == pytest.approx(0.80) and half.estimates[MEAN].mean == pytest.approx(0.58)
    (trend,) = shift.trends.values()
    assert (trend.slope, trend.intercept) == pytest.approx((0.7, -0.024))
    assert half.effective_robustness == pytest.approx(0.044)
    assert rows["finetune=full·α=1.0"].effective_robustness == pytest.approx(-0.01)
    # alpha .5 - the fine-tuned full model on rotate, paired by seed: .04 .04 .04; it is now the best on every set.
    assert half.best_on == {*SETS, MEAN}
    assert rows["finetune=full"].vs_best["rotate"].mean == pytest.approx(-0.04)
    assert rows["finetune=full"].vs_best["rotate"].paired
    out, _ = run_compare(parse([f"uri={store.uri}", "experiment=exp", "out=r", "log=false"]), tmp_path)
    assert "| full | 0.5 | 3 | 0.8 [" in (out / "report.md").read_text()


def test_an_eval_set_is_the_compared_metric(shifted: Store, tmp_path: Path) -> None:
    """metric=test/rotate/acc drives the main comparison (rotate means .33 .40 .42), with the runs' direction."""
    selection = select(shifted.client, "exp", metric="test/rotate/acc")
    assert (selection.val_metric, selection.test_metric, selection.compared) == (None, "test/rotate/acc", "test")
    assert selection.maximize
    groups = {g.values["finetune"]: g for g in compare(selection).groups}
    assert groups["full"].is_best and groups["linear_probe"].within_noise is True
    assert groups["scratch"].metric.mean == pytest.approx(0.33) and groups["scratch"].gain is None
    assert groups["linear_probe"].gain.mean == pytest.approx(0.07)  # .10 .05 .06 over scratch on rotate
    out, _ = run_compare(
        parse([f"uri={shifted.uri}", "experiment=exp", "metric=test/rotate/acc", "log=false"]), tmp_path
    )
    text = (out / "report.md").read_text()
    assert "Compared: `test/rotate/acc`" in text and "None" not in text and "## Under distribution shift" in text


def test_direction_follows_the_objectives_task_metric_on_any_eval_set(tmp_path: Path) -> None:
    store = Store(tmp_path)
    objective = {"objective.metric": "val/mae", "objective.direction": "minimize"}
    for seed in (0, 1):
        store.add("full", seed, 0.5, params=objective, tags={"eval_sets": "rotate"}, logged={"test/rotate/mae": 0.9})
    assert not select(store.client, "exp", metric="test/rotate/mae").maximize
    assert MetricName.parse("test/wise_ft/0.25/rotate/mae") == MetricName("test", "mae", "rotate", "0.25")
    assert MetricName("test", "mae").test("rotate", "1.0") == "test/wise_ft/1.0/rotate/mae"


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("test/blur/acc", "metric: no selected run has the eval set 'blur'; eval sets: gaussian_noise_3, rotate"),
        ("test/wise_ft/0.3/acc", "metric: no selected run has the WiSE-FT alpha '0.3'; no run logged test/wise_ft/"),
    ],
)
def test_unknown_eval_set_or_alpha_is_one_line(
    shifted: Store, metric: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main([f"uri={shifted.uri}", "experiment=exp", "log=false", f"metric={metric}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_regime_map_on_an_eval_set_and_one_trend_across_sizes(tmp_path: Path) -> None:
    """Sizes 8 and 64 per class: on rotate the probe leads at 8 and full at 64. The trend spans the sizes (one line
    through (ID, rotate) = (.5, .3) (.6, .4) (.7, .45) (.8, .55): slope .04 / .05 = .8, intercept .425 - .8 * .65 =
    -.095), so effective robustness is -.005, +.015, -.015, +.005."""
    store = Store(tmp_path)
    means = {("full", "8"): (0.50, 0.30), ("linear_probe", "8"): (0.60, 0.40)}
    means |= {("linear_probe", "64"): (0.70, 0.45), ("full", "64"): (0.80, 0.55)}
    for (finetune, size), (identity, rotate) in means.items():
        for seed, offset in enumerate((-0.01, 0.0, 0.01)):
            store.add(
                finetune,
                seed,
                identity + offset + 0.01,
                params={"data.max_train_per_class": size},
                tags={"eval_sets": "rotate"},
                logged={"test/rotate/acc": rotate + offset},
            )
    comparison = compare(select(store.client, "exp", metric="test/rotate/acc"))
    assert comparison.size_key == "data.max_train_per_class"
    shift = analyse(comparison)
    assert shift.columns == ["rotate"] and shift.trend_keys == [] and len(shift.trends) == 1
    (trend,) = shift.trends.values()
    assert (trend.slope, trend.intercept) == pytest.approx((0.8, -0.095))
    robustness = {
        (r.group.values["finetune"], r.group.values[comparison.size_key]): r.effective_robustness for r in shift.rows
    }
    assert [robustness[k] for k in means] == pytest.approx([-0.005, 0.015, -0.015, 0.005])
    args = [f"uri={store.uri}", "experiment=exp", "metric=test/rotate/acc", "log=false", "out=r"]
    text = (run_compare(parse(args), tmp_path)[0] / "report.md").read_text()
    assert "## Regime map" in text
    assert "`full` overtakes `linear_probe` from data.max_train_per_class = 64 (0.55 vs 0.45); beyond noise" in text
