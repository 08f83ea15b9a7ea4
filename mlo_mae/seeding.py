"""Seeds derived from the run seed and the engine's counters, and a block that runs under one.

A random draw that depends only on (run seed, counters saved in checkpoints) is
drawn again, bit for bit, by a resumed or restarted run, whatever happened to
the process-wide generator in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# stream -> (multiplier of the run seed, multiplier of the outer counter): distinct large primes keep
# nearby run seeds and counters, and the two streams, from landing on the same seed.
STREAMS = {
    "iteration": (1_000_033, 7_919),  # counters (rank, iteration): one iteration's masks and dropout
    "hypergradient": (1_000_003, 101),  # counters (iteration, T's steps): dropout inside the hypergradient
}


def stream_seed(stream: str, run_seed: int, outer: int, inner: int) -> int:
    """The seed of ``stream`` at counters (``outer``, ``inner``): a pure function of saved state, so a
    resumed run draws what the uninterrupted one drew."""
    seed_factor, outer_factor = STREAMS[stream]
    return (run_seed * seed_factor + outer * outer_factor + inner) % 2**62


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with RNG seeded by ``seed`` and leave the global RNG as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
