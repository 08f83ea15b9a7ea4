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


# ----- selections of T's scores and rules without T -----

def test_gumbel_masks_exactly_k_and_follows_the_scores_in_proportion():
    """Gumbel-top-k draws k patches without replacement with chances proportional to p: a patch of
    score 0.9 is masked far more often than one of 0.1, and every patch sometimes."""
    from mlo_mae.masking import gumbel_top_k_mask

    probs = torch.tensor([[0.9, 0.9, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5]]).expand(4000, -1)
    m = gumbel_top_k_mask(probs, 0.25, torch.Generator().manual_seed(0))  # k = 2 of 8
    assert torch.equal(m.mask.sum(1), torch.full((4000,), 2.0))
    freq = m.mask.mean(0)
    assert freq[0] > freq[4] + 0.1 > freq[2] + 0.2 > 0.2  # ordered as p, and nothing is never masked
    # The first draw of Gumbel-top-k is categorical(p / sum p): P(patch 0 first) = 0.9 / 4
    again = gumbel_top_k_mask(probs, 1 / 8, torch.Generator().manual_seed(1))  # k = 1
    assert float(again.mask[:, 0].mean()) == pytest.approx(0.9 / 4.0, abs=0.02)


def test_mixed_masks_t_s_highest_share_and_random_others_weighted_one():
    from mlo_mae.masking import mixed_mask, stage1_weights

    torch.manual_seed(3)
    probs = torch.rand(500, 16)
    m = mixed_mask(probs, 0.75, 0.5, torch.Generator().manual_seed(0))  # k = 12, m = 6 learned
    assert torch.equal(m.mask.sum(1), torch.full((500,), 12.0))
    assert torch.equal(m.learned.sum(1), torch.full((500,), 6.0))
    top6 = torch.zeros_like(probs).scatter_(1, torch.topk(probs, 6).indices, 1.0)
    assert torch.equal(m.learned, top6)  # T's part: its 6 highest
    assert torch.all(m.mask >= m.learned)  # and they are masked
    rest = (m.mask - m.learned).bool()  # the random part is spread over the other 10, about 6/10 each
    others = ~top6.bool()
    assert float(rest[others].float().mean()) == pytest.approx(0.6, abs=0.03)
    w = stage1_weights(m.mask, probs, m.learned)
    assert torch.equal(w[m.learned.bool()], probs[m.learned.bool()])
    assert torch.all(w[rest] == 1.0) and torch.all(w[m.mask == 0] == 0.0)
    none = mixed_mask(probs, 0.75, 0.0, torch.Generator().manual_seed(0))  # the ramp's start: all random
    assert none.learned.sum() == 0 and torch.equal(none.mask.sum(1), torch.full((500,), 12.0))


@pytest.mark.parametrize("rule", ["object-first", "background-first"])
def test_pixel_rules_mask_exactly_k_patches_ranked_by_the_patch_spread(rule):
    from mlo_mae.masking import patch_statistic, rule_mask

    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(50, 16, 12, generator=gen) * torch.rand(50, 16, 1, generator=gen) * 3  # spreads differ
    stat = patch_statistic(patches)
    assert torch.allclose(stat, patches.std(-1, unbiased=False))
    m = rule_mask(stat, 0.25, rule, gen)  # k = 4
    assert torch.equal(m.mask.sum(1), torch.full((50,), 4.0))
    chosen = torch.topk(stat if rule == "object-first" else -stat, 4).indices
    assert torch.equal(m.mask, torch.zeros(50, 16).scatter_(1, chosen, 1.0))


def test_pixel_rule_breaks_ties_at_random():
    from mlo_mae.masking import rule_mask

    stat = torch.zeros(2000, 8)
    stat[:, :2] = 1.0  # two textured patches; six blank ones tie
    m = rule_mask(stat, 0.5, "background-first", torch.Generator().manual_seed(0))  # k = 4 of the 6 blank
    assert torch.all(m.mask[:, :2] == 0)
    freq = m.mask[:, 2:].mean(0)
    assert torch.allclose(freq, torch.full((6,), 4 / 6), atol=0.04)  # no blank patch preferred
    object_first = rule_mask(stat, 0.5, "object-first", torch.Generator().manual_seed(0))
    assert torch.all(object_first.mask[:, :2] == 1)  # the two textured first, then 2 of the blank ones


def test_rule_scores_rank_the_masked_patches_highest():
    from mlo_mae.masking import rule_mask, rule_scores

    stat = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    m = rule_mask(stat, 0.5, "object-first")
    assert torch.allclose(rule_scores(m, "object-first"), torch.tensor([[0.0, 1.0, 1 / 3, 2 / 3]]))
    b = rule_mask(stat, 0.5, "background-first")
    assert torch.allclose(rule_scores(b, "background-first"), torch.tensor([[1.0, 0.0, 2 / 3, 1 / 3]]))
    assert torch.allclose(rule_scores(b, "random"), torch.full((1, 4), 0.5))


def test_weighted_loss_of_a_mixed_mask_by_hand():
    errors = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    learned = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # patch 1 chosen by T (weight p), 2 and 3 at random (1)
    probs = torch.tensor([[0.9, 0.5, 0.25, 0.1]])
    assert weighted_reconstruction_loss(errors, mask, probs, "sum", learned).item() == pytest.approx(
        (0.5 * 2.0 + 3.0 + 4.0) / 2.5)
    assert weighted_reconstruction_loss(errors, mask, probs, "count", learned).item() == pytest.approx(
        (0.5 * 2.0 + 3.0 + 4.0) / 3)
