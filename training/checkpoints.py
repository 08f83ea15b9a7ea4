"""Checkpoint folders of a run: what rank 0 writes, and how a (re)started run finds the latest one.

A folder holds ``state.pt`` (the engine's full state and the data position)
and ``meta.json`` (iteration and the byte size of ``state.pt``, to tell a
complete copy from a torn one). Ray Train hands the latest *registered*
checkpoint to ``get_checkpoint()``; a run stopped right after a checkpoint was
written but before Ray registered it would lose that one, so the run folder is
also scanned and the newest complete checkpoint wins.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pyarrow.fs
import torch

from mlo_mae.checkpoint import save_atomic

from .storage import filesystem

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def write(folder: str, state: dict[str, Any]) -> None:
    """``state.pt`` then ``meta.json`` into a local folder that Ray Train will upload."""
    path = save_atomic(state, os.path.join(folder, STATE_FILE))
    meta = {"iteration": state["engine"]["iteration"], "state_bytes": path.stat().st_size}
    with open(os.path.join(folder, META_FILE), "w") as handle:
        json.dump(meta, handle)


def _complete_iteration(fs: pyarrow.fs.FileSystem, folder: str) -> int | None:
    """The checkpoint's iteration if both files are there and ``state.pt`` has its full size."""
    state, meta_path = fs.get_file_info([f"{folder}/{STATE_FILE}", f"{folder}/{META_FILE}"])
    if state.type != pyarrow.fs.FileType.File or meta_path.type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(meta_path.path) as handle:
        try:
            meta = json.loads(handle.read().decode())
        except ValueError:
            return None
    return int(meta["iteration"]) if meta.get("state_bytes") == state.size else None


def complete_in(run_dir: str) -> list[tuple[int, str]]:
    """(iteration, folder) of every complete checkpoint folder in ``run_dir``, oldest first."""
    fs, root = filesystem(run_dir)
    found = []
    for entry in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
            iteration = _complete_iteration(fs, entry.path)
            if iteration is not None:
                found.append((iteration, entry.path if "://" not in run_dir else f"{run_dir}/{entry.base_name}"))
    return sorted(found)


def is_complete(folder: str) -> bool:
    fs, path = filesystem(folder)
    return _complete_iteration(fs, path) is not None


def latest(run_dir: str):
    """The newest complete checkpoint: Ray Train's own, or a newer complete one in ``run_dir``."""
    import ray.train

    found = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        iteration = _complete_iteration(registered.filesystem, registered.path)
        if iteration is not None:
            found.append((iteration, registered))
    fs, _ = filesystem(run_dir)
    for iteration, folder in complete_in(run_dir):
        found.append((iteration, ray.train.Checkpoint(filesystem(folder)[1], filesystem=fs)))
    return max(found, key=lambda item: item[0])[1] if found else None


def read_state(folder: str) -> dict[str, Any]:
    """The state saved in a checkpoint folder (local path or URI), plain tensors only (``weights_only``)."""
    return _read_state(*filesystem(folder))


def load(checkpoint) -> dict[str, Any]:
    """The state of a ``ray.train.Checkpoint``."""
    return _read_state(checkpoint.filesystem, checkpoint.path)


def _read_state(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
