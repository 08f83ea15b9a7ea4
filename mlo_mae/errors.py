"""The three kinds of failure a user is told about, each with its exit status.

Every layer raises one of these with a one-line message; the command line maps
them to ``mlo-mae: error: ...`` and an exit status in one place, so no lower
layer needs to know about the command line.
"""

from __future__ import annotations

import signal


class InputError(ValueError):
    """Input the user can fix (a flag, a file, a name, a URI): exit status 2."""

    exit_code = 2


class RunFailed(RuntimeError):
    """Training, an evaluation or a study ran and failed (divergence, a lost cluster): exit status 1."""

    exit_code = 1


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the work; the message says what was kept and how to continue.
    Exit status 128 + the signal, as a shell reports a process ended by it."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
