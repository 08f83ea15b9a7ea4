"""The numbers that tell a learning masking network from a collapsed one, on hand-made masks."""

import math

import pytest
import torch

from mlo_mae.mask_metrics import (
    mean_entropy,
    mean_masked_prob,
    mean_pairwise_jaccard,
    random_jaccard,
    saturated_fraction,
)


def test_identical_masks_have_jaccard_one_and_disjoint_masks_zero():
    same = torch.tensor([[1, 1, 0, 0, 1]] * 4, dtype=torch.float32)
    assert mean_pairwise_jaccard(same) == 1.0
    disjoint = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)
    assert mean_pairwise_jaccard(disjoint) == 0.0


def test_jaccard_of_a_small_batch_by_hand():
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    # pairs (0,1): 1/3, (0,2): 1, (1,2): 1/3
    assert mean_pairwise_jaccard(masks) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="at least 2 masks"):
        mean_pairwise_jaccard(masks[:1])


def test_random_jaccard_is_the_hypergeometric_expectation():
    # 2 of 4: the intersection is 2 (1/6), 1 (4/6) or 0 (1/6) -> 1/6 + 4/6 * 1/3
    assert random_jaccard(4, 2) == pytest.approx(1 / 6 + 4 / 18)
    assert random_jaccard(10, 10) == 1.0
    gen = torch.Generator().manual_seed(0)
    order = torch.argsort(torch.rand(3000, 64, generator=gen), dim=1)
    masks = torch.zeros(3000, 64).scatter_(1, order[:, :48], 1.0)
    assert mean_pairwise_jaccard(masks) == pytest.approx(random_jaccard(64, 48), abs=2e-3)
    assert random_jaccard(64, 48) == pytest.approx(0.601, abs=1e-3)


def test_saturation_masked_probability_and_entropy():
    probs = torch.tensor([[0.001, 0.5, 0.995, 0.2], [0.3, 0.999, 0.4, 0.6]])
    masks = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.float32)
    assert saturated_fraction(probs) == 3 / 8
    assert mean_masked_prob(probs, masks) == pytest.approx((0.5 + 0.995 + 0.999 + 0.6) / 4)
    assert mean_entropy(torch.full((2, 3), 0.5)) == pytest.approx(math.log(2))
    assert mean_entropy(torch.tensor([[0.0, 1.0]])) < 1e-9


def test_object_patches_are_the_more_varied_half_and_the_masked_share_by_hand():
    from mlo_mae.mask_metrics import object_masked_share, object_patches

    stat = torch.tensor([[5.0, 0.0, 3.0, 0.1, 0.0, 7.0],   # objects: 0, 2, 5
                         [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # objects: 3, 4, 5
    objects = object_patches(stat)
    assert objects.tolist() == [[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]]
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0],   # 2 of 3 objects masked
                          [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # none
    assert object_masked_share(objects, masks) == pytest.approx(2 / 6)


def test_object_masked_share_of_masks_blind_to_content_is_k_over_n():
    from mlo_mae.mask_metrics import object_masked_share, object_patches
    from mlo_mae.masking import random_mask

    gen = torch.Generator().manual_seed(0)
    stat = torch.rand(3000, 16, generator=gen)
    share = object_masked_share(object_patches(stat, gen), random_mask(3000, 16, 0.75, torch.device("cpu"), gen).mask)
    assert share == pytest.approx(12 / 16, abs=0.01)


def test_weighted_error_by_hand():
    from mlo_mae.mask_metrics import weighted_error

    errors = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 8.0]])
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.5]])
    assert weighted_error(errors, weights) == pytest.approx(((2 + 9) / 4 + (1 + 4) / 1) / 2)
