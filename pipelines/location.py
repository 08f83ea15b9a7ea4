"""Where prepared data sets and runs live: a local path, or a URI (``s3://bucket/prefix``, ``gs://...``)
read and written through pyarrow's filesystems.

Object storage is configured as its tools expect: credentials and region from the
environment or ``~/.aws`` (``AWS_ACCESS_KEY_ID``, ...), and a non-AWS server (MinIO, a
local S3-API server) by ``AWS_ENDPOINT_URL``. A location that cannot be used is one
``LocationError`` line naming it, raised in seconds, never a hang.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from mlo_mae.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs

# pyarrow is imported only for URIs: a command refuses a wrong local path before anything heavy loads.

# What Ray's workers need to reach the same object store as the driver (forwarded to the job's processes).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_S3_ENDPOINT_URL")


_S3_FILESYSTEMS: dict[tuple, pyarrow.fs.FileSystem] = {}


class LocationError(InputError):
    """A location that cannot be used; the message is one line naming it."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


def absolute(location: str | os.PathLike) -> str:
    """A local path made absolute (Ray and the workers need that); a URI unchanged (a trailing / dropped)."""
    location = str(location)
    return location.rstrip("/") if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts]) if is_uri(location) else os.path.join(location, *parts)


def filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it (local without a scheme)."""
    import pyarrow.fs

    location = str(location)
    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), location
    scheme, _, rest = location.partition("://")
    bucket = rest.split("/", 1)[0]
    # One S3 filesystem per bucket and settings: from_uri builds a client and may ask the store for the
    # bucket's region, which every chunk read would repeat. Keyed by the settings too, so a changed key or
    # endpoint is never served by an old client.
    key = (bucket, tuple(os.environ.get(name) for name in STORAGE_ENV)) \
        if scheme == "s3" and not set("?%") & set(rest) else None  # pyarrow rewrites those: no cached answer
    if key in _S3_FILESYSTEMS:
        return _S3_FILESYSTEMS[key], rest.rstrip("/")
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
    except (OSError, ValueError) as err:  # ArrowInvalid (a ValueError): an unknown scheme or a bad URI
        raise LocationError(f"'{location}': {short_reason(err)}") from None
    if key is not None and path == rest.rstrip("/"):
        _S3_FILESYSTEMS[key] = fs
    return fs, path


def short_reason(err: BaseException) -> str:
    """pyarrow's and the AWS SDK's error text cut to what a user acts on."""
    text = " ".join(str(err).split())
    found = re.search(r"AWS Error (\w+)[^:]*:\s*(.*)", text)
    if found:
        text = f"{found.group(1)}: {found.group(2)}"
    return text[:240]


def check_reachable(location: str, what: str) -> None:
    """For an ``s3://`` URI: its bucket exists and answers with these credentials. One ``LocationError`` line naming
    ``what`` (a flag or argument) and the URI otherwise. Local paths are left to their own checks."""
    if not location.startswith("s3://"):  # other schemes (file://, gs://, ...) are left to their filesystems
        return
    import pyarrow.fs

    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise LocationError(f"{what} '{location}' cannot be reached ({short_reason(err)}); check "
                            "AWS_ENDPOINT_URL and the credentials") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise LocationError(f"{what} '{location}': bucket '{bucket}' does not exist")


def storage_env() -> dict[str, str]:
    """The object-store settings of this process that Ray's worker processes need too."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


def read_bytes(location: str) -> bytes | None:
    """The content of a file or object, None if there is none."""
    if not is_uri(location):
        try:
            with open(location, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as handle:
        return handle.read()


def missing(locations: list[str]) -> list[str]:
    """Those of ``locations`` (all local, or all URIs of one bucket) that are not files."""
    if not locations or not is_uri(locations[0]):
        return [p for p in locations if not os.path.isfile(p)]
    import pyarrow.fs

    fs, _ = filesystem(locations[0])  # one filesystem: from_uri may ask the store for the bucket's region
    infos = fs.get_file_info([p.split("://", 1)[1] for p in locations])
    return [p for p, info in zip(locations, infos, strict=True) if info.type != pyarrow.fs.FileType.File]
