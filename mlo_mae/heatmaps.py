"""What the masking network T learned, drawn as images a researcher reads at a glance.

A :class:`MaskSnapshot` records what T does on a fixed validation sample at one
training step (T's scores p, the hard mask training would use, labels and the
pictures); the ``render_*`` functions turn one snapshot (or a series) into RGB
PIL images of fixed pixel sizes, so that images logged at different steps line
up in a viewer (e.g. MLflow's image comparison) and every colour scale is 0..1.

Matplotlib is used through its object API only (``Figure`` + ``FigureCanvasAgg``):
nothing global (pyplot state, the backend, rcParams) is changed.

Every rendered image carries, in ``image.info["axes_px"]``, the pixel box
``(left, top, right, bottom)`` of each heatmap axes, so that a test (or a
script) can read a cell's colour back from the pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from .mae import MaskedAutoencoderViT
from .config import MLOConfig
from .masking import Mask, masks_for, rule_scores
from .modes import eval_mode

DPI = 100
MEAN_SIZE = (900, 420)  # render_mean and each render_evolution frame, (width, height) pixels
PANEL_SIZE = (760, 800)  # render_panel: nearly square, legible in a 256-pixel thumbnail
PANEL_ROWS = 2  # rows of (masked, score) image pairs in render_panel
CLASSES_SIZE = (900, 460)  # render_classes
STRIP_SIZE = (1200, 180)  # render_evolution's strip
PROB_CMAP = "magma"  # T's score p (the k highest of an image are masked)
FREQ_CMAP = "viridis"  # how often a patch is masked
MASK_TINT = (0.25, 0.5, 0.9)  # render_panel's masked patches
STRIP_MAX = 12  # most snapshots shown in the evolution strip
_NORM = Normalize(vmin=0.0, vmax=1.0)  # every colour scale is fixed, so steps compare


@dataclass
class MaskSnapshot:
    """What T does on a fixed D_val sample at one step (CPU tensors)."""

    step: int
    grid: tuple[int, int]  # patch grid (rows, cols)
    probs: torch.Tensor  # (B, N) float32 T's score p per patch (the k highest of an image are masked)
    masks: torch.Tensor  # (B, N) float32 0/1, the patches training would mask
    labels: torch.Tensor  # (B,) int64
    images: torch.Tensor  # (B, H, W, 3) uint8 for display (already de-normalised by the caller)
    baseline: bool
    sample_size: int | None = None  # images summarised when probs/masks hold a mean row (saved history)
    label: str | None = None  # what chose the masks, where neither T nor random masks did (a baseline rule)

    def __post_init__(self) -> None:
        """Catch shape mix-ups here rather than as a confusing picture later."""
        rows, cols = self.grid
        b = self.probs.shape[0]
        if self.probs.shape != (b, rows * cols) or self.masks.shape != self.probs.shape:
            raise ValueError(f"probs {tuple(self.probs.shape)} and masks {tuple(self.masks.shape)} "
                             f"must both be (B, {rows * cols}) for grid {self.grid}")
        if self.labels.shape != (b,):
            raise ValueError(f"labels {tuple(self.labels.shape)} must be ({b},)")
        if self.images.dim() != 4 or self.images.shape[0] != b or self.images.shape[-1] != 3:
            raise ValueError(f"images {tuple(self.images.shape)} must be ({b}, H, W, 3)")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, not {self.images.dtype}")

    @property
    def image_count(self) -> int:
        """How many images the maps are over, as the titles say it."""
        return self.sample_size if self.sample_size is not None else self.probs.shape[0]

    @property
    def mode(self) -> str:
        """Which method produced the masks, as the figure titles say it."""
        return self.label or ("baseline MAE" if self.baseline else "MLO-MAE")

    @property
    def score_name(self) -> str:
        """What the score maps show: T's score p, or a pixel rule's rank (its masked patches rank highest)."""
        return "rank by the rule" if self.label else "T's score p"

    def mean_map(self) -> np.ndarray:
        """(rows, cols) mean score p over the sample: which patches T ranks high on average."""
        return self.probs.double().mean(0).reshape(self.grid).numpy()

    def mask_frequency(self) -> np.ndarray:
        """(rows, cols) fraction of images in which the patch is masked: what training actually hides."""
        return self.masks.double().mean(0).reshape(self.grid).numpy()

    def class_maps(self, max_classes: int = 10) -> dict[int, np.ndarray]:
        """Per-class mean score p for the first ``max_classes`` class ids present (sorted):
        whether T masks differently for different content."""
        ids = sorted(set(self.labels.tolist()))[:max_classes]
        return {c: self.probs[self.labels == c].double().mean(0).reshape(self.grid).numpy() for c in ids}


@torch.no_grad()
def snapshot(mae: MaskedAutoencoderViT, masknet: nn.Module | None, images: torch.Tensor, labels: torch.Tensor,
             display: torch.Tensor, mask_ratio: float, baseline: bool, step: int, seed: int = 0,
             mlo: MLOConfig | None = None, learned_fraction: float = 1.0) -> MaskSnapshot:
    """Record what T (or a baseline's rule) does on a fixed batch at ``step``.

    images: normalised model input (B,C,H,W) on the model's device; display: (B,H,W,3) uint8.
    The masks are those training would use (``masking.masks_for`` with ``mlo``, by default the paper's
    top-k of T's scores, or uniformly random masks in baseline mode); random parts come from a
    generator seeded with ``seed`` (the global RNG is untouched). Without T the scores shown are the
    rule's (``masking.rule_scores``: k/N everywhere for random masks). Modules run in eval mode and
    get their previous train/eval modes back.
    """
    mlo = mlo if mlo is not None else MLOConfig(baseline=baseline, mask_ratio=mask_ratio)
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(mae, masknet):
        probs, mask = masks_for(mae, masknet, images, mlo, learned_fraction, generator)
    return record(mae, step, probs, mask, mlo, labels, display)


def record(mae: MaskedAutoencoderViT, step: int, probs: torch.Tensor | None, mask: Mask, mlo: MLOConfig,
           labels: torch.Tensor, display: torch.Tensor) -> MaskSnapshot:
    """The snapshot of masks chosen by ``masking.masks_for`` under ``mlo``: T's scores p, or without T
    the rule's (``masking.rule_scores``: k/N everywhere for random masks)."""
    grid = (int(mae.patch_embed.grid_size[0]), int(mae.patch_embed.grid_size[1]))
    scores = probs if probs is not None else rule_scores(mask, mlo.baseline_rule)
    label = f"{mlo.baseline_rule} masks" if mlo.baseline and mlo.baseline_rule != "random" else None
    return MaskSnapshot(step=int(step), grid=grid, probs=scores.detach().float().cpu(),
                        masks=mask.mask.detach().float().cpu(), labels=labels.detach().to(torch.int64).cpu(),
                        images=display.detach().cpu(), baseline=bool(mlo.baseline), label=label)


# ----------------------------------------------------------------------------- drawing helpers

def _figure(size: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig: Figure, size: tuple[int, int], axes: dict[str, Axes | list[Axes]],
              keep: bool = False) -> Image.Image:
    """Draw, copy the RGBA buffer to an RGB image and record each named axes' pixel box;
    the figure is cleared (its memory freed) unless ``keep``."""
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    if image.size != size:  # a fixed size is the point; never hand back anything else
        image = image.resize(size, Image.Resampling.LANCZOS)
    height = rgba.shape[0]

    def box(ax: Axes) -> tuple[int, int, int, int]:
        e = ax.get_window_extent()
        return (round(e.x0), round(height - e.y1), round(e.x1), round(height - e.y0))

    image.info["title"] = fig.get_suptitle()  # what the figure says, for a test to read back
    image.info["axes_px"] = {name: [box(a) for a in v] if isinstance(v, list) else box(v)
                             for name, v in axes.items()}
    if not keep:
        fig.clear()
    return image


def _heatmap(ax: Axes, values: np.ndarray, cmap: str, ticks: bool = True):
    """One pixel per patch, nearest interpolation, faint patch boundaries."""
    rows, cols = values.shape
    im = ax.imshow(values, cmap=cmap, norm=_NORM, interpolation="nearest")
    # Patch boundaries as two line collections (minor-tick grid lines cost far more to lay out).
    style = {"colors": "white", "alpha": 0.3, "linewidth": 0.5}
    ax.vlines(np.arange(0.5, cols - 1, 1), -0.5, rows - 0.5, **style)
    ax.hlines(np.arange(0.5, rows - 1, 1), -0.5, cols - 0.5, **style)
    if ticks:
        ax.set_xticks(range(0, cols, max(1, math.ceil(cols / 7))))
        ax.set_yticks(range(0, rows, max(1, math.ceil(rows / 7))))
        ax.tick_params(which="major", labelsize=8, length=2)
    else:
        ax.tick_params(which="major", bottom=False, left=False, labelbottom=False, labelleft=False)
    return im


def _colorbar(fig: Figure, axes, cmap: str, label: str) -> None:
    cb = fig.colorbar(ScalarMappable(norm=_NORM, cmap=cmap), ax=axes, fraction=0.05, pad=0.02, aspect=25)
    cb.set_label(label, fontsize=9)
    cb.ax.tick_params(labelsize=8)


def _upscaled(image: np.ndarray, target: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor, so tiny images keep hard patch edges."""
    f = max(1, math.ceil(target / max(image.shape[:2])))
    return image.repeat(f, axis=0).repeat(f, axis=1) if f > 1 else image


def _short(name: str, limit: int = 12) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _class_name(c: int, class_names: list[str] | None) -> str:
    return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)


def _masked_count(snap: MaskSnapshot) -> str:
    n = snap.grid[0] * snap.grid[1]
    k = snap.masks.double().sum(1).mean().item() if snap.masks.shape[0] else 0.0
    return f"{k:.0f}/{n}" if abs(k - round(k)) < 1e-6 else f"{k:.1f}/{n}"


def _mean_title(snap: MaskSnapshot) -> str:
    return (f"{snap.mode} · step {snap.step}   ({snap.image_count} images, "
            f"{_masked_count(snap)} patches masked each)")


class _Figure:
    """A figure built for one snapshot plus how to show another snapshot on it (``update``), so that
    later snapshots reuse its axes and the layout constrained layout found once."""

    def __init__(self, fig: Figure, size: tuple[int, int], axes: dict[str, Axes | list[Axes]],
                 update: Callable[[MaskSnapshot], None]) -> None:
        self.fig, self.size, self.axes, self.update = fig, size, axes, update

    def image(self, keep: bool = False) -> Image.Image:
        return _to_image(self.fig, self.size, self.axes, keep=keep)


def _mean_figure(snap: MaskSnapshot) -> _Figure:
    """``render_mean``'s figure: the mean score map beside the mask frequency."""
    fig = _figure(MEAN_SIZE)
    ax_p, ax_f = fig.subplots(1, 2)
    im_p = _heatmap(ax_p, snap.mean_map(), PROB_CMAP)
    ax_p.set_title(f"{snap.score_name}, mean over images", fontsize=10)
    _colorbar(fig, ax_p, PROB_CMAP, "score p")
    im_f = _heatmap(ax_f, snap.mask_frequency(), FREQ_CMAP)
    ax_f.set_title("how often masked (the k highest p)", fontsize=10)
    _colorbar(fig, ax_f, FREQ_CMAP, "fraction of images")
    for ax in (ax_p, ax_f):
        ax.set_xlabel("patch column", fontsize=9)
        ax.set_ylabel("patch row", fontsize=9)
    title = fig.suptitle(_mean_title(snap), fontsize=11)

    def update(s: MaskSnapshot) -> None:
        im_p.set_data(s.mean_map())
        im_f.set_data(s.mask_frequency())
        title.set_text(_mean_title(s))

    return _Figure(fig, MEAN_SIZE, {"mean": ax_p, "frequency": ax_f}, update)


def _panel_title(snap: MaskSnapshot) -> str:
    return (f"{snap.mode} · step {snap.step}\nblue: the {_masked_count(snap)} patches masked "
            f"(each image's highest scores); colour below: {snap.score_name}")


def _panel_figure(snap: MaskSnapshot, count: int, class_names: list[str] | None) -> _Figure:
    """``render_panel``'s figure: (masked, score) pairs of the first ``count`` images."""
    rows, cols = snap.grid
    shown = max(0, min(count, snap.probs.shape[0]))
    fig = _figure(PANEL_SIZE)
    title = fig.suptitle(_panel_title(snap), fontsize=11)
    if shown == 0:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
        return _Figure(fig, PANEL_SIZE, {}, lambda s: title.set_text(_panel_title(s)))
    # Always room for ``count`` images (spares left blank) so that every panel has the same layout.
    per_row = math.ceil(max(count, shown) / PANEL_ROWS)
    grid_axes = np.asarray(fig.subplots(2 * PANEL_ROWS, per_row, squeeze=False))
    masked = [grid_axes[2 * (i // per_row), i % per_row] for i in range(shown)]
    scored = [grid_axes[2 * (i // per_row) + 1, i % per_row] for i in range(shown)]
    for ax in set(grid_axes.ravel()) - set(masked) - set(scored):
        ax.set_axis_off()
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)  # pixels and patch grid cover the same square
    cmap = colormaps[PROB_CMAP]

    def layers(s: MaskSnapshot, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image i's picture, its blue masked-patch shade and its coloured scores."""
        shade = np.zeros((rows, cols, 4))
        shade[..., :3] = MASK_TINT  # a colour, not a dark grey: masked background must show on black digits too
        shade[..., 3] = 0.75 * s.masks[i].reshape(rows, cols).numpy()
        return _upscaled(s.images[i].numpy()), shade, cmap(_NORM(s.probs[i].reshape(rows, cols).numpy()))

    artists = []
    for i, (top, bottom) in enumerate(zip(masked, scored, strict=True)):
        picture, shade, scores = layers(snap, i)
        artists.append((top.imshow(picture, extent=extent, interpolation="antialiased"),
                        top.imshow(shade, extent=extent, interpolation="nearest"),
                        bottom.imshow(picture, extent=extent, interpolation="antialiased"),
                        bottom.imshow(scores, extent=extent, interpolation="nearest", alpha=0.6)))
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        bottom.set_xlabel(_short(_class_name(int(snap.labels[i]), class_names)), fontsize=9)
    for r in range(0, min(2 * PANEL_ROWS, 2 * math.ceil(shown / per_row)), 2):
        grid_axes[r, 0].set_ylabel("masked", fontsize=9)
        grid_axes[r + 1, 0].set_ylabel("score p", fontsize=9)
    _colorbar(fig, grid_axes.ravel().tolist(), PROB_CMAP, f"{snap.score_name} (masked: the k highest)")

    def update(s: MaskSnapshot) -> None:
        title.set_text(_panel_title(s))
        for i, (bottom, images) in enumerate(zip(scored, artists, strict=True)):
            picture, shade, scores = layers(s, i)
            for artist, data in zip(images, (picture, shade, picture, scores), strict=True):
                artist.set_data(data)
            bottom.set_xlabel(_short(_class_name(int(s.labels[i]), class_names)), fontsize=9)

    return _Figure(fig, PANEL_SIZE, {"masked": masked, "probability": scored}, update)


def _classes_title(snap: MaskSnapshot) -> str:
    return (f"{snap.mode} · step {snap.step}: {snap.score_name}, mean per class (the k highest of an image "
            "are masked)")


def _classes_figure(snap: MaskSnapshot, class_names: list[str] | None, max_classes: int) -> _Figure:
    """``render_classes``'s figure: one mean score map per class present (the first ``max_classes``)."""
    maps = snap.class_maps(max_classes)
    fig = _figure(CLASSES_SIZE)
    title = fig.suptitle(_classes_title(snap), fontsize=11)
    if not maps:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
        return _Figure(fig, CLASSES_SIZE, {"classes": []}, lambda s: title.set_text(_classes_title(s)))
    # A fixed grid for ``max_classes`` maps (spares left blank): the maps keep one size whatever the count.
    ncols = min(5, max(max_classes, len(maps)))
    nrows = math.ceil(max(max_classes, len(maps)) / ncols)
    grid = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    used, images = [], []
    for ax, values in zip(grid, maps.values(), strict=False):  # spare axes stay empty
        images.append(_heatmap(ax, values, PROB_CMAP, ticks=False))
        used.append(ax)
    for ax in grid[len(maps):]:
        ax.set_axis_off()
    _colorbar(fig, grid.tolist(), PROB_CMAP, "score p")

    def update(s: MaskSnapshot) -> None:
        title.set_text(_classes_title(s))
        for ax, image, (c, values) in zip(used, images, s.class_maps(max_classes).items(), strict=True):
            image.set_data(values)
            ax.set_title(f"{_short(_class_name(c, class_names))} (n={int((s.labels == c).sum())})", fontsize=9)

    update(snap)
    return _Figure(fig, CLASSES_SIZE, {"classes": used}, update)


# ----------------------------------------------------------------------------- public renders

def render_mean(snap: MaskSnapshot) -> Image.Image:
    """Where T masks: the mean score map beside how often each patch is actually masked.

    Both on a fixed 0..1 scale so that images from different steps compare. ``MEAN_SIZE`` pixels;
    ``info["axes_px"]`` holds the boxes of the "mean" and "frequency" heatmaps.
    """
    return _mean_figure(snap).image()


def render_panel(snap: MaskSnapshot, count: int = 8, class_names: list[str] | None = None) -> Image.Image:
    """Individual images: the patches actually masked tinted blue, and under each image T's score p.

    Shows whether T follows the content (objects, edges) rather than a fixed position, and that the
    masked set is each image's k highest scores, not the patches whose p is near 1. The images sit
    in ``PANEL_ROWS`` rows of (masked, score) pairs so that the figure is nearly square: MLflow's
    image cards show a 256-pixel thumbnail, where a single long row would be a sliver.
    At most ``count`` images; ``PANEL_SIZE`` pixels; ``info["axes_px"]`` holds the "masked" and
    "probability" axes (lists of boxes, one per image).
    """
    return _panel_figure(snap, count, class_names).image()


def render_classes(snap: MaskSnapshot, class_names: list[str] | None = None, max_classes: int = 10) -> Image.Image:
    """Mean score map per class (the first ``max_classes`` present): does T mask by content?

    ``CLASSES_SIZE`` pixels; ``info["axes_px"]["classes"]`` lists one box per class, in class order.
    """
    return _classes_figure(snap, class_names, max_classes).image()


class HeatmapRenderer:
    """``render_mean``, ``render_panel`` and ``render_classes`` of a run's successive snapshots, each
    kind drawn on one figure laid out once: a training run evaluates the same sample again and again,
    and redrawing new data on laid-out axes is several times faster than building the figure anew
    (constrained layout and axes creation are most of the cost). Images are the same as the
    functions' and keep their axes in place from step to step. A snapshot whose layout differs
    (another grid, image count, class set or mode) gets a new figure.
    """

    def __init__(self, count: int = 8, class_names: list[str] | None = None, max_classes: int = 10) -> None:
        self.count, self.class_names, self.max_classes = count, class_names, max_classes
        self._figures: dict[str, tuple[tuple, _Figure]] = {}

    def render(self, snap: MaskSnapshot) -> dict[str, Image.Image]:
        """{"mean", "panel", "classes"}: the three figures of ``snap``."""
        shown = min(self.count, snap.probs.shape[0])
        classes = tuple(snap.class_maps(self.max_classes))
        builders = {"mean": ((), lambda: _mean_figure(snap)),
                    "panel": ((shown, tuple(snap.images.shape[1:])),
                              lambda: _panel_figure(snap, self.count, self.class_names)),
                    "classes": ((classes,), lambda: _classes_figure(snap, self.class_names, self.max_classes))}
        return {kind: self._draw(kind, (snap.grid, snap.mode, *key), build, snap)
                for kind, (key, build) in builders.items()}

    def _draw(self, kind: str, key: tuple, build: Callable[[], _Figure], snap: MaskSnapshot) -> Image.Image:
        cached = self._figures.get(kind)
        if cached is not None and cached[0] == key:
            cached[1].update(snap)
            return cached[1].image(keep=True)
        if cached is not None:
            cached[1].fig.clear()
        figure = build()
        image = figure.image(keep=True)
        figure.fig.set_layout_engine("none")  # freeze the positions constrained layout found
        self._figures[kind] = (key, figure)
        return image

    def close(self) -> None:
        """Free the figures' memory."""
        for _, figure in self._figures.values():
            figure.fig.clear()
        self._figures.clear()


def strip_indices(count: int, max_shown: int = STRIP_MAX) -> list[int]:
    """At most ``max_shown`` indices into ``count`` snapshots, evenly spaced, first and last always in."""
    if count <= max_shown:
        return list(range(count))
    if max_shown == 1:
        return [count - 1]
    # floor(x + 0.5) is monotone with step >= 1 here, so the picks are distinct.
    return [math.floor(i * (count - 1) / (max_shown - 1) + 0.5) for i in range(max_shown)]


def _mean_frames(snaps: list[MaskSnapshot]) -> list[Image.Image]:
    """``render_mean`` of each snapshot, from one figure laid out once: the frames of an animation
    keep every axes in place (no jitter), and redrawing is several times faster than rebuilding."""
    grids = {s.grid for s in snaps}
    if len(grids) > 1:
        raise ValueError(f"snapshots of different patch grids {sorted(grids)} cannot share an animation")
    renderer = HeatmapRenderer()
    frames = [renderer._draw("mean", (), lambda s=s: _mean_figure(s), s) for s in snaps]
    renderer.close()
    return frames


def render_evolution(snaps: list[MaskSnapshot]) -> tuple[list[Image.Image], Image.Image]:
    """How the mean map changes over training: one ``render_mean`` frame per snapshot (for a GIF) and a
    strip of at most ``STRIP_MAX`` mean maps side by side, labelled by step, on one 0..1 colour bar.

    The strip is ``STRIP_SIZE`` pixels; its ``info["steps"]`` lists the steps it shows and
    ``info["axes_px"]["maps"]`` their boxes.
    """
    frames = _mean_frames(snaps)
    picks = strip_indices(len(snaps))
    fig = _figure(STRIP_SIZE)
    mode, score = (snaps[0].mode, snaps[0].score_name) if snaps else ("MLO-MAE", "T's score p")
    fig.suptitle(f"{mode}: {score}, mean over the sample, over training", fontsize=11)
    if not picks:
        fig.text(0.5, 0.5, "no snapshots", ha="center", va="center")
        strip = _to_image(fig, STRIP_SIZE, {"maps": []})
    else:
        axes = np.asarray(fig.subplots(1, len(picks), squeeze=False)).ravel()
        for ax, i in zip(axes, picks, strict=True):
            _heatmap(ax, snaps[i].mean_map(), PROB_CMAP, ticks=False)
            ax.set_xlabel(f"step {snaps[i].step}", fontsize=8 if len(picks) > 8 else 9)
        _colorbar(fig, axes.tolist(), PROB_CMAP, "score p")
        strip = _to_image(fig, STRIP_SIZE, {"maps": list(axes)})
    strip.info["steps"] = [snaps[i].step for i in picks]
    return frames, strip


def save_gif(frames: list[Image.Image], path: str | os.PathLike, seconds_per_frame: float = 0.6) -> None:
    """Write an endlessly looping animated GIF. (Pillow merges identical consecutive frames into one.)"""
    if not frames:
        raise ValueError("no frames to save")
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, format="GIF", save_all=True, append_images=rest,
               duration=max(20, round(seconds_per_frame * 1000)), loop=0, disposal=1)
