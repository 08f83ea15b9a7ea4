"""A prepared data set on disk: ``manifest.json`` plus one folder of Parquet shards per split.

The manifest is the contract between ``mlo-mae prepare`` and training: class
names, counts, the split rule and seed, shard files with row counts and
checksums, every skipped input with its reason, and the D_tr pixel statistics
used for normalisation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlo_mae.errors import InputError

FORMAT = "mlo-mae/parquet-v1"
MANIFEST = "manifest.json"


class DatasetError(InputError):
    """A prepared folder that cannot be used; the message is one line for the user."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    manifest: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    def count(self, split: str) -> int:
        return int(self.manifest["counts"][split]["total"])

    def files(self, split: str) -> list[str]:
        return [str(self.root / s["file"]) for s in self.manifest["shards"] if s["split"] == split]

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["image_stats"]["train_channel_mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["image_stats"]["train_channel_std"])

    @property
    def hflip_preserves_label(self) -> bool:
        return bool(self.manifest["source"].get("hflip_preserves_label", True))

    def verify(self) -> None:
        """Every shard present with its recorded checksum (reads every byte: slow on big sets)."""
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            if sha256_file(path) != shard["sha256"]:
                raise DatasetError(f"'{path}' does not match its checksum in {self.root / MANIFEST}")


def load_prepared(path: Path | str) -> PreparedDataset:
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(f"'{root}' is not a prepared data set (no {MANIFEST}); "
                           f"run 'mlo-mae prepare SOURCE {root}' first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"'{manifest_path}' is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"'{manifest_path}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for shard in manifest["shards"]:
        if not (root / shard["file"]).is_file():
            raise DatasetError(f"'{root}': shard {shard['file']} listed in {MANIFEST} is missing")
    for split in ("train", "val"):
        if manifest["counts"][split]["total"] == 0:
            raise DatasetError(f"'{root}': the {split} split is empty")
    return PreparedDataset(root, manifest)
