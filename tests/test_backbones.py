"""Backbones on real (tiny, randomly initialised or packaged) models: layer groups, features, pooling, caching.

Everything is offline: HF models are tiny configs saved with ``save_pretrained`` into a tmp folder and loaded back
by path through the ``hf`` backbone; MiniLM is the packaged checkpoint; small_cnn pretrains on sklearn digits.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    ConvNextConfig,
    ConvNextModel,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from src.backbones import BACKBONES
from src.backbones.base import Backbone, LayerGroup
from src.backbones.efficientnet_lite import EfficientNetLiteConfig
from src.backbones.groups import check_partition, module_layer_groups
from src.backbones.hf import HFConfig
from src.backbones.minilm import MiniLMConfig, minilm_path
from src.backbones.small_cnn import SmallCNNConfig
from src.schema import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
SENTENCES = ["a gripping, beautifully shot film", "the plot never comes together"]


def assert_valid_groups(backbone: Backbone, expected_names: list[str] | None = None) -> list[LayerGroup]:
    groups = backbone.layer_groups()
    check_partition(backbone, groups)  # every parameter exactly once, unique names
    assert all(g.parameters() for g in groups)
    if expected_names is not None:
        assert [g.name for g in groups] == expected_names  # ordered input -> output
    return groups


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random HF models saved to disk (BERT with the MiniLM tokenizer; ResNet with a processor config)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    models = {
        "bert": BertModel(bert),
        "vit": ViTModel(
            ViTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=37,
                image_size=32,
                patch_size=8,
            )
        ),
        "resnet": ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
        "convnext": ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = root / name
        model.save_pretrained(paths[name])
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(paths["bert"])
    processor = {"size": {"shortest_edge": 40}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (paths["resnet"] / "preprocessor_config.json").write_text(json.dumps(processor))
    return paths


def build_hf(path: Path, **overrides: object) -> Backbone:
    return BACKBONES.build({"name": "hf", "model": str(path), **overrides})


def text_batch(backbone: Backbone, sentences: list[str], length: int) -> dict[str, torch.Tensor]:
    tokenizer = backbone.preprocessing.tokenizer
    return dict(tokenizer(sentences, padding="max_length", max_length=length, return_tensors="pt"))


def image_batch(backbone: Backbone, batch_size: int = 2) -> dict[str, torch.Tensor]:
    p = backbone.preprocessing
    return {"pixel_values": torch.randn(batch_size, p.channels, p.image_size, p.image_size), "labels": torch.zeros(2)}


# --- configs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("yaml_path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_lists_every_knob_and_parses(yaml_path: Path) -> None:
    node = OmegaConf.load(yaml_path)
    schema = BACKBONES.entry(node.name).schema
    assert set(node) == {f.name for f in fields(schema)}
    required = [key for key in node if OmegaConf.is_missing(node, key)]  # `???` in the YAML
    if required:
        with pytest.raises(MissingMandatoryValue):
            BACKBONES.config(node)
        for key in required:
            node[key] = "some/model"
    assert isinstance(BACKBONES.config(node), schema)


@pytest.mark.parametrize(
    ("make", "field_name"),
    [
        (lambda: SmallCNNConfig(channels=[]), "channels"),
        (lambda: SmallCNNConfig(pretrain="imagenet"), "pretrain"),
        (lambda: SmallCNNConfig(pretrain_classes=[3, 3]), "pretrain_classes"),
        (lambda: SmallCNNConfig(pretrain_classes=[1, 12]), "pretrain_classes"),
        (lambda: SmallCNNConfig(pretrain_epochs=0), "pretrain_epochs"),
        (lambda: HFConfig(model="m", pooling="max"), "pooling"),
        (lambda: HFConfig(model="m", image_size=0), "image_size"),
        (lambda: MiniLMConfig(pooling="max"), "pooling"),
        (lambda: EfficientNetLiteConfig(variant=3), "variant"),
        (lambda: EfficientNetLiteConfig(drop_connect_rate=1.0), "drop_connect_rate"),
        (lambda: EfficientNetLiteConfig(bn_momentum=0.0), "bn_momentum"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(make, field_name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field_name}: "):
        make()


# --- layer-group discovery -----------------------------------------------------------------------------------------


def test_generic_groups_expand_largest_module_list_and_keep_loose_params() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.inp = nn.Linear(4, 8)
            self.small = nn.ModuleList([nn.Linear(8, 1)])
            self.body = nn.Module()
            self.body.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.body.norm = nn.LayerNorm(8)
            self.act = nn.ReLU()
            self.out = nn.Linear(8, 2)

    toy = Toy()
    groups = module_layer_groups(toy)
    names = ["params", "inp", "small", "body.blocks.0", "body.blocks.1", "body.blocks.2", "body.norm", "out"]
    assert [g.name for g in groups] == names
    check_partition(toy, groups)
    assert groups[0].parameters()[0] is toy.scale  # the model's own parameter, not a copy


def test_check_partition_rejects_missing_and_duplicated_parameters() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="in no layer group"):
        check_partition(model, [LayerGroup("first", [model[0]])])
    with pytest.raises(ValueError, match="is in layer groups 'a' and 'b'"):
        check_partition(model, [LayerGroup("a", [model]), LayerGroup("b", [model[1]])])


# --- Hugging Face backbones ------------------------------------------------------------------------------------------

HF_GROUPS = {
    "bert": ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"],
    "vit": ["embeddings", "layers.0", "layers.1", "layernorm", "pooler"],
    "resnet": ["embedder", "encoder.stages.0", "encoder.stages.1"],
    "convnext": ["embeddings", "encoder.stages.0", "encoder.stages.1", "layernorm"],
}


@pytest.mark.parametrize("family", HF_GROUPS)
def test_hf_family_groups_and_features(tiny_models: dict[str, Path], family: str) -> None:
    backbone = build_hf(tiny_models[family])
    assert_valid_groups(backbone, HF_GROUPS[family])
    if family == "bert":
        batch = {**text_batch(backbone, SENTENCES, 12), "labels": torch.zeros(2)}
    else:
        batch = image_batch(backbone)
    assert backbone(batch).shape == (2, backbone.feature_dim)


def test_hf_text_pooling_cls_differs_from_mean_and_both_ignore_padding(tiny_models: dict[str, Path]) -> None:
    for pooling in ("cls", "mean"):
        backbone = build_hf(tiny_models["bert"], pooling=pooling).eval()
        assert backbone.preprocessing.modality == "text" and backbone.feature_dim == 32
        with torch.no_grad():
            short, padded = (backbone(text_batch(backbone, SENTENCES, n)) for n in (10, 24))
        torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)
        if pooling == "cls":
            cls_features = short
    assert not torch.allclose(cls_features, short, atol=1e-3)


def test_hf_vision_preprocessing_from_processor_config_or_model_config(tiny_models: dict[str, Path]) -> None:
    resnet = build_hf(tiny_models["resnet"]).preprocessing
    assert (resnet.modality, resnet.image_size, resnet.channels) == ("image", 40, 3)
    assert resnet.mean == (0.1, 0.2, 0.3) and resnet.std == (0.4, 0.5, 0.6)
    vit = build_hf(tiny_models["vit"]).preprocessing  # no processor config: the config's size, ImageNet stats
    assert vit.image_size == 32 and vit.mean == (0.485, 0.456, 0.406)


def test_hf_vision_pooling_and_image_size_override(tiny_models: dict[str, Path]) -> None:
    cls, mean = (build_hf(tiny_models["vit"], pooling=p).eval() for p in ("cls", "mean"))
    mean.load_state_dict(cls.state_dict())
    batch = image_batch(cls)
    with torch.no_grad():
        assert not torch.allclose(cls(batch), mean(batch))
    bigger = build_hf(tiny_models["vit"], image_size=48)  # ViT interpolates its position embeddings
    assert bigger.preprocessing.image_size == 48
    assert bigger(image_batch(bigger)).shape == (2, 32)


def test_hf_scratch_has_same_architecture_with_fresh_weights(tiny_models: dict[str, Path]) -> None:
    pretrained, scratch = (
        BACKBONES.build({"name": "hf", "model": str(tiny_models["resnet"])}, pretrained=p) for p in (True, False)
    )
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(
        a["model.embedder.embedder.convolution.weight"], b["model.embedder.embedder.convolution.weight"]
    )


def test_hf_unloadable_model_names_it_and_suggests_a_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    with pytest.raises(
        ConfigError, match=rf"(?s)^backbone \(hf\): could not load Hugging Face model '{missing}'.*local folder"
    ):
        build_hf(missing)


# --- MiniLM -------------------------------------------------------------------------------------------------------


def test_minilm_loads_offline_with_meaningful_384d_features() -> None:
    backbone = BACKBONES.build({"name": "minilm"}).eval()
    assert backbone.feature_dim == 384
    assert_valid_groups(backbone, ["embeddings", *(f"encoder.layer.{i}" for i in range(6)), "pooler"])
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."]
    with torch.no_grad():
        features = backbone(text_batch(backbone, sentences, 16))
    assert features.shape == (3, 384)
    sim = torch.nn.functional.cosine_similarity(features[0], features[1:], dim=-1)
    assert sim[0] > 0.6 > sim[1]  # pretrained: paraphrases close, unrelated sentence far

    scratch = BACKBONES.build({"name": "minilm"}, pretrained=False)
    assert scratch.feature_dim == 384
    name = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(backbone.state_dict()[name], scratch.state_dict()[name])


# --- small CNN ----------------------------------------------------------------------------------------------------


def test_small_cnn_pretrains_on_digits_then_loads_identical_weights_from_cache(tmp_path: Path) -> None:
    node = {"name": "small_cnn", "cache_dir": str(tmp_path)}
    start = time.perf_counter()
    first = BACKBONES.build(node)
    trained_s = time.perf_counter() - start
    start = time.perf_counter()
    second = BACKBONES.build(node)
    cached_s = time.perf_counter() - start

    assert first.pretrain_info["from_cache"] is False and second.pretrain_info["from_cache"] is True
    assert first.pretrain_info["source_accuracy"] > 0.95
    assert Path(first.pretrain_info["cache_path"]).parent == tmp_path / "small_cnn"
    assert [p.name for p in (tmp_path / "small_cnn").glob("*.pt")] == [Path(first.pretrain_info["cache_path"]).name]
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # incl. BatchNorm running statistics
    assert cached_s < trained_s / 5

    other = BACKBONES.build({**node, "pretrain_epochs": 2})  # different settings: a different cache entry
    assert other.pretrain_info["from_cache"] is False
    assert len(list((tmp_path / "small_cnn").glob("*.pt"))) == 2


def test_small_cnn_scratch_and_shapes(tmp_path: Path) -> None:
    scratch = BACKBONES.build({"name": "small_cnn", "cache_dir": str(tmp_path)}, pretrained=False)
    assert scratch.pretrain_info is None and not (tmp_path / "small_cnn").exists()
    assert_valid_groups(scratch, ["stem", "block.0", "block.1"])
    p = scratch.preprocessing
    assert (p.modality, p.image_size, p.channels, p.mean, p.std) == ("image", 8, 1, (0.5,), (0.5,))
    for size in (8, 28):  # global average pooling: any input size
        assert scratch({"pixel_values": torch.randn(3, 1, size, size)}).shape == (3, 64)

    rgb = BACKBONES.build({"name": "small_cnn", "in_channels": 3, "channels": [8, 16], "pretrain": None})
    assert_valid_groups(rgb, ["stem", "block.0"])
    assert rgb.preprocessing.mean == (0.5, 0.5, 0.5)
    assert rgb(image_batch(rgb)).shape == (2, 16)


def test_timm_backbone_builds_when_installed_and_says_how_to_install_when_not() -> None:
    """One test for both sides: with timm (users' machines) a real resnet18 from config, untrained, yields pooled
    features and a partition of layer groups; without it (this CI: timm needs torchvision, which breaks here), the
    one-line install hint."""
    node = {"name": "timm", "model": "resnet18"}
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ConfigError, match=r"^backbone \(timm\): .*pip install -e '\.\[timm\]'"):
            BACKBONES.build(node)
        return
    backbone = BACKBONES.build(node, pretrained=False)
    features = backbone({"pixel_values": torch.zeros(2, 3, 64, 64)})
    assert features.shape == (2, backbone.feature_dim) and len(backbone.layer_groups()) > 2
