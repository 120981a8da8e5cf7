"""The one exception type that reaches users as a single line.

Anything the user can fix (a bad path, a wrong shape, an unknown target) raises :class:`UserError` with a
message that says what is wrong and how to fix it. The CLI prints it as ``error: <message>`` and exits 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "closest"]


class UserError(Exception):
    """An error caused by the user's input; its message is shown as one line."""

    exit_code = 2


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest choice, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
