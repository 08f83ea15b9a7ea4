"""Data sets by the name a user gives: 'digits' (built in, prepared on first use) or a prepared folder.

``check_name`` only looks at the file system, so that a command can refuse a
wrong ``--dataset`` before it imports anything heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .manifest import MANIFEST, DatasetError, PreparedDataset, load_prepared

BUILT_IN = "digits"


def digits_cache() -> Path:
    """Where the built-in digits are prepared once: $MLO_MAE_DATA_DIR, else ~/.cache/mlo-mae."""
    root = os.environ.get("MLO_MAE_DATA_DIR") or Path.home() / ".cache" / "mlo-mae"
    return Path(root) / "digits-v1"


def check_name(name: str) -> None:
    """A ``DatasetError`` unless ``name`` is the built-in set or a folder with a manifest."""
    if name != BUILT_IN and not (Path(name) / MANIFEST).is_file():
        load_prepared(name)  # raises with the reason (no folder, no manifest)


def progress_bar(phase: str, total: int) -> Any:
    """A tqdm bar on stderr (off when stderr is not a terminal): how ``prepare`` shows its progress."""
    from tqdm import tqdm

    return tqdm(total=total, desc=phase, unit="img", file=sys.stderr, dynamic_ncols=True, disable=None,
                mininterval=0.5)


def open_dataset(name: str, log: Callable[[str], None] = print,
                 progress: Callable[[str, int], Any] = progress_bar) -> PreparedDataset:
    """The prepared data set ``name``; the built-in digits are prepared into ``digits_cache()`` the first
    time (``log`` and ``progress`` report it)."""
    if name != BUILT_IN:
        return load_prepared(name)
    path = digits_cache()
    if not (path / MANIFEST).is_file():
        from .prepare import prepare

        log(f"preparing the built-in digits in {path} (once)")
        path.parent.mkdir(parents=True, exist_ok=True)
        prepare(BUILT_IN, path, shard_rows=256, progress=progress, log=log)
    return load_prepared(path)


__all__ = ["BUILT_IN", "DatasetError", "check_name", "digits_cache", "open_dataset", "progress_bar"]
