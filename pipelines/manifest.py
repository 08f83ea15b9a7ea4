"""A prepared data set on disk: ``manifest.json`` plus one folder of Parquet shards per split.

The manifest is the contract between ``mlo-mae prepare`` and training: class
names, counts, the split rule and seed, shard files with row counts and
checksums, the skipped inputs counted by reason (the first few named; all of
them in ``skipped.jsonl`` beside it) and the D_tr pixel statistics used for
normalisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlo_mae.errors import InputError

from .location import LocationError, absolute, check_reachable, filesystem, join, missing, read_bytes, short_reason

FORMAT = "mlo-mae/parquet-v1"
MANIFEST = "manifest.json"


class DatasetError(InputError):
    """A prepared folder that cannot be used; the message is one line for the user."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The checksum of a local file or of an object (``s3://...``)."""
    fs, inner = filesystem(str(path))
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedDataset:
    """``root``: the folder's absolute path, or its URI (``s3://bucket/prefix``)."""

    root: str
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
        return [join(self.root, s["file"]) for s in self.manifest["shards"] if s["split"] == split]

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["image_stats"]["train_channel_mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["image_stats"]["train_channel_std"])

    @property
    def hflip_preserves_label(self) -> bool:
        return bool(self.manifest["source"].get("hflip_preserves_label", True))

    def skipped(self) -> list[dict[str, str]]:
        """Every input that was not stored, with its reason (the manifest itself lists only the first few)."""
        skipped = self.manifest["skipped"]
        if "all_in" not in skipped:  # prepared before the side file existed: all listed in the manifest
            return list(skipped.get("items", []))
        text = read_bytes(join(self.root, skipped["all_in"]))
        return [json.loads(line) for line in text.decode("utf-8").splitlines()] if text else []

    def verify(self) -> None:
        """Every shard present with its recorded checksum (reads every byte: slow on big sets)."""
        for shard in self.manifest["shards"]:
            path = join(self.root, shard["file"])
            if sha256_file(path) != shard["sha256"]:
                raise DatasetError(f"'{path}' does not match its checksum in {join(self.root, MANIFEST)}")


def load_prepared(path: Path | str) -> PreparedDataset:
    """The prepared data set in folder (or at URI) ``path``, checked: a manifest of this format, every
    shard it lists present, non-empty train and val splits."""
    root = absolute(path)
    try:
        check_reachable(root, "--dataset")
        text = read_bytes(join(root, MANIFEST))
        if text is None:
            raise DatasetError(f"'{path}' is not a prepared data set (no {MANIFEST}); "
                               f"run 'mlo-mae prepare SOURCE {path}' first")
        try:
            manifest = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"'{join(root, MANIFEST)}' is not valid JSON ({err})") from None
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"'{join(root, MANIFEST)}' has format {manifest.get('format')!r}, expected {FORMAT!r}")
        absent = missing([join(root, shard["file"]) for shard in manifest["shards"]])
        if absent:
            raise DatasetError(f"'{root}': shard {absent[0][len(root) + 1:]} listed in {MANIFEST} is missing")
    except OSError as err:  # object storage failing midway (the checks above name most causes)
        raise LocationError(f"--dataset '{root}' cannot be read ({short_reason(err)})") from None
    for split in ("train", "val"):
        if manifest["counts"][split]["total"] == 0:
            raise DatasetError(f"'{root}': the {split} split is empty")
    return PreparedDataset(root, manifest)
