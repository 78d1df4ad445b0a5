"""GPU readiness (issue 24): one command that runs and times on a CUDA machine what only a GPU can show wrong.

    python -m tests.gpu_check                  # on a machine with CUDA: every section, the measured sizes
    python -m tests.gpu_check --cpu-dry-run    # the same sections with tiny sizes on CPU (fp32): checks the logic
    python -m tests.gpu_check --out gpu.json   # also writes the JSON line to a file

Sections, each timed, each failure caught and reported as `"ok": false, "error": ...` so one broken section does
not hide the others:

- throughput: a plain PyTorch loop vs `src.run` (in-process) on the same data module, model, optimizer groups,
  clipping and batches, for MiniLM (SST-2) and EfficientNet-Lite0 (hymenoptera), at 32-true and bf16-mixed:
  samples/s of each and the ratio framework/plain. The framework has no channels_last option, so EfficientNet's
  plain loop is timed both ways: contiguous (the like-for-like ratio) and channels_last (what it would gain);
- feature_cache: `finetune=linear_probe` twice on one cache dir: the first run encodes (on the GPU), the second
  reads the entries back;
- lora: `finetune=lora` on MiniLM;
- ddp: `trainer=ddp finetune=gradual_unfreeze` on every visible GPU, through the real CLI (a subprocess: DDP
  relaunches its script once per rank); skipped, with the reason, on a single GPU; 2 CPU ranks in the dry run;
- serving: the models logged by the LoRA and EfficientNet runs loaded back with `mlflow.pyfunc.load_model` on CPU
  and asked for predictions on 2 raw inputs each.

Everything is written under one temporary folder (MLflow store, artifacts, caches, data slices) that is removed at
the end. The last line printed is one JSON line. Exit status: 0 when every section passed (and on a machine
without CUDA, where nothing is checked unless --cpu-dry-run is given), 1 when a section failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# As `src.run` does at start-up: no "Downloading artifacts" bar each time a model is logged or loaded.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
DDP_RUNS = "trainer=ddp records one MLflow run per rank"
NO_CUDA = "no CUDA device: nothing to check; run this on a GPU machine (or --cpu-dry-run to check the logic on CPU)"


@dataclass
class Sizes:
    """How much each section runs: measured sizes on a GPU, a few steps on tiny data slices in the dry run."""

    precisions: list[str]
    text_batch: int
    text_steps: int
    max_length: int
    image_batch: int
    image_epochs: int
    image_size: int | None  # None: the backbone's (224 for Lite0)
    cache_samples: int
    lora_steps: int
    ddp_samples: int
    ddp_epochs: int


GPU_SIZES = Sizes(["32-true", "bf16-mixed"], 32, 100, 64, 32, 3, None, 8000, 100, 2000, 3)
DRY_SIZES = Sizes(["32-true", "bf16-mixed"], 4, 2, 32, 4, 1, 64, 16, 2, 16, 2)


@dataclass
class Context:
    """Where a check runs: device, sizes, the temporary root and the overrides every run shares."""

    dry: bool
    root: Path
    sizes: Sizes
    sst2: Path
    hymenoptera: Path
    runs: dict[str, str] = field(default_factory=dict)  # role -> MLflow run id (what `serving` loads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry else "cuda:0")

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def common(self, name: str) -> list[str]:
        return [
            f"tracking.uri={self.uri}",
            f"tracking.artifact_location={self.root / 'mlruns'}",
            f"tracking.run_name={name}",
            "tracking.log_checkpoint=false",
            f"cache.dir={self.root / 'cache'}",
            "trainer.enable_progress_bar=false",
            f"trainer.accelerator={'cpu' if self.dry else 'gpu'}",
            "trainer.devices=1",  # in-process runs stay on one device (several would relaunch this script)
        ]

    def text(self, samples: int, batch: int) -> list[str]:
        return [
            "backbone=minilm",
            "data=sst2",
            f"data.train_path={self.sst2 / 'train.tsv'}",
            f"data.val_path={self.sst2 / 'dev.tsv'}",
            "data.test_path=null",
            f"data.max_train_samples={samples}",
            f"data.batch_size={batch}",
            f"data.max_length={self.sizes.max_length}",
        ]

    def images(self) -> list[str]:
        size = self.sizes.image_size
        return [
            "backbone=efficientnet_lite0",
            "data=hymenoptera",
            f"data.train_dir={self.hymenoptera / 'train'}",
            f"data.val_dir={self.hymenoptera / 'val'}",
            f"data.batch_size={self.sizes.image_batch}",
            f"data.image_size={'null' if size is None else size}",
        ]

    def run_named(self, name: str) -> Any:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name("transfer-lab")
        (found,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")
        return found


# --- timing helpers ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Between runs: drop the last run's model and optimizer from the GPU, so runs do not share memory pressure."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def profiler_report() -> Iterator[list[str]]:
    """The SimpleProfiler report of a run in this process (`+trainer.profiler=simple` logs it), kept off screen."""
    logger = logging.getLogger("lightning.pytorch.profilers.profiler")
    handler, propagate, level = _Lines(), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


def training_seconds(report: list[str]) -> float:
    """Total time of Lightning's `run_training_epoch` (every training step with its data loading, callbacks, logging
    and the epoch's validation batch; not setup, testing or model logging): the span the plain loop times."""
    match = re.search(r"run_training_epoch\s*\|\s*[0-9.e+-]+\s*\|\s*\d+\s*\|\s*([0-9.e+-]+)", "\n".join(report))
    if not match:
        raise RuntimeError("no run_training_epoch row in the SimpleProfiler report")
    return float(match.group(1))


# --- the two sides -------------------------------------------------------------------------------------------------


def framework(ctx: Context, name: str, overrides: list[str], profile: bool = False) -> dict[str, Any]:
    """`python -m src.run OVERRIDES` in this process (`tests.test_failures.run_in_process`), with its own launch
    folder; returns the wall time, the profiled training time and the MLflow run it recorded."""
    from tests.test_failures import run_in_process

    cwd = ctx.root / "launch" / name
    cwd.mkdir(parents=True)
    extra = ["+trainer.profiler=simple"] if profile else []
    with profiler_report() as report:
        start = time.perf_counter()
        try:
            code = run_in_process(cwd, *overrides, *ctx.common(name), *extra)
        finally:
            free_memory()
        wall = time.perf_counter() - start
    if code:
        raise RuntimeError(f"src.run {name} exited with status {code}")
    run = ctx.run_named(name)
    if run.info.status != "FINISHED":
        raise RuntimeError(f"src.run {name} left its MLflow run {run.info.status}")
    return {"wall_s": wall, "train_s": training_seconds(report) if profile else None, "run": run}


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last and "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].contiguous(memory_format=torch.channels_last)
    return out


def plain_loop(
    ctx: Context, overrides: list[str], epochs: int, channels_last: bool = False, steps: int | None = None
) -> dict[str, float]:
    """The run's own model, data module, optimizer parameter groups, loss, clipping and precision in a bare PyTorch
    loop (built from the same composed config, so both sides see the same batches); per epoch, like the framework
    under `trainer.limit_val_batches=1`, one validation batch. `steps` stops early (warm-up)."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from src.backbones import BACKBONES
    from src.config import validate
    from src.data import DATA
    from src.module import Head
    from src.optim import build_optimizer
    from src.tasks import TASKS
    from tests.test_failures import composed

    raw = composed(*overrides, *ctx.common("plain"))
    OmegaConf.resolve(raw)
    cfg = validate(raw)
    pl.seed_everything(cfg.seed, verbose=False)
    device = ctx.device
    backbone = BACKBONES.build(raw.backbone, pretrained=True)
    task = TASKS.build(raw.task)
    dm = DATA.build(raw.data, preprocessing=backbone.preprocessing, seed=cfg.seed, task=task)
    dm.setup("fit")
    head = Head(backbone.feature_dim, task.num_outputs, cfg.regularization.head_dropout)
    backbone.to(device)
    head.to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, backbone.layer_groups(), head, cfg.regularization.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    precision = cfg.trainer["precision"]
    clip = cfg.trainer.get("gradient_clip_val")

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    samples = batches = 0
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        backbone.train()
        head.train()
        for batch in dm.train_dataloader():
            batch = to_device(batch, device, channels_last)
            with autocast():
                loss = task.loss(head(backbone(batch)), batch["labels"], cfg.regularization.label_smoothing)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            samples += len(batch["labels"])
            batches += 1
            if steps is not None and batches >= steps:
                break
        backbone.eval()
        head.eval()
        with torch.no_grad(), autocast():
            val = to_device(next(iter(dm.val_dataloader())), device, channels_last)
            head(backbone(val)).argmax(-1).cpu()
    sync(device)
    seconds = time.perf_counter() - start
    del backbone, head, optimizer, params, dm
    free_memory()
    return {"seconds": seconds, "samples": samples, "batches": batches}


# --- sections ------------------------------------------------------------------------------------------------------


def throughput(ctx: Context, backbone: str, precision: str) -> dict[str, Any]:
    """Plain loop vs framework, same batches, one backbone at one precision: samples/s and framework/plain."""
    s = ctx.sizes
    if backbone == "minilm":
        data, epochs = ctx.text(s.text_steps * s.text_batch, s.text_batch), 1
    else:
        data, epochs = ctx.images(), s.image_epochs
    overrides = [
        *data,
        "finetune=full",
        "optim.scheduler=constant",  # the plain loop steps no schedule
        "optim.warmup_ratio=0",
        f"trainer.precision={precision}",
        f"trainer.max_epochs={epochs}",
        "trainer.limit_val_batches=1",  # the run needs its objective; the plain loop evaluates one batch too
        "trainer.limit_test_batches=1",
        "cache.enabled=false",  # full fine-tuning caches nothing; skip the planning
    ]
    image = backbone == "efficientnet_lite0"
    if not ctx.dry:  # warm-up, untimed: CUDA context, cuBLAS/cuDNN handles, allocator pools
        plain_loop(ctx, overrides, 1, channels_last=image, steps=2)
    plain = plain_loop(ctx, overrides, epochs)
    name = f"throughput-{backbone}-{precision}"
    # The image run's model is what `serving` loads back; the text side's comes from `lora`.
    fw = framework(ctx, name, [*overrides, f"tracking.log_model={str(image).lower()}"], profile=True)
    if image:
        ctx.runs["image"] = fw["run"].info.run_id
    out: dict[str, Any] = {
        "backbone": backbone,
        "precision": precision,
        "batches": plain["batches"],
        "samples": plain["samples"],
        "plain_samples_per_s": round(plain["samples"] / plain["seconds"], 2),
        "framework_samples_per_s": round(plain["samples"] / fw["train_s"], 2),
        "ratio": round(plain["seconds"] / fw["train_s"], 3),  # framework speed / plain speed
        "framework_wall_s": round(fw["wall_s"], 1),
    }
    if image:
        cl = plain_loop(ctx, overrides, epochs, channels_last=True)
        out["plain_channels_last_samples_per_s"] = round(cl["samples"] / cl["seconds"], 2)
        out["channels_last"] = "plain loop only (both ways): the framework has no channels_last option"
    return out


def feature_cache(ctx: Context) -> dict[str, Any]:
    """`finetune=linear_probe` twice on one cache dir: the first run encodes every split, the second reads them."""
    precision = ctx.sizes.precisions[-1]
    overrides = [
        *ctx.text(ctx.sizes.cache_samples, 64 if not ctx.dry else 4),
        "finetune=linear_probe",
        "cache.enabled=true",
        f"trainer.precision={precision}",
        "trainer.max_epochs=2",
        "tracking.log_model=false",
    ]
    first = framework(ctx, "cache-encode", overrides)
    second = framework(ctx, "cache-hit", overrides)
    m1, m2 = first["run"].data.metrics, second["run"].data.metrics
    if not m1.get("cache/features/misses"):
        raise RuntimeError(f"the first run encoded nothing: {m1.get('cache/features/misses')} misses")
    if m2.get("cache/features/misses") or not m2.get("cache/features/hits"):
        raise RuntimeError(f"the second run missed the cache: {m2.get('cache/features/misses')} misses")
    return {
        "precision": precision,
        "samples": ctx.sizes.cache_samples,
        "encode_device": "cuda" if torch.cuda.is_available() and not ctx.dry else "cpu",
        "encode_run_s": round(first["wall_s"], 1),
        "encode_s": round(m1["cache/features/seconds_computing"], 2),
        "hit_run_s": round(second["wall_s"], 1),
        "misses": int(m1["cache/features/misses"]),
        "hits": int(m2["cache/features/hits"]),
        "cache_mb": round(m1.get("cache/features/bytes", 0) / 1e6, 1),
    }


def lora(ctx: Context) -> dict[str, Any]:
    """`finetune=lora` on MiniLM: adapters train, the base stays frozen; its model is the text one `serving` loads."""
    s = ctx.sizes
    precision = s.precisions[-1]
    overrides = [
        *ctx.text(s.lora_steps * s.text_batch, s.text_batch),
        "finetune=lora",
        f"trainer.precision={precision}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    fw = framework(ctx, "lora", overrides, profile=True)
    ctx.runs["text"] = fw["run"].info.run_id
    samples = s.lora_steps * s.text_batch
    return {
        "precision": precision,
        "samples": samples,
        "samples_per_s": round(samples / fw["train_s"], 2),
        "trainable_params": int(fw["run"].data.metrics["trainable_params"]),
        "wall_s": round(fw["wall_s"], 1),
    }


def ddp(ctx: Context) -> dict[str, Any]:
    """`trainer=ddp finetune=gradual_unfreeze` through the CLI on every visible GPU (2 gloo ranks on CPU in the dry
    run): it must finish, and the unfreezing schedule must grow the trainable parameters epoch by epoch."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli

    s = ctx.sizes
    if ctx.dry:
        devices = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
        ranks = 2
    else:
        ranks = torch.cuda.device_count()
        if ranks < 2:
            return {"skipped": f"{ranks} CUDA device visible; DDP needs 2 or more"}
        devices = []  # conf/trainer/ddp.yaml: every visible GPU, bf16-mixed
    name = "ddp-gradual-unfreeze"
    cwd = ctx.root / "launch" / name
    cwd.mkdir(parents=True)
    common = [o for o in ctx.common(name) if not o.startswith("trainer.")]
    args = [
        "trainer=ddp",
        *devices,
        *ctx.text(s.ddp_samples, s.text_batch),
        "finetune=gradual_unfreeze",
        f"trainer.max_epochs={s.ddp_epochs}",
        "tracking.log_model=false",
        *common,
    ]
    start = time.perf_counter()
    proc = run_cli(args, cwd, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    client = MlflowClient(ctx.uri)
    experiment = client.get_experiment_by_name("transfer-lab")
    found = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{name}'")
    if not found:
        raise RuntimeError("the DDP launch recorded no MLflow run")
    history = client.get_metric_history(found[0].info.run_id, "trainable_params")
    trainable = [int(m.value) for m in sorted(history, key=lambda m: m.step)]
    if len(trainable) != s.ddp_epochs or trainable != sorted(set(trainable)):
        raise RuntimeError(f"trainable_params per epoch {trainable}: expected {s.ddp_epochs} growing values")
    out = {"ranks": ranks, "epochs": s.ddp_epochs, "trainable_params": trainable, "wall_s": round(wall, 1)}
    if len(found) != 1:  # every rank must attach to rank 0's run (src.tracking.mlflow_run), not open its own
        out |= {"ok": False, "error": f"{DDP_RUNS}: {len(found)} MLflow runs for one launch of {ranks} ranks"}
    return out


def serving(ctx: Context) -> dict[str, Any]:
    """The logged pyfunc models loaded back on CPU (`mlflow.pyfunc.load_model`), each predicting 2 raw inputs: the
    text columns it was trained on, and image file paths."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(ctx.uri)
    images = [str(sorted((ctx.hymenoptera / "val" / c).iterdir())[0]) for c in ("ants", "bees")]
    inputs = {
        "text": pd.DataFrame({"sentence": ["a charming , moving film .", "dull and far too long ."]}),
        "image": pd.DataFrame({"image": images}),
    }
    out: dict[str, Any] = {}
    missing = [role for role in inputs if role not in ctx.runs]
    if missing:
        raise RuntimeError(f"no logged model for {missing}: the section that trains it failed")
    for role, frame in inputs.items():
        start = time.perf_counter()
        dst = ctx.root / "served" / role  # not MLflow's own temp folder, which it leaves behind
        dst.mkdir(parents=True)
        model = mlflow.pyfunc.load_model(f"runs:/{ctx.runs[role]}/model", dst_path=str(dst))
        classifier = model.unwrap_python_model().classifier
        devices = {p.device.type for p in classifier.backbone.parameters()}
        predicted = model.predict(frame)
        if devices != {"cpu"} or len(predicted) != 2:
            raise RuntimeError(f"{role}: parameters on {devices}, {len(predicted)} predictions for 2 inputs")
        out[role] = {"labels": list(predicted["label"]), "seconds": round(time.perf_counter() - start, 2)}
    return out


# --- driver --------------------------------------------------------------------------------------------------------


def section(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One section, timed; any failure becomes `ok: false` with its one-line error (the traceback goes to stderr)."""
    start = time.perf_counter()
    try:
        result = {"ok": True, **fn(*args)}
    except Exception as e:  # noqa: BLE001 - one broken section must not hide the rest
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def dry_data(root: Path, sst2: Path, hymenoptera: Path) -> tuple[Path, Path]:
    """Tiny slices of the shared data sets (both classes in each), so the dry run tokenises and decodes little."""
    text = root / "data" / "sst2"
    text.mkdir(parents=True)
    for split, per_class in (("train", 16), ("dev", 8)):
        header, *rows = (sst2 / f"{split}.tsv").read_text().splitlines()
        picked = [r for r in rows if r.endswith("\t0")][:per_class] + [r for r in rows if r.endswith("\t1")][:per_class]
        (text / f"{split}.tsv").write_text("\n".join([header, *picked]) + "\n")
    images = root / "data" / "hymenoptera"
    for split, per_class in (("train", 6), ("val", 2)):
        for cls in ("ants", "bees"):
            (images / split / cls).mkdir(parents=True)
            for path in sorted((hymenoptera / split / cls).iterdir())[:per_class]:
                shutil.copy(path, images / split / cls / path.name)
    return text, images


def check(dry: bool) -> dict[str, Any]:
    """Every section in a fresh temporary folder (removed afterwards), with this process's signal handlers, cache
    and traceback settings restored, so it can also run inside a test session."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # = tests.conftest.SHARED_DATA
    sst2, hymenoptera = shared / "sst2", shared / "hymenoptera" / "hymenoptera_data"
    missing = [str(p) for p in (sst2, hymenoptera) if not p.is_dir()]
    if missing:
        raise SystemExit(f"shared data not found: {missing} (the check reads ../shared/data next to the checkout)")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    env_keys = ("TRANSFER_LAB_CACHE", "TRANSFER_LAB_TRACEBACK", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in env_keys}
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        # Set before tests.conftest is first imported (it would make a cache folder of its own). A failing run
        # raises its own exception (not one line and an exit), so its section reports the cause.
        os.environ.update(
            {"TRANSFER_LAB_CACHE": str(root / "cache"), "TRANSFER_LAB_TRACEBACK": "1", "HF_HUB_OFFLINE": "1"}
        )
        if dry:
            sst2, hymenoptera = dry_data(root, sst2, hymenoptera)
        ctx = Context(dry, root, DRY_SIZES if dry else GPU_SIZES, sst2, hymenoptera)
        start = time.perf_counter()
        sections: dict[str, Any] = {"throughput": []}
        for backbone in ("minilm", "efficientnet_lite0"):
            for precision in ctx.sizes.precisions:
                sections["throughput"].append(section(throughput, ctx, backbone, precision))
        sections["feature_cache"] = section(feature_cache, ctx)
        sections["lora"] = section(lora, ctx)
        sections["ddp"] = section(ddp, ctx)
        sections["serving"] = section(serving, ctx)
        parts = [*sections["throughput"], *(v for k, v in sections.items() if k != "throughput")]
        return {
            "ok": all(p["ok"] for p in parts),
            "seconds": round(time.perf_counter() - start, 1),
            "sections": sections,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def environment(dry: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {"cuda": cuda, "mode": "cpu-dry-run" if dry else "gpu", "torch": torch.__version__}
    if cuda:
        info |= {
            "device": torch.cuda.get_device_name(0),
            "device_count": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every section with tiny sizes on CPU (fp32)")
    parser.add_argument("--out", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    figures = environment(args.cpu_dry_run)
    if not figures["cuda"] and not args.cpu_dry_run:
        print(NO_CUDA, flush=True)
        figures |= {"ok": True, "checked": False, "message": NO_CUDA}
        code = 0
    else:
        figures |= check(args.cpu_dry_run)
        code = 0 if figures["ok"] else 1
    line = json.dumps(figures)
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
