"""Hand the encoder (and optionally the head) to timm: same keys, no surgery."""

from __future__ import annotations

import json
from pathlib import Path
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


ENCODER_FILE = "encoder.safetensors"
HEAD_FILE = "head.safetensors"
TIMM_CONFIG_FILE = "timm_config.json"


def save_encoder(mae: MaskedAutoencoderViT, cfg: ModelConfig, folder: str | Path,
                 head: ClassificationHead | None = None) -> Path:
    """E as ``encoder.safetensors`` (timm's keys) and ``timm_config.json`` (the VisionTransformer's
    arguments) in ``folder``: ``load_encoder(folder)`` or plain timm + safetensors read them back.
    With ``head`` (its statistics recomputed on the current encoder), C folded into timm's
    ``head.weight``/``head.bias`` goes to ``head.safetensors``: ``load_encoder(folder, with_head=True)``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "library": "timm"}
    state = {k: v.contiguous().cpu() for k, v in timm_state_dict(mae, head).items()}
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(folder / ENCODER_FILE),
              metadata=meta)
    if head is not None:
        save_file({k: v for k, v in state.items() if k.startswith("head.")}, str(folder / HEAD_FILE), metadata=meta)
    (folder / TIMM_CONFIG_FILE).write_text(json.dumps(timm_vit_kwargs(cfg), indent=2) + "\n")
    return folder / ENCODER_FILE


def load_encoder(folder: str | Path, num_classes: int = 0, with_head: bool = False):
    """The timm ``VisionTransformer`` saved by ``save_encoder``: features only, a fresh head when
    ``num_classes``, or the pretraining head C (``head.safetensors``) when ``with_head``."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    folder = Path(folder)
    kwargs = json.loads((folder / TIMM_CONFIG_FILE).read_text())
    state = load_file(str(folder / ENCODER_FILE))
    if with_head:
        state.update(load_file(str(folder / HEAD_FILE)))
        num_classes = state["head.weight"].shape[0]
    model = VisionTransformer(**{**kwargs, "num_classes": num_classes})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"{folder / ENCODER_FILE} does not match {TIMM_CONFIG_FILE}: missing {missing}, "
                         f"unexpected {unexpected}")
    return model
