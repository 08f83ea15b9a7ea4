"""SIGTERM handled as Ctrl-C, for the driver of a run or a study.

Schedulers and ``kill`` stop a process with SIGTERM; Ray's own SIGTERM handler
(installed by ``ray.init``) would crash the driver and leave MLflow runs
RUNNING. Turning SIGTERM into SIGINT gives both signals one path: Python's
KeyboardInterrupt, or Tune's own SIGINT handler while a Tuner is fitting (it
stops the trials and saves the study's state).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[list[int]]:
    """Within the block SIGTERM raises SIGINT, and SIGINT raises KeyboardInterrupt unless a library installs
    its own handler (a process started in the background inherits SIGINT ignored). Yields a list that
    records each SIGTERM; outside the main thread (a Tune trial) signals are left alone."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_term(signum: int, _frame) -> None:
        received.append(signum)
        signal.raise_signal(signal.SIGINT)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_term)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def last_signal(received: list[int]) -> int:
    """The signal that stopped the work: SIGTERM if one arrived, else Ctrl-C."""
    return received[-1] if received else signal.SIGINT
