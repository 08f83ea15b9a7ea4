"""Build the three levels' modules from a ``ModelConfig`` (timm-style factory)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .head import ClassificationHead
from .mae import MaskedAutoencoderViT
from .masking import MaskingNetwork, PatchScorer


@dataclass
class Models:
    mae: MaskedAutoencoderViT  # E and D
    head: ClassificationHead  # C
    masknet: MaskingNetwork | PatchScorer  # T


def create_mae(cfg: ModelConfig) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads, drop_path=cfg.drop_path,
    )


def create_models(cfg: ModelConfig, num_classes: int) -> Models:
    mae = create_mae(cfg)
    head = ClassificationHead(cfg.embed_dim, num_classes, drop=cfg.head_drop)
    if cfg.mask_net == "patch":
        masknet = PatchScorer(cfg.embed_dim, cfg.mask_hidden_dim)
    else:
        masknet = MaskingNetwork(mae.num_patches, cfg.embed_dim, cfg.mask_hidden_dim, centre=cfg.mask_centre)
    return Models(mae=mae, head=head, masknet=masknet)
