"""The single-process training loop around the engine: progress, ETA, checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

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
    parts += [f"{progress.steps_per_s:.2f} it/s", f"ETA {_duration(progress.eta_s)}"]
    return " | ".join(parts)


def fit(
    engine: MLOEngine,
    batches: Mapping[str, Iterator[Batch]],
    log_every: int,
    on_log: Callable[[StepStats, Progress], None],
    checkpoint_every: int = 0,
    save: Callable[[], None] | None = None,
) -> StepStats | None:
    """Run ``engine`` from its current iteration to ``engine.total_steps``."""
    start_step = engine.iteration
    start = time.perf_counter()
    stats = None
    while engine.iteration < engine.total_steps:
        stats = engine.step(batches)
        done = engine.iteration
        elapsed = time.perf_counter() - start
        rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
        if done % log_every == 0 or done == engine.total_steps or done == start_step + 1:
            on_log(stats, Progress(done, engine.total_steps, elapsed, rate))
        if save is not None and checkpoint_every and done % checkpoint_every == 0:
            save()
    return stats
