"""The training loop around the engine: one call per iteration, progress and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .engine import Batch, MLOEngine, StepStats


@dataclass
class Progress:
    step: int  # iterations done
    total: int
    elapsed_s: float
    steps_per_s: float

    @property
    def eta_s(self) -> float:
        return (self.total - self.step) / self.steps_per_s if self.steps_per_s > 0 else float("nan")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_progress(stats: StepStats, progress: Progress) -> str:
    """One line: step, per-level losses, speed, ETA."""
    parts = [f"step {progress.step}/{progress.total}", f"L_I {stats.loss_mae:.4f}",
             f"L_II {stats.loss_head:.4f}"]
    if stats.loss_val is not None:
        parts.append(f"L_III {stats.loss_val:.4f}")
    if stats.val_top1 is not None:
        parts.append(f"val@1 {100 * stats.val_top1:.1f}%")
    if stats.mask_saturated is not None:
        parts.append(f"T: p masked {stats.mask_mean_prob_masked:.2f}, {100 * stats.mask_saturated:.0f}% saturated")
    parts += [f"{progress.steps_per_s:.2f} it/s", f"ETA {_duration(progress.eta_s)}"]
    return " | ".join(parts)


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic event (log, evaluation, checkpoint) falls on ``step``: every ``every``
    iterations (0: never) and always at the last one."""
    return step == total or (every > 0 and step % every == 0)


def fit(
    engine: MLOEngine,
    batches: Mapping[str, Iterator[Batch]],
    on_step: Callable[[StepStats, Progress], None],
) -> StepStats | None:
    """Run ``engine`` from its current iteration to ``engine.total_steps``; ``on_step`` sees every
    iteration (logging, evaluation and checkpoints are its business, see ``due``)."""
    start_step = engine.iteration
    start = time.perf_counter()
    stats = None
    while engine.iteration < engine.total_steps:
        stats = engine.step(batches)
        elapsed = time.perf_counter() - start
        rate = (engine.iteration - start_step) / elapsed if elapsed > 0 else 0.0
        on_step(stats, Progress(engine.iteration, engine.total_steps, elapsed, rate))
    return stats
