"""The ``mlo-mae`` command run in the test process: its real entry point, exit status and output."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os


@dataclasses.dataclass
class CliResult:
    """What ``mlo-mae ARGS`` returned, shaped like ``subprocess.CompletedProcess``."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd=None) -> CliResult:
    """``mlo-mae ARGS`` in this process (no interpreter start, no new Ray connection): the command's real
    entry point with its exit status and output. Tests of exit codes on signals use a real process."""
    from cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())
