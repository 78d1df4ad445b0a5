"""Reading runs back from any MLflow tracking URI: the selection (experiment, sweep parent, filter), which runs
count (finished, with the metric) and what is known about each (config values, seed, metric, cost)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from src.regularization.config import WISE_FT
from src.schema import ConfigError
from src.sweep.trial import ROLE_TAG, STATE_TAG, STUDY_TAG, TRIAL_TAG
from src.tracking.multirun import RANK_ROLE
from src.tracking.multirun import ROLE_TAG as GRID_ROLE_TAG
from src.tracking.summary import EVAL_SETS_TAG, eval_sets

REPORT_TAG = "report"  # set on the run a report is logged to; such runs are never compared
UNSET = {"None", "null", ""}  # how older runs recorded an unset value (newer runs omit the param)


def open_store(uri: str) -> MlflowClient:
    """A client for an existing store: MLflow would silently create an empty sqlite/file store at a wrong path."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            path = Path(uri[len(scheme) :])
            if not path.exists():
                raise ConfigError(f"uri: no MLflow store at {path} (from {uri!r}); run from the directory holding it")
            break
    # A server that is down should fail in seconds, not after MLflow's default retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as e:
        raise ConfigError(f"uri: cannot read an MLflow store at {uri!r}: {str(e).splitlines()[0]}") from None
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        raise ConfigError(f"experiment: no experiment {name!r} in this store; experiments: {', '.join(names)}")
    return experiment.experiment_id


def find_parent(client: MlflowClient, experiment: str, sweep: str) -> Run:
    """The parent run of a sweep or grid by run id, run name, Optuna study name or multirun folder."""
    try:
        return client.get_run(sweep)
    except MlflowException:
        pass
    quoted = sweep.replace("'", "\\'")
    folder = str(Path(sweep).resolve()).replace("'", "\\'")
    for where in (
        f"attributes.run_name = '{quoted}'",
        f"tags.{STUDY_TAG} = '{quoted}' and tags.{ROLE_TAG} = 'study'",
        f"tags.multirun_dir = '{folder}' and tags.{GRID_ROLE_TAG} = 'grid'",
    ):
        found = client.search_runs([experiment], where, max_results=1)
        if found:
            return found[0]
    raise ConfigError(f"sweep: no run with id, name, Optuna study name or multirun folder {sweep!r} in this experiment")


def search(client: MlflowClient, experiment: str, where: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        try:
            page = client.search_runs([experiment], where, ViewType.ACTIVE_ONLY, 1000, page_token=token)
        except MlflowException as e:
            raise ConfigError(f"filter: MLflow rejects {where!r}: {str(e).splitlines()[0]}") from None
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@dataclass
class RunRecord:
    """One run as the comparison sees it."""

    run_id: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    seed: int | None
    start_ms: int
    val: float | None = None  # best validation value of the metric over the run (the objective)
    test: float | None = None  # the test value of the best checkpoint
    trainable_params: float | None = None
    seconds: float | None = None  # wall time of the whole run (build, fit, test)
    epochs: int | None = None  # epochs trained, up to the last validation (metrics are logged with step = epoch)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric's last value (test/<set>/..., ...)

    def value(self, key: str) -> str | None:
        """A config value by key: a param (`optim.lr`), else a tag (`finetune`: the option the user picked), else
        the group's registry name (`finetune.name`). Missing or recorded as None means unset."""
        for source in (self.params.get(key), self.tags.get(key), self.params.get(f"{key}.name")):
            if source is not None:
                return None if source in UNSET else source
        return None

    @property
    def eval_sets(self) -> list[str]:
        return eval_sets(self.tags)

    @property
    def trial(self) -> int | None:
        trial = self.tags.get(TRIAL_TAG)
        return int(trial) if trial is not None else None


@dataclass
class Selection:
    """The runs compared, and how many were left out and why."""

    runs: list[RunRecord]
    metric: str
    maximize: bool
    val_metric: str | None
    test_metric: str | None
    compared: str  # "val" or "test": the column the comparison uses
    excluded: Counter = field(default_factory=Counter)
    parent: Run | None = None
    experiment_id: str = ""


@dataclass(frozen=True)
class MetricName:
    """A metric name's parts: `test/[wise_ft/<alpha>/][<set>/]<base>`, e.g. `test/wise_ft/0.5/rotate/acc`."""

    stage: str  # val, test, or the whole name of a metric that is neither (trainable_params)
    base: str  # the task's metric: acc, macro_f1, spearman, mae, ...
    eval_set: str | None = None
    alpha: str | None = None

    @classmethod
    def parse(cls, name: str) -> MetricName:
        stage, *middle, base = name.split("/") if "/" in name else (name, name)
        alpha = None
        if len(middle) >= 2 and middle[0] == WISE_FT:
            alpha, middle = middle[1], middle[2:]
        return cls(stage, base, "/".join(middle) or None, alpha)

    def test(self, eval_set: str | None = None, alpha: str | None = None) -> str:
        """The test metric of this base on `eval_set` (None: in distribution), under WiSE-FT `alpha` if given."""
        return "/".join(["test", *([WISE_FT, alpha] if alpha else []), *([eval_set] if eval_set else []), self.base])


def split_names(metric: str) -> tuple[str | None, str | None, str]:
    """`val/acc` -> (`val/acc`, `test/acc`, "val"); an eval-set or WiSE-FT test metric (`test/rotate/acc`) has no
    validation counterpart; a metric that is neither val/ nor test/ is compared as is."""
    stage, sep, rest = metric.partition("/")
    if not sep or stage not in ("val", "test"):
        return metric, None, "val"
    name = MetricName.parse(metric)
    if stage == "test" and (name.eval_set or name.alpha):
        return None, metric, "test"
    return f"val/{rest}", f"test/{rest}", stage


def default_metric(runs: list[Run]) -> str:
    objectives = Counter(r.data.params["objective.metric"] for r in runs if "objective.metric" in r.data.params)
    if not objectives:
        raise ConfigError("metric: the runs record no objective.metric; name one, e.g. metric=val/acc")
    if len(objectives) > 1:
        listed = ", ".join(f"{m} ({n} runs)" for m, n in objectives.most_common())
        raise ConfigError(f"metric: the runs optimise different objectives: {listed}; choose one with metric=...")
    return next(iter(objectives))


def default_maximize(runs: list[Run], metric: str) -> bool:
    """The runs' objective direction when the metric is their objective's task metric (on any split, eval set or
    WiSE-FT alpha: `test/rotate/mae` goes the way `val/mae` does), else: losses down, everything else up."""
    base = MetricName.parse(metric).base
    for run in runs:
        params = run.data.params
        if "objective.metric" in params and MetricName.parse(params["objective.metric"]).base == base:
            return params.get("objective.direction", "maximize") == "maximize"
    return "loss" not in metric


def select(
    client: MlflowClient,
    experiment: str,
    sweep: str | None = None,
    where: str = "",
    metric: str | None = None,
    maximize: bool | None = None,
) -> Selection:
    """Runs of `experiment` (children of `sweep` if given) matching `where`; every run that is not a finished job
    with the metric is excluded and counted by reason (running, failed, pruned, no metric)."""
    exp_id = experiment_id(client, experiment)
    parent = find_parent(client, exp_id, sweep) if sweep else None
    clauses = [f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"] if parent else []
    if where:
        clauses.append(where)
    found = search(client, exp_id, " and ".join(clauses))
    parents = {r.data.tags.get(MLFLOW_PARENT_RUN_ID) for r in found}
    # Not jobs: reports, sweep parents (Optuna's or a grid's), rankings, so they are not counted as exclusions either.
    jobs = [
        r
        for r in found
        if REPORT_TAG not in r.data.tags
        and r.info.run_id not in parents
        and r.data.tags.get(ROLE_TAG) != "study"
        and r.data.tags.get(GRID_ROLE_TAG) not in ("grid", RANK_ROLE)
    ]
    if not jobs:
        scope = f"sweep {sweep!r}" if sweep else f"experiment {experiment!r}"
        raise ConfigError(f"no runs match in {scope}" + (f" with filter {where!r}" if where else ""))
    excluded: Counter = Counter()
    finished = []
    for run in jobs:
        status = run.info.status
        if status in ("RUNNING", "SCHEDULED"):
            excluded["running"] += 1
        elif status != "FINISHED":
            excluded["failed"] += 1
        elif run.data.tags.get(STATE_TAG) == "PRUNED":
            excluded["pruned"] += 1
        else:
            finished.append(run)
    if not finished:
        raise ConfigError(f"no finished runs to compare ({dict(excluded)} of {len(jobs)} runs)")
    metric = metric or default_metric(finished)
    check_shift_names(finished, metric)
    maximize = default_maximize(finished, metric) if maximize is None else maximize
    val_metric, test_metric, compared = split_names(metric)
    records = []
    for run in finished:
        record = _record(client, run, val_metric, test_metric, maximize)
        if getattr(record, compared) is None:
            excluded[f"no {metric}"] += 1
        else:
            records.append(record)
    if not records:
        logged = sorted({m for r in finished for m in r.data.metrics if not m.startswith("lr-")})
        raise ConfigError(f"metric: no finished run logged {metric!r}; logged: {', '.join(logged)}")
    records.sort(key=lambda r: r.start_ms)
    return Selection(records, metric, maximize, val_metric, test_metric, compared, excluded, parent, exp_id)


def check_shift_names(runs: list[Run], metric: str) -> None:
    """An eval set or WiSE-FT alpha in `metric` that no selected run has is named, with those that exist."""
    name = MetricName.parse(metric)
    if name.stage != "test":
        return
    if name.eval_set:
        known = sorted({s for r in runs for s in eval_sets(r.data.tags)})
        if name.eval_set not in known:
            exist = f"eval sets: {', '.join(known)}" if known else f"no run has eval sets (tag {EVAL_SETS_TAG})"
            raise ConfigError(f"metric: no selected run has the eval set {name.eval_set!r}; {exist}")
    if name.alpha:
        alphas = sorted({MetricName.parse(m).alpha for r in runs for m in r.data.metrics} - {None})
        if name.alpha not in alphas:
            exist = f"logged: {', '.join(alphas)}" if alphas else f"no run logged test/{WISE_FT}/<alpha>/..."
            raise ConfigError(f"metric: no selected run has the WiSE-FT alpha {name.alpha!r}; {exist}")


def _record(
    client: MlflowClient, run: Run, val_metric: str | None, test_metric: str | None, maximize: bool
) -> RunRecord:
    info, data = run.info, run.data
    seed = data.tags.get("seed", data.params.get("seed"))
    record = RunRecord(
        run_id=info.run_id,
        name=info.run_name or info.run_id,
        params=dict(data.params),
        tags=dict(data.tags),
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        start_ms=info.start_time or 0,
        test=data.metrics.get(test_metric) if test_metric else None,
        trainable_params=data.metrics.get("trainable_params"),
        seconds=(info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None,
        metrics=dict(data.metrics),
    )
    if val_metric in data.metrics:
        history = client.get_metric_history(info.run_id, val_metric)
        values = [m.value for m in history]
        record.val = max(values) if maximize else min(values)
        record.epochs = max(m.step for m in history) + 1  # step = epoch: the last validated epoch
    return record
