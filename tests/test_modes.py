"""eval_mode: every submodule in eval inside the block, each one's own mode back afterwards."""

from __future__ import annotations

import pytest
from torch import nn

from mlo_mae.modes import eval_mode


def mixed() -> nn.Module:
    """A training model with a frozen (eval) BatchNorm and an eval sub-block holding a training leaf."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    model.train()
    model[1].eval()
    model[2].training = False  # a parent in eval, its first child still training
    return model


def modes(*modules: nn.Module) -> list[bool]:
    return [m.training for mod in modules for m in mod.modules()]


def test_nested_mixed_modes_are_restored_exactly():
    a, b = mixed(), mixed().eval()
    before = modes(a, b)
    assert len(set(before)) == 2  # really mixed
    with eval_mode(a, None, b):
        assert not any(modes(a, b))
    assert modes(a, b) == before


def test_modes_are_restored_when_the_body_raises():
    model = mixed()
    before = modes(model)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert modes(model) == before


def test_nesting_restores_the_outer_block_first_then_the_callers_modes():
    model = mixed()
    before = modes(model)
    with eval_mode(model):
        with eval_mode(model[2]):
            pass
        assert not any(modes(model))  # the inner block restores eval, not the caller's modes
    assert modes(model) == before


def test_only_none_is_a_no_op():
    with eval_mode(None):
        pass
