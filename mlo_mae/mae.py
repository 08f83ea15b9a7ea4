"""Masked autoencoder ViT (E and D) built from timm blocks.

Parameter names follow facebookresearch/mae and timm: everything outside the
``decoder_*``/``mask_token`` names is the encoder E and loads, as is, into a timm
``VisionTransformer`` with the same shape (see ``mlo_mae.export``).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block

from .pos_embed import sincos_2d

DECODER_PREFIXES = ("decoder_", "mask_token")


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        # --- encoder E (timm VisionTransformer names) ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size[0]
        self.num_patches = num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=LayerNorm)
            for r in rates
        ])
        self.norm = LayerNorm(embed_dim)
        # --- decoder D ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_embed_dim, grid))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier linears and patch projection, small tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----- parameter bookkeeping -----
    def encoder_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """E's parameters: the ones Stage III differentiates through."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(DECODER_PREFIXES)]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """E alone, in timm ``VisionTransformer`` key names."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_PREFIXES)}

    # ----- pixels <-> patches -----
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), row-major patches, channels last inside a patch."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); inverse of ``patchify``."""
        p, c = self.patch_size, self.in_chans
        b, n, _ = x.shape
        g = int(round(n**0.5))
        x = x.reshape(b, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, c, g * p, g * p)

    # ----- encoder -----
    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus position embeddings, (B, N, d): also the masking network's input."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(x))

    def forward_encoder_masked(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible tokens ``ids_keep`` (B, K) of embedded patches (B, N, d)."""
        d = tokens.shape[-1]
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return self._encode_tokens(visible)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Whole, unmasked image -> (B, 1 + N, d), as timm's ``forward_features``."""
        return self._encode_tokens(self.embed_patches(imgs))

    # ----- decoder -----
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent of visible tokens -> predicted pixels of every patch, (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:, :]

    def patch_errors(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-patch mean squared error against per-patch normalised pixels (norm_pix_loss), (B, N), >= fp32."""
        dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
        target = self.patchify(imgs).to(dtype)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred.to(dtype) - target).pow(2).mean(dim=-1)

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """Without a mask: features of the whole image (B, 1 + N, d). With the mask's
        ``ids_keep``/``ids_restore``: per-patch reconstruction errors (B, N).

        One entry point so that ``torch.func.functional_call`` can run either pass
        with substituted (perturbed or unrolled) encoder weights.
        """
        if ids_keep is None:
            return self.forward_features(imgs)
        latent = self.forward_encoder_masked(self.embed_patches(imgs), ids_keep)
        return self.patch_errors(imgs, self.forward_decoder(latent, ids_restore))
