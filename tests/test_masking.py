import pytest
import torch

from mlo_mae.masking import MaskingNetwork, num_masked, random_mask, top_k_mask, weighted_reconstruction_loss


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
