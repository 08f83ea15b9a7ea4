"""The quality study's statistics (benchmarks/quality.py): paired differences against MAE and their intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_by_hand(quality):
    mean, low, high = quality.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: t(0.975, 2) = 4.3027
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5) and mean - low == pytest.approx(high - mean)
    assert quality.t_interval([0.5]) is None


def rows():
    """MAE and one arm at seeds 0-2, a per-study pixel reference, a per-seed random-encoder reference."""
    mae = [0.80, 0.82, 0.81]
    arm = [0.81, 0.84, 0.80]
    out = [{"arm": "mae", "seed": s, "probe_test": v} for s, v in enumerate(mae)]
    out += [{"arm": "t", "seed": s, "probe_test": v, "object_masked": 0.5, "object_masked_start": 0.7,
             "object_masked_random": 0.75} for s, v in enumerate(arm)]
    out += [{"arm": "pixels", "seed": None, "probe_test": 0.79}]
    out += [{"arm": "random", "seed": s, "probe_test": 0.70 + 0.01 * s} for s in range(3)]
    return out


def test_paired_differences_and_reference_margins(quality):
    settings = {"seeds": [0, 1, 2], "arms": {"mae": {"label": "MAE"}, "t": {"label": "T"}},
                "finetune": {"epochs": 0}, "probe_features": "tokens"}
    table, summary = quality.summarise(rows(), settings)
    assert summary["t"]["delta_vs_mae"]["probe_test"] == pytest.approx([0.01, 0.02, -0.01])
    # references: MAE minus the reference, seed by seed (a per-study one pairs with every seed)
    assert summary["pixels"]["delta_vs_mae"]["probe_test"] == pytest.approx([0.01, 0.03, 0.02])
    assert summary["random"]["delta_vs_mae"]["probe_test"] == pytest.approx([0.10, 0.11, 0.09])
    mean, low, high = summary["t"]["delta_ci"]["probe_test"]
    assert low < 0 < high and mean == pytest.approx(0.02 / 3)
    assert "| T | 3 | 81.67 ± 2.08 | +0.67 [" in table
    assert "0.700 ± 0.000 → 0.500 ± 0.000 (0.750)" in table


def test_contrasts_are_paired_by_seed(quality):
    settings = {"seeds": [0, 1, 2], "arms": {"mae": {"label": "MAE"}, "t": {"label": "T"}},
                "contrasts": [["t", "mae"], ["t", "absent"]]}
    table, out = quality.contrasts(rows(), settings)
    assert list(out) == ["t - mae"]  # an arm the study does not have is left out
    assert out["t - mae"]["probe_test"]["values"] == pytest.approx([0.01, 0.02, -0.01])
    assert "| T − MAE | +0.67 [" in table
