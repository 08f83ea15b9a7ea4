import pytest
import torch

from mlo_mae.masking import (
    MaskingNetwork,
    PatchScorer,
    num_masked,
    random_mask,
    top_k_mask,
    weighted_reconstruction_loss,
)


@pytest.mark.parametrize("n,r,k", [(64, 0.75, 48), (196, 0.75, 147), (256, 0.75, 192),
                                   (10, 0.25, 3), (10, 0.35, 4), (4, 0.01, 1), (4, 0.99, 3)])
def test_number_masked_is_round_half_up_clamped(n, r, k):
    assert num_masked(n, r) == k


def test_top_k_masks_the_highest_probabilities():
    torch.manual_seed(0)
    probs = torch.rand(5, 16)
    m = top_k_mask(probs, 0.75)
    k = 12
    for row in range(5):
        expected = set(torch.topk(probs[row], k).indices.tolist())
        masked = set(torch.nonzero(m.mask[row]).flatten().tolist())
        assert masked == expected
        assert set(m.ids_keep[row].tolist()) == set(range(16)) - expected
    assert torch.equal(m.mask.sum(1), torch.full((5,), float(k)))


def test_ids_restore_inverts_the_keep_then_mask_order():
    probs = torch.rand(3, 16)
    m = top_k_mask(probs, 0.5)
    order = torch.argsort(m.ids_restore, dim=1)  # image order -> [visible, masked]
    assert torch.equal(order[:, :8], m.ids_keep)
    # Patches put in [visible..., masked...] order come back in image order.
    tokens = torch.arange(16).expand(3, -1)
    shuffled = torch.gather(tokens, 1, order)
    assert torch.equal(torch.gather(shuffled, 1, m.ids_restore), tokens)


def test_random_mask_count_and_variety():
    torch.manual_seed(1)
    m = random_mask(200, 16, 0.75, torch.device("cpu"))
    assert torch.equal(m.mask.sum(1), torch.full((200,), 12.0))
    freq = m.mask.mean(0)  # every patch masked about 75% of the time
    assert torch.all((freq > 0.6) & (freq < 0.9))


def test_weighted_loss_matches_a_hand_sum():
    errors = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    probs = torch.tensor([[0.9, 0.5, 0.25, 0.1]])
    loss = weighted_reconstruction_loss(errors, mask, probs)
    assert loss.item() == pytest.approx((0.5 * 2.0 + 0.25 * 3.0) / 2.0)
    assert weighted_reconstruction_loss(errors, mask, None).item() == pytest.approx(2.5)


def test_masking_network_layers_are_the_papers():
    t = MaskingNetwork(num_patches=16, embed_dim=8, hidden_dim=512)
    assert (t.fc1.in_features, t.fc1.out_features) == (128, 512)
    assert (t.fc2.in_features, t.fc2.out_features) == (512, 16)
    assert isinstance(t.act, torch.nn.ReLU)
    p = t(torch.randn(4, 16, 8))
    assert p.shape == (4, 16) and torch.all((p > 0) & (p < 1))


def test_sum_normalised_weights_are_each_images_share_of_its_masked_probability():
    """stage1_norm=sum: per image sum(p*err)/sum(p) over masked patches, images averaged; every image's
    weights sum to 1/B, so lowering all of T's probabilities cannot shrink Stage I."""
    errors = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    probs = torch.tensor([[0.9, 0.5, 0.25, 0.1], [0.2, 0.7, 0.7, 0.6]])
    loss = weighted_reconstruction_loss(errors, mask, probs, "sum")
    first = (0.5 * 2.0 + 0.25 * 3.0) / 0.75
    second = (0.2 * 4.0 + 0.6 * 1.0) / 0.8
    assert loss.item() == pytest.approx((first + second) / 2)
    (weights,) = torch.autograd.grad(loss, errors)
    assert torch.allclose(weights.sum(1), torch.full((2,), 0.5))
    assert torch.allclose(weights[0], torch.tensor([0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]) / 2)
    # Scaling every probability leaves the loss as it is; under count it scales the loss.
    assert weighted_reconstruction_loss(errors, mask, probs * 0.1, "sum").item() == pytest.approx(loss.item())
    count = weighted_reconstruction_loss(errors, mask, probs, "count").item()
    assert weighted_reconstruction_loss(errors, mask, probs * 0.1, "count").item() == pytest.approx(0.1 * count)
    # Plain MAE (no probabilities) is the same under both.
    assert weighted_reconstruction_loss(errors, mask, None, "sum").item() == pytest.approx(
        weighted_reconstruction_loss(errors, mask, None, "count").item())
    with pytest.raises(ValueError, match="unknown Stage-I weight normalisation 'mean'"):
        weighted_reconstruction_loss(errors, mask, probs, "mean")


def test_patch_scorer_scores_each_patch_by_itself():
    torch.manual_seed(0)
    t = PatchScorer(embed_dim=8, hidden_dim=16)
    tokens = torch.randn(3, 10, 8)
    p = t(tokens)
    assert p.shape == (3, 10) and torch.all((p > 0) & (p < 1))
    order = torch.randperm(10)
    assert torch.allclose(t(tokens[:, order]), p[:, order])  # shared across positions
    other = tokens.clone()
    other[1, 4] = torch.randn(8)  # one patch of one image changes: only its score moves
    moved = (t(other) - p).abs()
    assert moved[[0, 2]].max() == 0 and moved[1].max() > 0  # only the image whose patch changed moves
    # Its other patches keep their order: they move only through the image's mean and spread.
    keep = torch.arange(10) != 4
    assert torch.equal(torch.argsort(t(other)[1, keep]), torch.argsort(p[1, keep]))
    assert sum(x.numel() for x in t.parameters()) == 8 * 16 + 16 + 16 + 1
    # Within an image the logits have mean 0 and standard deviation SPREAD, whatever the output layer's scale.
    with torch.no_grad():
        t.fc2.bias.fill_(-7.0)
        t.fc2.weight.mul_(100.0)
    logits = torch.logit(t(tokens).double())
    assert torch.allclose(logits.mean(1), torch.zeros(3, dtype=torch.double), atol=1e-5)
    assert torch.allclose(logits.std(1), torch.full((3,), PatchScorer.SPREAD, dtype=torch.double), atol=1e-4)


def test_centred_masking_network_ignores_what_every_image_shares():
    """mask_centre: the input is centred by a running mean of T's input, so adding the same tensor to
    every image (as a position embedding does) changes nothing once the mean has seen it."""
    torch.manual_seed(0)
    t = MaskingNetwork(num_patches=6, embed_dim=4, hidden_dim=32, centre=True)
    x = torch.randn(5, 6, 4)
    shared = 10 * torch.randn(6, 4)
    t.track_input(x.mean(0))
    assert torch.equal(t.input_mean, x.mean(0))  # the first batch sets the mean
    plain = t(x)
    shifted = MaskingNetwork(num_patches=6, embed_dim=4, hidden_dim=32, centre=True)
    shifted.load_state_dict(t.state_dict())
    shifted.input_mean.zero_()
    shifted.input_count.zero_()
    shifted.track_input((x + shared).mean(0))
    assert torch.allclose(shifted(x + shared), plain, atol=1e-6)
    # A plain average of the first batches, then an exponential one with momentum 0.1.
    before = t.input_mean.clone()
    t.track_input(torch.ones(6, 4))
    assert torch.allclose(t.input_mean, (before + 1) / 2)
    for _ in range(20):
        t.track_input(torch.zeros(6, 4))
    before = t.input_mean.clone()
    t.track_input(torch.ones(6, 4))
    assert torch.allclose(t.input_mean, 0.9 * before + 0.1)
    assert int(t.input_count) == 23
    plain_net = MaskingNetwork(num_patches=6, embed_dim=4, hidden_dim=32)
    assert "input_mean" not in plain_net.state_dict()
