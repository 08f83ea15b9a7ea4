"""Eval mode for the length of a block, and each submodule's own train/eval mode back afterwards.

``module.train(was_training)`` would restore one flag and overwrite every
submodule with it; a model whose parts were deliberately in different modes
(a frozen BatchNorm in eval inside a training model) must get exactly its own
modes back, also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block; ``None`` entries (an optional
    module that is absent) are skipped."""
    saved = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    for m, _ in saved:
        m.training = False
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode
