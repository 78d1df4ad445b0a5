"""Any Hugging Face ``AutoModel`` (text or vision) as a backbone, by hub id or local ``save_pretrained`` folder."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.masking_utils import create_bidirectional_mask

from src.backbones.base import Backbone, LayerGroup, Preprocessing, State, check_depth_fits
from src.backbones.config import HFConfig, check_pooling
from src.backbones.groups import check_partition, module_layer_groups
from src.cache import path_digest, remember_weights

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FALLBACK_IMAGE_SIZE = 224


class HFBackbone(Backbone):
    """Features from a Hugging Face model's last hidden state.

    ``cls``: for token sequences (text, ViT-like) the first token's final hidden state -- every encoder has one,
    whereas a pooler is often left untrained in checkpoints (e.g. ViT classifiers ship without it); for CNN
    feature maps (ResNet, ConvNeXt) the model's own pooled output. ``mean``: the average over tokens (ignoring
    padding via the attention mask) or spatial positions. A pooler the pooling does not use is still a layer
    group, so every parameter stays covered; it simply receives no gradient.
    """

    def __init__(self, model: PreTrainedModel, preprocessing: Preprocessing, pooling: str) -> None:
        super().__init__()
        check_pooling(pooling)
        self.model = model
        self.preprocessing = preprocessing
        self.pooling = pooling
        self._forward_kwargs = self._vision_forward_kwargs() if preprocessing.modality == "image" else {}
        self.feature_dim = self._probe_feature_dim()

    def _vision_forward_kwargs(self) -> dict[str, Any]:
        """ViT-like models need ``interpolate_pos_encoding`` to accept a size other than the pretraining one."""
        native = getattr(self.model.config, "image_size", None)
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        if accepts and isinstance(native, int) and native != self.preprocessing.image_size:
            return {"interpolate_pos_encoding": True}
        return {}

    def _dummy_batch(self) -> dict[str, torch.Tensor]:
        p = self.preprocessing
        if p.modality == "text":
            return dict(p.tokenizer(["feature size probe"], return_tensors="pt"))
        return {"pixel_values": torch.zeros(1, p.channels, p.image_size, p.image_size)}

    @torch.no_grad()
    def _probe_feature_dim(self) -> int:
        """One eval-mode forward: exact for any model and pooling, and fails at build time if the inputs don't fit."""
        was_training = self.training
        self.eval()
        try:
            return self(self._dummy_batch()).shape[-1]
        finally:
            self.train(was_training)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**self._inputs(batch), **self._forward_kwargs)
        return self._pool(out.last_hidden_state, batch.get("attention_mask"), getattr(out, "pooler_output", None))

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.preprocessing.modality == "text":
            return {k: batch[k] for k in TEXT_INPUTS if k in batch}
        return {"pixel_values": batch["pixel_values"]}

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        if hidden.ndim == 4:  # CNN feature map (B, C, H, W)
            if self.pooling == "cls" and pooled is not None:
                return pooled.flatten(1)
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None or self.preprocessing.modality != "text":
            return hidden.mean(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def layer_groups(self) -> list[LayerGroup]:
        return module_layer_groups(self.model)

    def _text_blocks(self) -> nn.ModuleList | None:
        """BERT-likes (groups ``embeddings``, ``encoder.layer.i``[, ``pooler``]): the blocks the split API steps
        through; None for other models, which support only the cut after the last group."""
        blocks = getattr(getattr(self.model, "encoder", None), "layer", None)
        if self.preprocessing.modality != "text" or not isinstance(blocks, nn.ModuleList):
            return None
        names = [g.name for g in self.layer_groups()]
        expected = ["embeddings", *(f"encoder.layer.{i}" for i in range(len(blocks)))]
        return blocks if names in (expected, [*expected, "pooler"]) else None

    def truncate(self, depth: int) -> None:
        """BERT-likes: keep the embeddings and the first `depth - 1` blocks (the pooler goes unless all are kept);
        the features are the last kept block's hidden states, pooled as configured."""
        blocks = self._text_blocks()
        if blocks is None:
            raise ValueError("depth: truncation is supported for BERT-like text models (embeddings + encoder.layer)")
        groups = self.layer_groups()
        check_depth_fits(depth, groups)
        if depth == len(groups):
            return
        self.model.encoder.layer = blocks[: depth - 1]
        self.model.config.num_hidden_layers = depth - 1
        self.model.pooler = None

    def cuts(self) -> set[int]:
        """BERT-likes also split after the embeddings and after every block: the state is the hidden states."""
        n = len(self.layer_groups())
        blocks = self._text_blocks()
        return {n} | ({c for c in range(1, len(blocks) + 2) if c < n} if blocks is not None else set())

    def prefix_output(self, cut: int, batch: dict[str, torch.Tensor]) -> State:
        if cut == len(self.layer_groups()):
            return self(batch)
        out = self.model(**self._inputs(batch), output_hidden_states=True)
        return {"hidden_states": out.hidden_states[cut - 1], "attention_mask": batch["attention_mask"]}

    def forward_from(self, cut: int, state: State) -> torch.Tensor:
        if isinstance(state, torch.Tensor):  # the cut after the last group: the features themselves
            return state
        hidden, mask = state["hidden_states"], state["attention_mask"]
        attention = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        for block in self._text_blocks()[cut - 1 :]:
            hidden = block(hidden, attention)
        return self._pool(hidden, mask, None)


def _modality(model: PreTrainedModel) -> str:
    """Text or image, from the input the model's forward is built around."""
    if model.main_input_name == "input_ids":
        return "text"
    if model.main_input_name == "pixel_values":
        return "image"
    raise ValueError(f"model: only text and image models are supported, got main input {model.main_input_name!r}")


def _processor_size(processor: dict[str, Any]) -> int | None:
    """Final square side length from an image processor config (crop size if it crops, else resize size)."""
    for key in ("crop_size", "size"):
        size = processor.get(key)
        if key == "crop_size" and not processor.get("do_center_crop", True):
            continue
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            for dim in ("height", "shortest_edge"):
                if dim in size:
                    return int(size[dim])
    return None


def _image_preprocessing(cfg: HFConfig, config: PretrainedConfig) -> Preprocessing:
    """Size/mean/std from ``preprocessor_config.json`` (no torchvision needed), else the config, 224, ImageNet."""
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(cfg.model, revision=cfg.revision)
    except OSError:
        log.warning("hf: %s has no image processor config; size from its config or 224, ImageNet stats", cfg.model)
        processor = {}
    native = getattr(config, "image_size", None)
    size = cfg.image_size or _processor_size(processor) or (native if isinstance(native, int) else FALLBACK_IMAGE_SIZE)
    defaults = Preprocessing(modality="image")
    return Preprocessing(
        modality="image",
        image_size=size,
        channels=getattr(config, "num_channels", defaults.channels),
        mean=tuple(processor.get("image_mean", defaults.mean)),
        std=tuple(processor.get("image_std", defaults.std)),
    )


@contextlib.contextmanager
def _explain_load_errors(cfg: HFConfig) -> Iterator[None]:
    """Turn the hub's errors into one that names the model and says what to do offline."""
    try:
        yield
    except (OSError, ValueError) as e:  # ValueError: e.g. a folder whose config.json has no model_type
        raise OSError(
            f"could not load Hugging Face model '{cfg.model}' (revision {cfg.revision}): {e}\n"
            "Offline, set backbone.model to a local folder written by save_pretrained() (model + tokenizer or "
            "preprocessor config), or pre-fill the Hugging Face cache where there is network access "
            "(and set HF_HUB_OFFLINE=1 to skip the slow connection retries)."
        ) from e


def build_hf(cfg: HFConfig, pretrained: bool = True) -> HFBackbone:
    """Pretrained weights, or (``pretrained=False``) the same architecture randomly initialised."""
    hub = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    with _explain_load_errors(cfg):
        config = AutoConfig.from_pretrained(cfg.model, **hub)
        if pretrained:
            # float32 master weights: transformers 5 otherwise keeps the checkpoint's (maybe half) dtype.
            model = AutoModel.from_pretrained(cfg.model, dtype=torch.float32, **hub)
        else:
            model = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    modality = _modality(model)
    with _explain_load_errors(cfg):
        if modality == "text":
            preprocessing = Preprocessing(modality="text", tokenizer=AutoTokenizer.from_pretrained(cfg.model, **hub))
        else:
            preprocessing = _image_preprocessing(cfg, config)
    backbone = HFBackbone(model, preprocessing, cfg.pooling)
    if cfg.depth is not None:
        backbone.truncate(cfg.depth)
    if pretrained and Path(cfg.model).is_dir():  # after the cut: the weights kept are the source's first groups
        remember_weights(backbone, path_digest(cfg.model), cfg.depth)
    elif pretrained and getattr(config, "_commit_hash", None):
        remember_weights(backbone, cfg.model, config._commit_hash, cfg.depth)
    groups = backbone.layer_groups()
    check_partition(backbone, groups)
    weights = "pretrained" if pretrained else "random"
    log.info(
        "hf: %s (%s, %s weights): %d-d %s features, %d layer groups",
        *(cfg.model, modality, weights, backbone.feature_dim, cfg.pooling, len(groups)),
    )
    return backbone
