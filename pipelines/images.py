"""Check one encoded image and bring it to 8-bit RGB, keeping the original bytes when they already are.

Every input ends in one of three states: ``kept`` (bytes stored unchanged),
``converted`` (decoded, turned into 8-bit RGB and stored as PNG, lossless) or
``skipped`` with a reason. Size is never changed here: resizing belongs to the
training-time transforms.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats whose bytes the training-time decoder reads directly.
KEPT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True, slots=True)  # slots: prepare keeps one per input file until the split is decided
class Inspection:
    """What became of one input. ``payload`` is None unless the image was converted."""

    status: str  # kept | converted | skipped
    reason: str = ""  # why it was converted or skipped
    digest: str = ""  # sha256 of the stored bytes' source, for duplicate detection
    width: int = 0
    height: int = 0
    format: str = ""
    channel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # of the RGB image, in [0, 1]
    channel_sq_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    nbytes: int = 0  # size of what will be stored
    payload: bytes | None = None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """8-bit RGB pixels for any PIL mode, scaling 16/32-bit depths instead of clipping them."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raw = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or raw.max(initial=0) > 255 else 255.0
        grey = np.clip(raw / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):  # composite on white: transparent pixels are background
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_LEVELS = np.arange(256, dtype=np.float64)


def _statistics(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and mean square in [0, 1], from exact 256-bin histograms (8x faster than
    summing the image as floats, which was most of ``prepare``'s time on photographs)."""
    n = pixels.shape[0] * pixels.shape[1]
    counts = [np.bincount(pixels[..., c].ravel(), minlength=256) for c in range(3)]
    return (tuple(float(h @ _LEVELS) / 255.0 / n for h in counts),
            tuple(float(h @ (_LEVELS * _LEVELS)) / 65025.0 / n for h in counts))


def inspect_pixels(pixels: np.ndarray) -> Inspection:
    """An in-memory (H, W, 3) uint8 image (CIFAR, digits): always stored as PNG."""
    payload = encode_png(pixels)
    mean, sq = _statistics(pixels)
    return Inspection("converted", "raw pixels", hashlib.sha256(pixels.tobytes()).hexdigest(),
                      pixels.shape[1], pixels.shape[0], "PNG", mean, sq, len(payload), payload)


def inspect_bytes(data: bytes) -> Inspection:
    """Decode fully (truncation shows only then), classify, and convert when the mode is not RGB."""
    if not data:
        return Inspection("skipped", "empty file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                mode = img.mode
                img.load()
                pixels = _to_rgb_array(img)
    except UnidentifiedImageError:
        return Inspection("skipped", "not an image", digest)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Inspection("skipped", "too many pixels (decompression-bomb limit)", digest)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return Inspection("skipped", f"corrupt or truncated ({' '.join(str(err).split())[:80]})", digest)
    height, width = pixels.shape[:2]
    mean, sq = _statistics(pixels)
    if mode == "RGB" and fmt in KEPT_FORMATS and not getattr(img, "is_animated", False):
        return Inspection("kept", "", digest, width, height, fmt, mean, sq, len(data))
    reason = f"mode {mode} -> RGB" if mode != "RGB" else f"format {fmt or '?'} -> PNG"
    payload = encode_png(pixels)
    return Inspection("converted", reason, digest, width, height, "PNG", mean, sq, len(payload), payload)
