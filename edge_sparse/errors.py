"""The one exception type that reaches users as a single line.

Anything the user can fix (a bad path, a wrong shape, an unknown target) raises :class:`UserError` with a
message that says what is wrong and how to fix it. The CLI prints it as ``error: <message>`` and exits 2,
without a traceback. A failure inside TVM after intake becomes a :class:`CompileError` line at the compile boundary
(:class:`internal_errors`). Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math
import os

__all__ = ["UserError", "closest", "check_number", "check_threads", "THREADS_PER_CORE", "interrupts_as_exceptions",
           "raise_if_interrupted", "CompileError", "internal_errors"]

THREADS_PER_CORE = 4   # more threads than this per core only thrash (and 10^5 threads abort the process)


class UserError(Exception):
    """An error caused by the user's input; its message is shown as one line."""

    exit_code = 2


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest choice, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_number(value, what: str, lo=None, hi=None, *, lo_open: bool = False):
    """``value`` unless it is NaN/inf or outside [lo, hi] (``(lo, hi]`` with ``lo_open``): then a UserError naming
    the option and the allowed range. None passes through (an option not given)."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value}")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UserError(f"{what} must be in {span}, got {value:g}" if isinstance(value, float) else
                        f"{what} must be in {span}, got {value}")
    return value


def check_threads(n: int | None, cores: int | None = None, what: str = "--threads", where: str = "this machine"):
    """A thread count between 1 and THREADS_PER_CORE x ``cores`` (default: this machine's)."""
    if n is None:
        return None
    cores = int(cores or os.cpu_count() or 1)
    hi = THREADS_PER_CORE * cores
    if not 1 <= n <= hi:
        raise UserError(f"{what} must be between 1 and {hi} ({THREADS_PER_CORE}x the {cores} cores of {where}), got {n}")
    return n


_interrupted = False
_saved_stderr: int | None = None   # fd 2 as it was before an interrupt silenced it


def _on_signal(signum, frame):
    global _interrupted, _saved_stderr
    _interrupted = True
    # Native code unwinding after the interrupt may still write to fd 2 (TVM: "BlockBuilder destroyed with remaining
    # blocks!"): silence it until the one closing line, which restore_stderr() lets through.
    if _saved_stderr is None:
        try:
            _saved_stderr = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            _saved_stderr = None
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether SIGINT/SIGTERM arrived inside :class:`interrupts_as_exceptions` (whatever exception it became:
    an interrupt during an import surfaces as ImportError, inside native code as that library's error)."""
    return _interrupted


def restore_stderr() -> None:
    """Undo the silencing of fd 2 done on an interrupt (before printing the closing line)."""
    global _saved_stderr
    if _saved_stderr is not None:
        import sys

        sys.stderr.flush()
        os.dup2(_saved_stderr, 2)
        os.close(_saved_stderr)
        _saved_stderr = None


def raise_if_interrupted() -> None:
    """Re-raise a Ctrl-C/SIGTERM that native code turned into an ordinary exception. Call it in every broad
    ``except Exception`` that may catch errors from inside TVM, which otherwise swallows the interrupt."""
    if _interrupted:
        raise KeyboardInterrupt


class interrupts_as_exceptions:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt (so ``finally``/``except BaseException`` clean-ups
    of temp files run) and are remembered for :func:`raise_if_interrupted`. A no-op outside the main thread."""

    def __enter__(self):
        import signal
        import threading

        global _interrupted
        _interrupted = False
        self._saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, _on_signal)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False


class CompileError(UserError):
    """TVM failed on a model that passed intake: one line naming where (TVM's source file and function, or the
    pass) and why, instead of an internal traceback. Not the user's input being malformed, but nothing they can fix
    beyond changing the model; set ``EDGE_SPARSE_TRACEBACK=1`` to get the full trace for a bug report."""


TRACEBACK_ENV = "EDGE_SPARSE_TRACEBACK"


def _where(exc: BaseException) -> str:
    """The innermost frame of the error (TVM's C++ frames appear as ``/project/src/...cc`` in its traces)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    func = last.name.split("(")[0].replace("void ", "").strip()
    return f"{os.path.basename(last.filename)}: {func}"


class internal_errors:  # noqa: N801 - used as a context manager: ``with internal_errors("compiling for rpi4"):``
    """Turn any exception except :class:`UserError` raised inside the block into one :class:`CompileError` line."""

    def __init__(self, stage: str):
        self.stage = stage

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (UserError, MemoryError)) or not isinstance(exc, Exception):
            return False
        raise_if_interrupted()  # (an interrupt that TVM turned into an ordinary error)
        if os.environ.get(TRACEBACK_ENV):
            return False
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # TVM's check, else a compiler's "error:" line (a failed link), else the last line
        reason = next((ln for ln in lines if "Check failed" in ln), None) \
            or next((ln for ln in lines if "error:" in ln.lower() and not ln.startswith("Command line")), None) \
            or (lines[-1] if lines else "")
        reason = reason[:240] or type(exc).__name__
        raise CompileError(f"{self.stage} failed inside TVM ({_where(exc)}): {type(exc).__name__}: {reason}; this is an "
                           f"edge-sparse/TVM limitation, not your model's fault: set {TRACEBACK_ENV}=1 for the trace "
                           f"and report it") from None
