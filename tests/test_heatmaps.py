"""Heatmaps of the masking network: snapshots record what T does, and the rendered
pixels show it (the hottest patch is drawn hottest, at its place in the grid)."""

from __future__ import annotations

import io
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import torch
from conftest import tiny_model
from matplotlib import colormaps
from PIL import Image

from mlo_mae.factory import create_mae
from mlo_mae.heatmaps import (
    CLASSES_SIZE,
    FREQ_CMAP,
    MEAN_SIZE,
    PANEL_SIZE,
    PROB_CMAP,
    STRIP_SIZE,
    HeatmapRenderer,
    MaskSnapshot,
    render_classes,
    render_evolution,
    render_mean,
    render_panel,
    save_gif,
    snapshot,
    strip_indices,
)
from mlo_mae.masking import MaskingNetwork, num_masked

HOT_BRIGHT = (1, 2)  # the patch T masks in bright images
HOT_DARK = (3, 0)  # the patch T masks in dark images


def mae_with_grid(grid: int):
    """A real tiny MAE on (2*grid)-pixel images with patch 2: a grid x grid patch grid."""
    return create_mae(replace(tiny_model(), img_size=2 * grid))


def brightness_masknet(mae) -> MaskingNetwork:
    """A real MaskingNetwork with hand-set weights (and an MAE embedding made readable):
    token feature 0 is its patch's mean pixel, hidden unit 0 is the image's mean brightness
    (ReLU), unit 1 minus it; patch HOT_BRIGHT gets logit 3 in bright images, HOT_DARK logit 3
    in dark ones, every other patch logit -3."""
    n, d = mae.num_patches, mae.pos_embed.shape[-1]
    cols = mae.patch_embed.grid_size[1]
    with torch.no_grad():
        mae.patch_embed.proj.weight.zero_()
        mae.patch_embed.proj.weight[0] = 1.0 / mae.patch_embed.proj.weight[0].numel()
        mae.patch_embed.proj.bias.zero_()
        mae.pos_embed.zero_()
        t = MaskingNetwork(n, d, hidden_dim=4)
        for p in t.parameters():
            p.zero_()
        t.fc1.weight[0, 0::d] = 1.0 / n
        t.fc1.weight[1, 0::d] = -1.0 / n
        t.fc2.bias.fill_(-3.0)
        t.fc2.weight[HOT_BRIGHT[0] * cols + HOT_BRIGHT[1], 0] = 6.0
        t.fc2.weight[HOT_DARK[0] * cols + HOT_DARK[1], 1] = 6.0
    return t


def batch(labels: list[int], img: int = 8, bright: set[int] = frozenset({0})):
    """Images of brightness +1 (label in ``bright``) or -1, with a little noise; uint8 display copies."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.tensor([1.0 if y in bright else -1.0 for y in labels]).view(-1, 1, 1, 1)
    x = sign + 0.1 * torch.randn(len(labels), 3, img, img, generator=gen)
    display = ((x.clamp(-1.5, 1.5) + 1.5) * 85).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x, torch.tensor(labels), display


def decode(image: Image.Image, box, grid, cmap: str) -> np.ndarray:
    """Value of each patch read back from the pixels: the colour at the cell's centre (median of
    a 3x3 block) mapped to the nearest entry of the colour map, in 0..1."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    lut = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255
    left, top, right, bottom = box
    rows, cols = grid
    values = np.empty(grid)
    for r in range(rows):
        for c in range(cols):
            y = int(top + (r + 0.5) * (bottom - top) / rows)
            x = int(left + (c + 0.5) * (right - left) / cols)
            colour = np.median(pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3), axis=0)
            values[r, c] = np.argmin(((lut - colour) ** 2).sum(1)) / 255
    return values


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def png_round_trip(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def test_known_masking_network_gives_the_expected_hot_cells_in_data_and_pixels():
    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    x, y, display = batch([0, 0, 0, 1])  # three bright images, one dark
    snap = snapshot(mae, t, x, y, display, mask_ratio=1 / 16, baseline=False, step=7)  # k = 1
    # Independent reference: T's probability of each hot patch, from each image's mean pixel.
    brightness = x.double().mean(dim=(1, 2, 3)).numpy()
    p_bright, p_dark = _sigmoid(-3 + 6 * np.maximum(brightness, 0)), _sigmoid(-3 + 6 * np.maximum(-brightness, 0))
    assert snap.grid == (4, 4) and snap.step == 7 and not snap.baseline
    assert snap.probs.dtype == torch.float32 and snap.masks.dtype == torch.float32 and snap.labels.dtype == torch.int64

    mean = snap.mean_map()
    assert np.unravel_index(mean.argmax(), mean.shape) == HOT_BRIGHT
    assert mean[HOT_BRIGHT] == pytest.approx(p_bright.mean(), abs=1e-6)
    assert mean[HOT_DARK] == pytest.approx(p_dark.mean(), abs=1e-6)
    cold = np.ones((4, 4), bool)
    cold[HOT_BRIGHT] = cold[HOT_DARK] = False
    np.testing.assert_allclose(mean[cold], _sigmoid(-3.0), atol=1e-6)
    assert mean[HOT_BRIGHT] > 0.7 and mean[HOT_DARK] < 0.3
    freq = snap.mask_frequency()
    assert freq[HOT_BRIGHT] == 0.75 and freq[HOT_DARK] == 0.25 and freq.sum() == pytest.approx(1.0)
    bright_masks = snap.masks[:3].reshape(3, 4, 4)
    assert torch.all(bright_masks[:, HOT_BRIGHT[0], HOT_BRIGHT[1]] == 1)  # masked in every bright image
    assert snap.masks.sum(1).tolist() == [1.0] * 4
    maps = snap.class_maps()
    assert sorted(maps) == [0, 1]
    assert np.unravel_index(maps[0].argmax(), (4, 4)) == HOT_BRIGHT
    assert np.unravel_index(maps[1].argmax(), (4, 4)) == HOT_DARK
    np.testing.assert_allclose((3 * maps[0] + maps[1]) / 4, mean, atol=1e-6)

    # The rendered pixels say the same: decode each cell's colour back to a value.
    image = render_mean(snap)
    boxes = image.info["axes_px"]
    pixels = png_round_trip(image)
    shown = decode(pixels, boxes["mean"], snap.grid, PROB_CMAP)
    assert np.unravel_index(shown.argmax(), shown.shape) == HOT_BRIGHT
    np.testing.assert_allclose(shown, mean, atol=0.01)
    shown_freq = decode(pixels, boxes["frequency"], snap.grid, FREQ_CMAP)
    np.testing.assert_allclose(shown_freq, freq, atol=0.01)

    # And the per-class figure draws class 1's map with its hot cell elsewhere.
    classes = render_classes(snap)
    class_boxes = classes.info["axes_px"]["classes"]
    assert len(class_boxes) == 2
    for box, c in zip(class_boxes, (0, 1), strict=True):
        np.testing.assert_allclose(decode(classes, box, snap.grid, PROB_CMAP), maps[c], atol=0.01)


def test_panel_overlays_line_up_with_the_patch_grid():
    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    x, y, _ = batch([0, 1])
    display = torch.full((2, 8, 8, 3), 200, dtype=torch.uint8)  # light grey pictures, so shading shows
    snap = snapshot(mae, t, x, y, display, mask_ratio=1 / 16, baseline=False, step=0)
    image = render_panel(snap)
    boxes = image.info["axes_px"]
    assert len(boxes["masked"]) == len(boxes["probability"]) == 2
    pixels = np.asarray(image, dtype=np.float64)
    for box, hot in zip(boxes["masked"], (HOT_BRIGHT, HOT_DARK), strict=True):
        left, top, right, bottom = box
        cells = np.array([[pixels[int(top + (r + 0.5) * (bottom - top) / 4), int(left + (c + 0.5) * (right - left) / 4)]
                           for c in range(4)] for r in range(4)])
        away = np.linalg.norm(cells - 200.0, axis=-1)  # colour distance from the light grey picture
        assert away[hot] > 80 and cells[hot][2] > cells[hot][0] + 80  # the one masked patch is tinted blue
        assert np.delete(away.ravel(), hot[0] * 4 + hot[1]).max() < 10  # and no other


def test_baseline_is_uniform_seeded_and_leaves_the_global_rng_alone():
    mae = create_mae(tiny_model())
    x, y, display = batch([0, 1, 2, 0, 1, 2, 0, 1])
    n, ratio = mae.num_patches, 0.75
    k = num_masked(n, ratio)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = snapshot(mae, None, x, y, display, ratio, baseline=True, step=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the masks must not depend on it
    b = snapshot(mae, None, x, y, display, ratio, baseline=True, step=3, seed=5)
    c = snapshot(mae, None, x, y, display, ratio, baseline=True, step=3, seed=6)
    assert a.baseline and torch.equal(a.probs, torch.full((8, n), k / n))
    assert a.masks.sum(1).tolist() == [float(k)] * 8
    assert set(a.masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, c.masks)
    assert len({tuple(row.tolist()) for row in a.masks}) > 1  # each image its own random mask
    assert np.allclose(a.mean_map(), k / n)


def test_modes_are_restored_and_the_pass_runs_in_eval_mode():
    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    mae.train()
    t.train()
    mae.blocks[0].eval()  # a mixed state comes back as it was, module by module
    before = {name: m.training for name, m in [*mae.named_modules(), *t.named_modules()]}
    seen = []
    t.register_forward_pre_hook(lambda module, args: seen.append((module.training, mae.training)))
    x, y, display = batch([0, 1])
    snapshot(mae, t, x, y, display, 0.5, baseline=False, step=0)
    assert seen == [(False, False)]
    after = {name: m.training for name, m in [*mae.named_modules(), *t.named_modules()]}
    assert after == before and mae.training and t.training and not mae.blocks[0].training


@pytest.mark.filterwarnings("error")  # e.g. constrained layout giving up: an illegible figure
@pytest.mark.parametrize("grid,count,baseline", [(4, 1, True), (4, 12, False), (8, 1, False), (8, 12, True)])
def test_every_render_has_its_fixed_size(grid, count, baseline):
    mae = mae_with_grid(grid)
    t = MaskingNetwork(mae.num_patches, mae.pos_embed.shape[-1], 8)
    x, y, display = batch([i % 12 for i in range(count)], img=2 * grid)
    snap = snapshot(mae, None if baseline else t, x, y, display, 0.75, baseline=baseline, step=100)
    rc = dict(matplotlib.rcParams)
    names = [f"class number {i}" for i in range(12)]  # long names get shortened, not overlapped
    renders = {MEAN_SIZE: render_mean(snap), PANEL_SIZE: render_panel(snap, class_names=names),
               CLASSES_SIZE: render_classes(snap, class_names=names)}
    for size, image in renders.items():
        assert image.mode == "RGB" and image.size == size
        back = png_round_trip(image)
        assert back.size == size and back.mode == "RGB"
    assert len(renders[PANEL_SIZE].info["axes_px"]["masked"]) == min(count, 8)
    assert len(renders[CLASSES_SIZE].info["axes_px"]["classes"]) == min(count, 10)
    assert dict(matplotlib.rcParams) == rc  # nothing global changed


def test_class_maps_match_a_plain_loop_and_stop_at_ten_classes():
    gen = torch.Generator().manual_seed(1)
    labels = [0, 0, 1, 2, 42, 3, 7, 5, 5, 11, 6, 9, 10, 8, 4, 42, 0]  # 13 class ids, unsorted
    b = len(labels)
    probs = torch.rand(b, 16, generator=gen)
    snap = MaskSnapshot(step=0, grid=(4, 4), probs=probs, masks=(probs > 0.5).float(),
                        labels=torch.tensor(labels), images=torch.zeros(b, 8, 8, 3, dtype=torch.uint8),
                        baseline=False)
    maps = snap.class_maps()
    assert list(maps) == list(range(10))
    p = probs.numpy().astype(np.float64)
    for c, got in maps.items():
        total, n = np.zeros(16), 0
        for i in range(b):
            if labels[i] == c:
                total += p[i]
                n += 1
        np.testing.assert_allclose(got, (total / n).reshape(4, 4), rtol=1e-6)
    assert list(snap.class_maps(max_classes=3)) == [0, 1, 2]
    assert list(snap.class_maps(max_classes=20)) == [*range(12), 42]
    freq = np.zeros(16)
    for i in range(b):
        freq += (p[i] > 0.5)
    np.testing.assert_allclose(snap.mask_frequency(), (freq / b).reshape(4, 4))


@pytest.mark.parametrize("count", [1, 2, 5, 12, 13, 14, 25, 100, 1001])
def test_strip_picks_at_most_twelve_evenly_with_both_ends(count):
    picks = strip_indices(count)
    assert len(picks) == min(count, 12)
    assert picks[0] == 0 and picks[-1] == count - 1
    gaps = np.diff(picks)
    assert np.all(gaps >= 1) and (len(gaps) == 0 or gaps.max() - gaps.min() <= 1)


def test_evolution_frames_strip_and_gif(tmp_path):
    n = 13
    base = MaskSnapshot(step=0, grid=(4, 4), probs=torch.zeros(2, 16), masks=torch.zeros(2, 16),
                        labels=torch.tensor([0, 1]), images=torch.zeros(2, 8, 8, 3, dtype=torch.uint8), baseline=False)
    # Snapshot i has every probability i/(n-1): the strip must show a rising sequence.
    # and masks every patch in odd snapshots only.
    snaps = [replace(base, step=10 * i, probs=torch.full((2, 16), i / (n - 1)), masks=torch.full((2, 16), float(i % 2)))
             for i in range(n)]
    frames, strip = render_evolution(snaps)
    assert len(frames) == n and {f.size for f in frames} == {MEAN_SIZE} and {f.mode for f in frames} == {"RGB"}
    for i in (0, 5, n - 1):  # each frame shows its own snapshot
        boxes = frames[i].info["axes_px"]
        assert decode(frames[i], boxes["mean"], (4, 4), PROB_CMAP)[2, 3] == pytest.approx(i / (n - 1), abs=0.01)
        assert decode(frames[i], boxes["frequency"], (4, 4), FREQ_CMAP)[0, 0] == pytest.approx(i % 2, abs=0.01)
    assert strip.size == STRIP_SIZE and strip.mode == "RGB"
    steps = strip.info["steps"]
    picks = strip_indices(n)
    assert len(steps) == 12 and steps[0] == 0 and steps[-1] == 10 * (n - 1)
    assert steps == [10 * i for i in picks]
    boxes = strip.info["axes_px"]["maps"]
    assert len(boxes) == 12
    shown = [decode(strip, box, (4, 4), PROB_CMAP)[1, 1] for box in boxes]
    np.testing.assert_allclose(shown, [i / (n - 1) for i in picks], atol=0.01)

    path = tmp_path / "evolution.gif"
    save_gif(frames, path, seconds_per_frame=0.25)
    with Image.open(path) as gif:
        assert gif.n_frames == n
        assert gif.info["duration"] == 250
        assert gif.size == MEAN_SIZE

    few_frames, few_strip = render_evolution(snaps[:3])
    assert len(few_frames) == 3 and few_strip.info["steps"] == [0, 10, 20] and few_strip.size == STRIP_SIZE


def test_evolution_frames_drawn_from_the_saved_history_count_the_images(tmp_path):
    """The GIF is drawn from the condensed history kept in checkpoints (one mean row per evaluation):
    its titles must still count the images of the sample, as the per-step PNGs do."""
    from mlo_mae.evaluation import condensed
    from training.recording import history_snapshots

    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    x, y, display = batch([0, 0, 1, 1, 0])
    snaps = [snapshot(mae, t, x, y, display, mask_ratio=0.25, baseline=False, step=step) for step in (0, 10, 20)]
    assert render_mean(snaps[-1]).info["title"].endswith("(5 images, 4/16 patches masked each)")
    history = [{**condensed(s), "images": 5} for s in snaps[:2]] + [condensed(snaps[2])]  # one saved before counts
    frames, _ = render_evolution(history_snapshots(history, sample_size=5))
    titles = [f.info["title"] for f in frames]
    assert titles == [f"MLO-MAE · step {s}   (5 images, 4/16 patches masked each)" for s in (0, 10, 20)]
    assert [f.info["title"] for f in render_evolution(history_snapshots(history[:1], sample_size=99))[0]] == \
        [titles[0]]  # a recorded count wins over the fallback


def test_figures_label_p_as_a_score_and_the_masked_set_as_the_k_highest():
    """p is a score (the k highest of an image are masked), not the chance of being masked."""
    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    x, y, display = batch([0, 1])
    snap = snapshot(mae, t, x, y, display, mask_ratio=0.25, baseline=False, step=3)
    panel = render_panel(snap)
    assert "the 4/16 patches masked (each image's highest scores)" in panel.info["title"]
    assert "probability" not in panel.info["title"].lower()
    _, strip = render_evolution([snap])
    assert "score p" in strip.info["title"] and "probability" not in strip.info["title"].lower()


def test_a_runs_renderer_redraws_its_figures_as_fresh_renders_would_show_them():
    """HeatmapRenderer reuses each kind's laid-out figure for the next snapshot: the pixels must be
    those of a figure built for that snapshot (the new data, titles and labels, none of the old),
    the axes stay where they were, and a snapshot with another class set gets its own figure."""
    mae = mae_with_grid(4)
    t = brightness_masknet(mae)
    names = ["bright", "dark", "third"]
    snaps = [snapshot(mae, t, *batch(labels, bright=bright), mask_ratio=0.25, baseline=False, step=step)
             for labels, bright, step in (([0, 0, 0, 1], {0}, 3), ([1, 0, 0, 0], {1}, 40), ([2, 0, 2], {2}, 41))]
    renderer = HeatmapRenderer(class_names=names)
    drawn = [renderer.render(s) for s in snaps]
    fresh = {"mean": render_mean, "panel": lambda s: render_panel(s, class_names=names),
             "classes": lambda s: render_classes(s, class_names=names)}
    # every kind of the first two, and the figure the third needs anew (its class set differs)
    for snap, images, kinds in zip(snaps, drawn, (fresh, fresh, ["classes"]), strict=True):
        for kind in kinds:
            image, expected = images[kind], fresh[kind](snap)
            assert image.size == expected.size and image.info["title"] == expected.info["title"]
            difference = np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16))
            assert (difference > 8).mean() < 0.002, (snap.step, kind)  # a few antialiased text pixels at most
    first, second = drawn[0], drawn[1]
    assert second["panel"].info["axes_px"] == first["panel"].info["axes_px"]  # laid out once: no jitter
    for images, hot in ((first, HOT_BRIGHT), (second, HOT_DARK)):  # 3 bright images, then 3 dark (classes swap)
        means = decode(images["mean"], images["mean"].info["axes_px"]["mean"], (4, 4), PROB_CMAP)
        assert np.unravel_index(means.argmax(), means.shape) == hot
    renderer.close()


def test_a_pixel_rule_snapshot_shows_the_rule_s_rank_and_masks_its_k_highest():
    from mlo_mae.config import MLOConfig

    mae = mae_with_grid(4)
    x, y, display = batch([0, 1, 2, 0])
    rule = MLOConfig(baseline=True, baseline_rule="object-first", mask_ratio=0.25)
    snap = snapshot(mae, None, x, y, display, 0.25, baseline=True, step=5, mlo=rule)
    assert snap.mode == "object-first masks" and snap.score_name == "rank by the rule"
    top = torch.topk(snap.probs, 4).indices  # k = 4 of 16
    assert torch.equal(snap.masks, torch.zeros(4, 16).scatter_(1, top, 1.0))
    assert render_mean(snap).size == MEAN_SIZE
