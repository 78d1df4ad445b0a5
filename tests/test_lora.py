"""LoRA on real models: base weights untouched, few trainable parameters, merged weights = a plain backbone."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer, BertConfig, BertModel

from src.backbones import BACKBONES
from src.backbones.minilm import minilm_path
from src.data import DATA
from src.finetune import FINETUNE
from src.finetune.lora import default_targets, merge_adapters
from src.module import Head, TransferModule
from src.optim import OptimConfig, configure_optimizers
from tests.conftest import classification, run_cli


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, as a local save_pretrained folder."""
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.tsv"
    rows = [f"a good and great film {i}\t1" if i % 2 else f"a bad and dull film {i}\t0" for i in range(48)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def test_lora_trains_only_adapters_and_head_and_merges_to_a_plain_backbone(tiny_bert: Path, sentences: Path) -> None:
    pl.seed_everything(0)
    strategy = FINETUNE.build({"name": "lora", "r": 4})
    backbone = strategy.prepare(BACKBONES.build({"name": "hf", "model": str(tiny_bert)}))
    grouped = {id(p) for g in backbone.layer_groups() for p in g.parameters()}
    lora = {n: p for n, p in backbone.named_parameters() if "lora_" in n}
    assert lora and all(id(p) in grouped for p in lora.values()), "adapters must sit inside the layer groups"
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"query", "value"}
    node = {"name": "text_table", "train_path": str(sentences), "batch_size": 8}
    dm = DATA.build(node, preprocessing=backbone.preprocessing, seed=0, task=classification())
    dm.setup("fit")
    module = TransferModule(
        backbone,
        Head(backbone.feature_dim, dm.task.num_outputs),
        dm.task,
        configure_optim=partial(configure_optimizers, cfg=OptimConfig(lr=1e-2, warmup_ratio=0.0), weight_decay=0.0),
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=strategy.callbacks(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{n}" for n in lora} | {f"head.{n}" for n, _ in module.head.named_parameters()}
    total = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for n, p in module.named_parameters() if n in trainable) < 0.05 * total
    for name, p in module.named_parameters():
        if name in trainable and "lora_A" not in name:  # lora_B starts at 0 and the head is new: both must move
            assert not torch.equal(p, before[name]), f"{name} did not train"
        elif name not in trainable:
            assert torch.equal(p, before[name]), f"base weight {name} changed"

    module.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        adapted = module(batch)
        assert merge_adapters(module.backbone) == 4
        merged = module(batch)
    assert torch.allclose(adapted, merged, atol=1e-5)
    state = module.backbone.state_dict()
    assert not [k for k in state if "lora_" in k or "base_layer" in k]
    BACKBONES.build({"name": "hf", "model": str(tiny_bert)}).load_state_dict(state, strict=True)


def test_conv_nets_get_every_conv_layer_and_merge_exactly() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": "small_cnn", "pretrain": None})
    assert default_targets(backbone) == ["stem.0", "block.0.0", "block.1.0"]
    FINETUNE.build({"name": "lora", "r": 2}).prepare(backbone)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at 0 (adapters are a no-op); make them matter
    backbone.eval()
    x = {"pixel_values": torch.randn(4, 1, 8, 8)}
    with torch.no_grad():
        adapted = backbone(x)
        merge_adapters(backbone)
        assert torch.allclose(adapted, backbone(x), atol=1e-4)


@pytest.mark.slow
def test_lora_run_is_recorded_and_its_checkpoint_loads_into_a_plain_backbone(tmp_path: Path) -> None:
    proc = run_cli(["finetune=lora", "trainer.max_epochs=2", "optim.lr=1e-2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer-lab").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.data.params["finetune.r"] == "8" and "finetune.target_modules" not in run.data.params  # None: unset
    trainable = client.get_metric_history(run.info.run_id, "trainable_params")
    assert [m.step for m in trainable] == [0, 1]
    full = sum(p.numel() for p in BACKBONES.build({"name": "small_cnn", "pretrain": None}).parameters())
    assert trainable[-1].value < full, "LoRA on the small CNN must train fewer parameters than the whole backbone"
    proc = run_cli(["finetune=linear_probe", f"finetune.init_from={run.info.run_id}", "trainer.max_epochs=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
