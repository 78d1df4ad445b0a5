"""src.rank: each score against values worked out independently, the rank agreement against scipy, the refusals,
and a real ranking of digits small-CNN sources logged to MLflow (one candidate failing to build, skipped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import OmegaConf
from scipy import stats
from sklearn.covariance import LedoitWolf

from src.rank import scores
from src.rank.cli import main
from src.rank.config import KNNConfig, LinearConfig
from src.tracking import flatten

RNG = np.random.default_rng(0)


def direct_logme(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """LogME's fixed point and evidence by the textbook matrix formulas (no eigenbasis): A = alpha I + beta X^T X,
    m = beta A^-1 X^T y, gamma = d - alpha tr(A^-1), alpha = gamma / m^T m, beta = (n - gamma) / |y - X m|^2."""
    n, d = x.shape
    alpha, beta = 1.0, 1.0
    for _ in range(5000):
        a = alpha * np.eye(d) + beta * x.T @ x
        inv = np.linalg.inv(a)
        m = beta * inv @ x.T @ y
        gamma = d - alpha * np.trace(inv)
        alpha, beta = gamma / (m @ m), (n - gamma) / ((y - x @ m) @ (y - x @ m))
    return alpha, beta, evidence(x, y, alpha, beta)


def evidence(x: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | X, alpha, beta) / n of the Bayesian linear model, by its closed form."""
    n, d = x.shape
    a = alpha * np.eye(d) + beta * x.T @ x
    m = beta * np.linalg.solve(a, x.T @ y)
    fit = (y - x @ m) @ (y - x @ m)
    logdet = np.linalg.slogdet(a)[1]
    return float(
        (d * np.log(alpha) + n * np.log(beta) - logdet - beta * fit - alpha * m @ m - n * np.log(2 * np.pi)) / 2 / n
    )


def test_logme_is_the_evidence_at_the_fixed_point() -> None:
    x = RNG.normal(size=(40, 6))
    y = x @ RNG.normal(size=6) + 0.5 * RNG.normal(size=40)
    eigvals, vecs = np.linalg.eigh(x.T @ x)
    ours = scores.logme_column(x, y, eigvals, vecs)
    alpha, beta, expected = direct_logme(x, y)
    assert ours.alpha == pytest.approx(alpha, rel=1e-5)
    assert ours.beta == pytest.approx(beta, rel=1e-5)
    assert ours.evidence == pytest.approx(expected, rel=1e-7)
    # The fixed point maximises the evidence: any other precisions give less.
    for da, db in ((1.5, 1), (0.6, 1), (1, 1.5), (1, 0.6)):
        assert evidence(x, y, alpha * da, beta * db) < expected


def test_logme_averages_one_evidence_per_class_tag_or_output() -> None:
    x = RNG.normal(size=(30, 4))
    targets = np.stack([x[:, 0] + RNG.normal(size=30), -x[:, 1] + 0.1 * RNG.normal(size=30)], axis=1)
    per_column = [direct_logme(x, targets[:, j])[2] for j in range(2)]
    assert scores.logme(x, targets) == pytest.approx(np.mean(per_column), rel=1e-6)
    assert scores.logme(x, targets[:, 0]) == pytest.approx(per_column[0], rel=1e-6)  # one regression output
    # A tag no example has is left out (its evidence is unbounded: w = 0 fits it exactly).
    tags = np.stack([targets[:, 0] > 0, np.zeros(30, dtype=bool)], axis=1).astype(float)
    assert scores.logme(x, tags) == pytest.approx(scores.logme(x, tags[:, :1]))
    # Features that explain the target have more evidence than noise features.
    assert scores.logme(x, targets[:, 1:]) > scores.logme(RNG.normal(size=(30, 4)), targets[:, 1:])


def class_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([x[y == label].mean(axis=0) for label in y])


def test_h_score_plain_and_shrunk() -> None:
    y = np.repeat([0, 1, 2], 10)
    x = RNG.normal(size=(30, 5)) + np.eye(5)[y] * 2
    cov_f = np.cov(x, rowvar=False, bias=True)
    cov_g = np.cov(class_means(x, y), rowvar=False, bias=True)
    assert scores.h_score(x, y, shrinkage=0.0) == pytest.approx(np.trace(np.linalg.inv(cov_f) @ cov_g), rel=1e-9)
    lw = LedoitWolf().fit(x)
    expected = np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * cov_g))
    assert scores.h_score(x, y) == pytest.approx(expected, rel=1e-9)
    # More features than examples: the plain covariance is singular, the shrunk one is not.
    wide = RNG.normal(size=(8, 20))
    assert np.isfinite(scores.h_score(wide, np.repeat([0, 1], 4)))


def test_nce_and_leep_by_hand() -> None:
    z = np.array([0, 0, 1, 1])  # the source head's predictions
    y = np.array([0, 0, 1, 0])
    # P(z=0,y=0)=1/2, P(z=1,y=1)=P(z=1,y=0)=1/4: H(Y|Z) = 1/2 * 0 + 1/2 * ln 2.
    assert scores.nce(z, y) == pytest.approx(-0.5 * np.log(2))
    # Hard source predictions: LEEP = mean log P(y_i | z_i) = NCE.
    assert scores.leep(np.eye(2)[z], y) == pytest.approx(-0.5 * np.log(2))
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    joint = np.zeros((2, 2))  # P(y, z) = 1/n sum_{i: y_i = y} theta_z(x_i)
    for p, label in zip(probs, y, strict=True):
        joint[label] += p / 4
    conditional = joint / joint.sum(axis=0)
    expected = np.mean([np.log(sum(conditional[y[i], k] * probs[i, k] for k in range(2))) for i in range(4)])
    assert scores.leep(probs, y) == pytest.approx(expected)


def test_knn_and_ridge_probe_leave_one_out() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0], [0.1, 0.9], [0.3, 0.8]])
    onehot = np.eye(2)[[0, 0, 1, 1, 1, 0]]  # the two last of each cluster carry the other label
    data = scores.Features(x, onehot, "classification")
    # k=1, cosine: 0<->1 (right), 2 -> 1 (wrong), 3<->4 (right), 5 -> 4 (wrong): 4 of 6.
    assert scores.knn_score(KNNConfig(k=1), data) == pytest.approx(4 / 6)
    # Closed-form leave-one-out ridge predictions = refitting without each example.
    feats = scores._standardise(RNG.normal(size=(12, 3)))
    targets = RNG.normal(size=(12, 2))
    lam = 0.7
    loo = scores.ridge_loo_predictions(feats, targets, lam)
    for i in range(12):
        keep = np.arange(12) != i
        xm, ym = feats[keep].mean(axis=0), targets[keep].mean(axis=0)
        xc = feats[keep] - xm
        w = np.linalg.solve(xc.T @ xc + lam * np.eye(3), xc.T @ (targets[keep] - ym))
        np.testing.assert_allclose(loo[i], (feats[i] - xm) @ w + ym, rtol=1e-6, atol=1e-9)
    separable = scores.Features(
        np.eye(2)[np.repeat([0, 1], 10)] + 0.1 * RNG.normal(size=(20, 2)),
        np.eye(2)[np.repeat([0, 1], 10)],
        "classification",
    )
    assert scores.linear_score(LinearConfig(), separable) == 1.0


def test_agreement_is_scipy_weighted_tau_oriented_by_direction() -> None:
    score = [0.3, 0.9, 0.1, 0.5, 0.7]
    runs = [[0.61, 0.63], [0.9, 0.88], [0.5, 0.52], [0.7, 0.71], [0.8, 0.79]]
    means = [np.mean(r) for r in runs]
    a = scores.agreement(score, runs, maximize=True, resamples=200)
    assert a.tau == pytest.approx(stats.weightedtau(score, means).statistic)
    assert a.rho == pytest.approx(stats.spearmanr(score, means).statistic)
    assert a.tau == pytest.approx(1.0) and a.tau_low == pytest.approx(1.0)  # runs never swap: no uncertainty
    losses = [[-v for v in r] for r in runs]  # a metric to minimise: the same ranking
    assert scores.agreement(score, losses, maximize=False, resamples=200).tau == pytest.approx(1.0)
    noisy = [[0.6, 0.9], [0.7, 0.8], [0.5, 0.95], [0.65, 0.75], [0.7, 0.72]]
    b = scores.agreement(score, noisy, resamples=500)
    assert b.tau == pytest.approx(stats.weightedtau(score, [np.mean(r) for r in noisy]).statistic)
    assert b.tau_low < b.tau_high  # overlapping runs: the interval is wide
    single = scores.agreement(score, [[m] for m in means], resamples=200)  # one run each: no interval
    assert single.tau == pytest.approx(a.tau) and np.isnan(single.tau_low) and np.isnan(single.rho_high)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["candidates.a=[backbone=minilm]"], "ranking needs at least 2 candidates; got 1"),
        (
            ["candidates.a=[backbone=small_cnn]", "candidates.b=[backbone=small_cnn]", "scores=[logme,sfdx]"],
            "scores: unknown score 'sfdx'",
        ),
        (
            [
                "overrides=[experiment=sst2_minilm]",
                "candidates.a=[backbone.pooling=cls]",
                "candidates.b=[backbone.depth=3]",
                "scores=[logme,leep]",
            ],
            "scores: leep reads the backbone's source classifier head, which candidate(s) a, b",
        ),
        (
            [
                "overrides=[experiment=stsb_minilm]",
                "candidates.a=[backbone.pooling=cls]",
                "candidates.b=[backbone.depth=3]",
                "scores=[hscore]",
            ],
            "scores: hscore applies to classification tasks; this task is regression",
        ),
        (["candidates.a=[backbone=nope]", "candidates.b=[backbone=small_cnn]"], "candidates.a:"),
        (
            ["candidates.a=[backbone.depth=0]", "candidates.b=[backbone=small_cnn]"],
            "candidates.a: backbone.depth: must be >= 1",
        ),
        (["preset=missing"], "preset: no conf/rank/missing.yaml"),
        (
            [
                "overrides=[experiment=hymenoptera_effnet]",
                "candidates.a=[backbone=efficientnet_lite0]",
                "candidates.b=[backbone=efficientnet_lite1]",
            ],
            "candidates.a: data.hflip: ranking reads the training images once, unflipped",
        ),
        (["bogus=1"], "bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err


def test_refusals_come_before_torch() -> None:
    """In a fresh interpreter: a bad rank input exits 2 without importing torch."""
    code = (
        "import sys; from src.rank.cli import main; "
        "rc = main(['overrides=[experiment=sst2_minilm]', 'candidates.a=[backbone.depth=2]', "
        "'candidates.b=[backbone.pooling=cls]', 'scores=[nce]']); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and proc.stdout.strip() == "False", proc.stderr


def log_measured(client: MlflowClient, overrides: list[str], values: list[float]) -> None:
    """Finished linear-probe runs with the params src.run logs for this config (the flattened composed config)."""
    from src.rank.cli import compose

    raw = compose(overrides + ["finetune=linear_probe"])
    params = flatten(OmegaConf.to_container(raw, resolve=True))
    experiment = client.get_experiment_by_name("rank-test").experiment_id
    for seed, value in enumerate(values):
        run = client.create_run(experiment, tags={"finetune": "linear_probe", "seed": str(seed)})
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("val/acc", value, 0, 0)],
            params=[Param(k, v) for k, v in {**params, "seed": str(seed)}.items()],
        )
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))


def test_end_to_end_digits_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = ["experiment=digits_transfer", "backbone.pretrain_epochs=2", f"cache.dir={tmp_path / 'cache'}"]
    sources = {"s01": "[0,1]", "s012": "[0,1,2]", "s01234": "[0,1,2,3,4]"}
    client = MlflowClient(uri)
    client.create_experiment("rank-test", (tmp_path / "mlruns").as_uri())
    measured = {"s01": [0.70, 0.72], "s012": [0.75, 0.74], "s01234": [0.85, 0.86]}
    for name, classes in sources.items():
        log_measured(client, [*shared, f"data.source_classes={classes}"], measured[name])
    args = [
        f"uri={uri}",
        "experiment=rank-test",
        f"out={tmp_path / 'report'}",
        "resamples=200",
        f"overrides=[{','.join(shared)}]",
        *(f"candidates.{n}=['data.source_classes={c}']" for n, c in sources.items()),
        "candidates.broken=[backbone.depth=9]",  # valid config, fails to build: 3 layer groups
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "broken skipped: Error: backbone (small_cnn): depth: 9 layer groups asked, but the backbone has 3" in out
    runs = client.search_runs([client.get_experiment_by_name("rank-test").experiment_id], "tags.role = 'rank'")
    parent = next(r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags)
    children = {
        r.data.tags["candidate"]: r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id
    }
    assert set(children) == {*sources, "broken"}
    assert children["broken"].info.status == "FAILED"
    for name in sources:
        metrics = children[name].data.metrics
        assert children[name].info.status == "FINISHED"
        assert {"rank/logme", "rank/hscore", "rank/knn", "rank/linear", "rank/nce", "rank/leep"} <= set(metrics)
        assert metrics["rank/examples"] == 50 and metrics["rank/seconds"] > 0
    # The parent holds the table, the plot and each score's agreement with the measured runs.
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "scores.csv", "scores.png"} <= artifacts
    tau = parent.data.metrics["agreement/linear_probe/logme/tau"]
    logme = {n: children[n].data.metrics["rank/logme"] for n in sources}
    means = [np.mean(measured[n]) for n in sources]
    assert tau == pytest.approx(stats.weightedtau([logme[n] for n in sources], means).statistic)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Measured: finetune=linear_probe (val/acc, 6 runs)" in report
    assert "overlaps (unresolved)" in report and "weighted tau" in report


def test_depth_keeps_the_first_layer_groups() -> None:
    """A truncated backbone computes what the full one computes after that many groups, pooled; it has no source
    head (the head reads the full features), and every cut it offers the feature cache agrees with its forward."""
    import torch

    from src.backbones import BACKBONES

    images = {"pixel_values": torch.randn(2, 1, 8, 8)}
    full, cut = BACKBONES.build({"name": "small_cnn"}).eval(), BACKBONES.build({"name": "small_cnn", "depth": 2}).eval()
    assert [g.name for g in cut.layer_groups()] == ["stem", "block.0"] and cut.feature_dim == 32
    assert cut.source_classifier is None and full.source_classifier[0].shape == (5, 64)
    with torch.no_grad():
        torch.testing.assert_close(cut(images), full.prefix_output(2, images).mean(dim=(2, 3)))
        for c in cut.cuts():
            torch.testing.assert_close(cut.forward_from(c, cut.prefix_output(c, images)), cut(images))
    minilm = BACKBONES.build({"name": "minilm", "pooling": "cls"}).eval()
    short = BACKBONES.build({"name": "minilm", "pooling": "cls", "depth": 3}).eval()
    assert [g.name for g in short.layer_groups()] == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    text = dict(short.preprocessing.tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True))
    with torch.no_grad():
        hidden = minilm.model(**text, output_hidden_states=True).hidden_states[2]  # after embeddings + 2 layers
        torch.testing.assert_close(short(text), hidden[:, 0], atol=1e-5, rtol=1e-5)
    lite = BACKBONES.build({"name": "efficientnet_lite"}).eval()
    lite_cut = BACKBONES.build({"name": "efficientnet_lite", "depth": 6}).eval()
    assert [g.name for g in lite_cut.layer_groups()] == ["stem", *(f"stages.{i}" for i in range(5))]
    assert lite_cut.feature_dim == 112 and lite_cut.source_classifier is None
    assert lite.source_classifier[0].shape == (1000, 1280)  # the ImageNet classifier
    photo = {"pixel_values": torch.randn(1, 3, 64, 64)}
    with torch.no_grad():
        x = lite.stem(photo["pixel_values"])
        for stage in lite.stages[:5]:
            x = stage(x)
        torch.testing.assert_close(lite_cut(photo), x.mean(dim=(2, 3)))


def test_small_cnn_source_head_is_the_pretraining_classifier() -> None:
    """NCE/LEEP read the head the weights were pretrained with: it classifies the source digits."""
    import torch

    from src.backbones import BACKBONES
    from src.backbones.small_cnn import _source_data

    net = BACKBONES.build({"name": "small_cnn", "pretrain_classes": [0, 1, 2]}).eval()
    x, y = _source_data(net, [0, 1, 2])
    weight, bias = net.source_classifier
    with torch.no_grad():
        accuracy = ((net({"pixel_values": x}) @ weight.T + bias).argmax(dim=1) == y).float().mean()
    assert accuracy > 0.9


def test_a_truncated_backbone_fine_tunes(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    proc = run_cli(["backbone.depth=2", "finetune=full", "trainer.max_epochs=1", "tracking.log_model=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc" in proc.stdout + proc.stderr


def test_examples_scores_a_seeded_subset(tmp_path: Path) -> None:
    """`examples=N` scores N training examples (a fixed cost whatever the data size), under its own cache key."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = f"overrides=[experiment=digits_transfer,backbone.pretrain_epochs=2,cache.dir={tmp_path / 'cache'}]"
    args = [f"uri={uri}", shared, "candidates.a=[backbone.depth=2]", "candidates.b=[backbone.depth=3]"]
    assert main([*args, "examples=20", f"out={tmp_path / 'subset'}"]) == 0
    assert main([*args, f"out={tmp_path / 'all'}"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id], "tags.role = 'rank'")
    examples = sorted(r.data.metrics["rank/examples"] for r in runs if "candidate" in r.data.tags)
    assert examples == [20, 20, 50, 50]  # the subset did not hit the whole split's cache entry, nor the reverse
