"""Fine-tuning regularizers on real modules: L2-SP, EMA, mixup/cutmix, augmentation, WiSE-FT, and the CLI."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from src.backbones import BACKBONES
from src.backbones.base import Preprocessing
from src.backbones.minilm import minilm_path
from src.data import DATA
from src.finetune.init import backbone_state, resolve_checkpoint
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from src.regularization import build
from src.regularization.augment import ImageAugment, TokenDropout
from src.regularization.config import AugmentConfig, EMAConfig, L2SPConfig, MixupConfig, RegularizationConfig
from src.regularization.mixup import Mixup
from src.regularization.reference import PretrainedReference
from src.tasks.base import Task
from tests.conftest import classification, run_cli


def digits_module(reg: RegularizationConfig, weight_decay: float = 0.0):
    pl.seed_everything(0)
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})
    dm = DATA.build(
        {"name": "digits", "batch_size": 16}, preprocessing=backbone.preprocessing, seed=0, task=classification()
    )
    dm.setup("fit")
    regs = build(reg, backbone, dm.task.num_outputs)
    module = TransferModule(
        backbone,
        Head(backbone.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(
            configure_optimizers, cfg=OptimConfig(lr=1e-2, warmup_ratio=0.0), weight_decay=weight_decay
        ),
        batch_transforms=regs.batch_transforms,
        loss_terms=regs.loss_terms,
    )
    return module, dm, regs


def trainer(callbacks: list, tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=tmp_path is not None,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def bound_classification(k: int) -> Task:
    task = classification()
    task.bind([str(i) for i in range(k)], None)
    return task


def test_l2sp_is_zero_at_init_and_grows_as_weights_move() -> None:
    reg = RegularizationConfig(l2_sp=L2SPConfig(alpha=0.5))
    module, _, regs = digits_module(reg)
    (l2sp,) = regs.loss_terms
    logits = torch.zeros(2, module.task.num_outputs)
    assert l2sp(module, {}, logits).item() == 0.0
    values = []
    for shift in (1e-3, 1e-2):
        with torch.no_grad():
            for p, p0 in l2sp.reference.param_pairs():
                p.copy_(p0 + shift)
        values.append(l2sp(module, {}, logits).item())
    n = sum(p.numel() for p in module.backbone.parameters())
    assert values[0] == pytest.approx(0.5 * n * 1e-6, rel=1e-3)
    assert values[1] > values[0]


def test_l2sp_head_term_and_backbone_weight_decay_off(tmp_path: Path) -> None:
    reg = RegularizationConfig(l2_sp=L2SPConfig(alpha=0.1, beta=0.01))
    module, dm, regs = digits_module(reg, weight_decay=0.05)
    l2sp = regs.loss_terms[0]
    expected = 0.01 * sum((p**2).sum() for p in module.head.parameters())
    assert l2sp(module, {}, torch.zeros(1)).item() == pytest.approx(expected.item(), rel=1e-5)
    t = trainer(regs.callbacks, max_steps=4, limit_val_batches=0)
    t.fit(module, datamodule=dm)
    head = len(module.backbone.layer_groups())
    decays = {(g["layer_group"] == head, g["weight_decay"]) for g in t.optimizers[0].param_groups}
    assert (False, 0.0) in decays and (True, 0.05) in decays and (False, 0.05) not in decays
    # The backbone moved, so the penalty is now positive.
    assert l2sp(module, {}, torch.zeros(1)).item() > expected.item()


def test_ema_weights_differ_from_raw_and_are_the_ones_tested(tmp_path: Path) -> None:
    module, dm, regs = digits_module(RegularizationConfig(ema=EMAConfig(decay=0.8)))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    t = trainer([*regs.callbacks, checkpoint], tmp_path, max_epochs=4)
    t.fit(module, datamodule=dm)
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    ema, raw = saved["state_dict"], saved["current_model_state"]
    weights = [k for k in ema if k.endswith("weight")]
    assert any(not torch.equal(ema[k], raw[k]) for k in weights), "EMA weights equal the raw weights"
    t.test(module, datamodule=dm, ckpt_path=checkpoint.best_model_path)
    tested = module.state_dict()
    assert all(torch.equal(tested[k], ema[k]) for k in weights), "test did not run on the EMA weights"


def test_mixup_mixes_images_and_labels_alike() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    labels = torch.arange(8) % 4
    out = Mixup(MixupConfig(prob=1.0, mixup_alpha=0.4), bound_classification(4))({"pixel_values": x, "labels": labels})
    soft = out["soft_labels"]
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert soft.max(1).values.min() < 1, "no sample was mixed"
    # Each mixed image is lam * own + (1 - lam) * partner, with the same lam as its label weights.
    lam = soft[torch.arange(8), labels]
    partner = (out["pixel_values"] - lam.view(-1, 1, 1, 1) * x) / (1 - lam).view(-1, 1, 1, 1)
    assert all(any(torch.allclose(partner[i], x[j], atol=1e-4) for j in range(8)) for i in range(8) if lam[i] < 0.99)


def test_cutmix_label_weight_is_the_pasted_area() -> None:
    torch.manual_seed(1)
    x = torch.zeros(4, 1, 16, 16)
    x[1:] = 1.0  # sample 0 is black, the others white
    labels = torch.tensor([0, 1, 1, 1])
    cfg = MixupConfig(prob=1.0, mixup_alpha=0.0, cutmix_alpha=1.0)
    for _ in range(20):
        out = Mixup(cfg, bound_classification(2))({"pixel_values": x, "labels": labels})
        white = out["pixel_values"][0].mean()  # the share of sample 0 pasted over from white samples
        assert out["soft_labels"][0, 1].item() == pytest.approx(white.item(), abs=1e-6)


def test_image_augment_flip_is_exact_and_jitter_stays_in_range() -> None:
    pre = Preprocessing(modality="image", image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = (torch.rand(4, 3, 8, 8) - 0.5) / 0.25
    flipped = ImageAugment(AugmentConfig(hflip=1.0), pre)({"pixel_values": x})["pixel_values"]
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    cfg = AugmentConfig(crop_scale=[0.3, 0.6], color_jitter=0.5)
    out = ImageAugment(cfg, pre)({"pixel_values": x})["pixel_values"]
    assert out.shape == x.shape and not torch.allclose(out, x)
    pixels = out * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_token_dropout_spares_special_tokens_and_padding() -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = dict(tokenizer(["a fine film with a good cast"] * 50 + ["bad"] * 50, padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    out = TokenDropout(0.3, tokenizer)(batch)
    ids, new = batch["input_ids"], out["input_ids"]
    changed = ids != new
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert not changed[special].any() and not changed[batch["attention_mask"] == 0].any()
    assert (new[changed] == tokenizer.mask_token_id).all()
    assert 0.2 < changed.sum() / (~special).sum() < 0.4


def test_wise_ft_interpolates_towards_the_pretrained_weights() -> None:
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})
    reference = PretrainedReference(backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    reference.interpolate(backbone, 0.25)
    after = backbone.state_dict()
    for name, _ in backbone.named_parameters():
        assert torch.allclose(after[name], before[name] + 0.25), name


def test_image_knobs_on_a_text_backbone_are_an_error() -> None:
    backbone = BACKBONES.build({"name": "minilm"})
    with pytest.raises(ValueError, match="mixup: image-only"):
        build(RegularizationConfig(mixup=MixupConfig(prob=0.5)), backbone, 2)


@pytest.mark.slow
def test_strong_preset_runs_end_to_end_and_is_recorded(tmp_path: Path) -> None:
    proc = run_cli(["regularization=strong", "regularization.wise_ft_alpha=0.5", "trainer.max_epochs=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer-lab").experiment_id])
    params = run.data.params
    assert params["regularization.l2_sp.alpha"] == "0.01" and params["regularization.ema.decay"] == "0.9"
    assert params["regularization.mixup.cutmix_alpha"] == "1.0" and params["regularization.wise_ft_alpha"] == "0.5"
    assert params["regularization.augment.crop_scale"] == "[0.6, 1.0]"
    assert run.data.metrics["train/l2_sp"] > 0 and run.data.metrics["test/acc"] > 0.5
    # The logged checkpoint is what was tested: the best checkpoint's EMA weights, then halfway back to pretrained.
    logged = backbone_state(resolve_checkpoint(run.info.run_id, client))
    (best,) = tmp_path.glob("outputs/**/checkpoints/best.ckpt")
    ema = backbone_state(best)
    pretrained = BACKBONES.build({"name": "small_cnn"}).state_dict()
    for name, value in logged.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.5 * pretrained[name] + 0.5 * ema[name], atol=1e-6), name
