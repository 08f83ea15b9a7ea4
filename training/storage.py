"""Where runs live: ``STORAGE/NAME/`` on a local disk, NFS or an object store (``s3://...``).

Ray Train writes its checkpoint folders there; ``mlo-mae-run.yaml`` beside them
keeps what ``--resume`` needs (config, data set, number of workers).
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs
import yaml

from pipelines.location import absolute, filesystem

RUN_FILE = "mlo-mae-run.yaml"


def storage_uri(path: str) -> str:
    """A local path made absolute (Ray needs that); URIs such as s3://... pass through."""
    return absolute(path)


def resume_hint(command: str, name: str, storage_path: str) -> str:
    """How to continue run or study ``name`` of ``mlo-mae COMMAND``: ``--storage-path`` only when it is not
    the default folder."""
    storage = f" --storage-path {storage_path}" if storage_uri(storage_path) != storage_uri("ray_results") else ""
    return f"continue with 'mlo-mae {command} --resume {name}'{storage}"


def read_run(storage_path: str, name: str, file: str = RUN_FILE) -> dict[str, Any] | None:
    """The saved settings of run (or study) ``name``, or None if there is no such run."""
    fs, root = filesystem(storage_uri(storage_path))
    path = f"{root}/{name}/{file}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as handle:
        return yaml.safe_load(handle.read().decode())


def write_run(storage_path: str, name: str, settings: dict[str, Any], file: str = RUN_FILE) -> None:
    fs, root = filesystem(storage_uri(storage_path))
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{file}") as handle:
        handle.write(yaml.safe_dump(settings, sort_keys=False).encode())
