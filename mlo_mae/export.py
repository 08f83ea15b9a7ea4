"""Hand the encoder (and optionally the head) to timm: same keys, no surgery."""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig
from .head import ClassificationHead
from .mae import MaskedAutoencoderViT


def timm_vit_kwargs(cfg: ModelConfig, num_classes: int = 0) -> dict[str, Any]:
    """Arguments for ``timm.models.vision_transformer.VisionTransformer`` matching E."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, qkv_bias=True, class_token=True, global_pool="token",
                num_classes=num_classes)


def timm_state_dict(mae: MaskedAutoencoderViT, head: ClassificationHead | None = None) -> dict[str, torch.Tensor]:
    """E's weights under timm's names; with ``head``, C (folded, eval mode) becomes ``head.*``."""
    state = {k: v.detach().clone() for k, v in mae.encoder_state_dict().items()}
    if head is not None:
        state["head.weight"], state["head.bias"] = head.folded_linear()
    return state
