import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mlo_mae.config import resolve
from mlo_mae.export import timm_state_dict, timm_vit_kwargs
from mlo_mae.factory import create_models


@pytest.mark.parametrize("preset,img,patch,width,depth,dec_width,dec_depth", [
    ("tiny", 32, 4, 192, 4, 128, 2),
    ("tiny-28", 28, 4, 192, 4, 128, 2),
    ("small", 32, 4, 384, 12, 256, 4),
    ("base-cifar", 32, 2, 768, 12, 512, 8),
    ("base-imagenet", 224, 16, 768, 12, 512, 8),
])
def test_presets_shapes(preset, img, patch, width, depth, dec_width, dec_depth):
    cfg = resolve("paper", preset=preset).model  # the paper's T; the default one is checked below
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth) == (img, patch, width, depth)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth) == (dec_width, dec_depth)
    device = "cpu" if preset in ("tiny", "tiny-28", "small") else "meta"  # ViT-B: shapes only
    with torch.device(device):
        m = create_models(cfg, num_classes=10)
        n = (img // patch) ** 2
        x = torch.randn(2, 3, img, img)
        tokens = m.mae.embed_patches(x)
        probs = m.masknet(tokens)
        assert tokens.shape == (2, n, width) and probs.shape == (2, n)
        assert m.mae(x).shape == (2, n + 1, width)
        ids = torch.argsort(torch.rand(2, n), dim=1)
        keep = n - round(0.75 * n)
        errors = m.mae(x, ids[:, :keep], torch.argsort(ids, dim=1))
        assert errors.shape == (2, n)
        assert m.head(m.mae(x)).shape == (2, 10)
    assert (m.masknet.fc1.in_features, m.masknet.fc1.out_features) == (n * width, 512)
    if preset == "base-cifar":  # the paper: ~100M weights in T at N=256, d=768
        assert 100e6 < sum(p.numel() for p in m.masknet.parameters()) < 101e6
    with torch.device("meta"):  # the default T scores each patch alone: d*512 weights, whatever N
        t = create_models(resolve(preset=preset).model, num_classes=10).masknet
    assert (t.fc1.in_features, t.fc1.out_features, t.fc2.out_features) == (width, 512, 1)
    if preset.startswith("base"):  # ViT-B encoder: 85.8M parameters
        enc = sum(p.numel() for _, p in m.mae.encoder_named_parameters())
        assert 85e6 < enc < 87e6


def test_patchify_roundtrip_and_layout():
    m = create_models(resolve().model, 10).mae
    x = torch.randn(2, 3, 32, 32)
    p = m.patchify(x)
    assert p.shape == (2, 64, 48)
    assert torch.equal(m.unpatchify(p), x)
    # patch 1 is the second 4x4 block of the first row, channels last inside it
    assert torch.equal(p[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))


def test_position_embeddings_are_fixed_sincos():
    m = create_models(resolve().model, 10).mae
    assert "pos_embed" not in dict(m.named_parameters())
    assert torch.all(m.pos_embed[0, 0] == 0)  # CLS slot
    assert m.pos_embed.abs().max() <= 1.0
    assert len({tuple(r.tolist()) for r in m.pos_embed[0, 1:]}) == 64  # one code per patch


def test_encoder_and_head_load_into_timm_without_key_surgery():
    cfg = resolve().model
    torch.manual_seed(0)
    m = create_models(cfg, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    m.head.train()
    m.head(m.mae(torch.randn(64, 3, 32, 32)))  # give the head's normalisation real statistics
    m.mae.eval(), m.head.eval()

    encoder_only = VisionTransformer(**timm_vit_kwargs(cfg, num_classes=0)).eval()
    encoder_only.load_state_dict(m.mae.encoder_state_dict(), strict=True)
    torch.testing.assert_close(encoder_only.forward_features(x), m.mae.forward_features(x))

    full = VisionTransformer(**timm_vit_kwargs(cfg, num_classes=10)).eval()
    full.load_state_dict(timm_state_dict(m.mae, m.head), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(full(x), m.head(m.mae(x)), rtol=1e-4, atol=1e-4)
