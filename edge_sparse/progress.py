"""Progress lines for long work: shown on a terminal, silent with --quiet or when stderr is piped."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

__all__ = ["Progress", "set_quiet"]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence all progress output of this process (the CLI's --quiet)."""
    global _QUIET
    _QUIET = bool(quiet)


class Progress:
    """Prints ``[edge-sparse] step ... done (1.2 s)`` lines to stderr when it is a terminal.

    ``Progress(quiet=None)`` follows the process-wide setting; ``quiet=True/False`` overrides it.
    """

    def __init__(self, quiet: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if quiet is None:
            quiet = _QUIET
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = not quiet and isatty

    def info(self, msg: str) -> None:
        if self.enabled:
            print(f"[edge-sparse] {msg}", file=self.stream, flush=True)

    @contextmanager
    def step(self, msg: str):
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[edge-sparse] {msg} ...", file=self.stream, flush=True)
        yield
        if self.enabled:
            print(f"[edge-sparse] {msg}: done ({time.perf_counter() - t0:.1f} s)", file=self.stream, flush=True)

    def count(self, i: int, n: int, msg: str) -> None:
        """A counter that rewrites its own line: ``msg 3/10``."""
        if self.enabled:
            end = "\n" if i >= n else ""
            print(f"\r[edge-sparse] {msg} {i}/{n}", end=end, file=self.stream, flush=True)
