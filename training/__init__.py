"""Ray Train around the core engine: the per-worker loop and the driver that launches it."""
