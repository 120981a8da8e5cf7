"""The bad-input contract, checked in one place.

A bad input must end with exit code 2, exactly one stderr line starting ``error:``, no traceback, every input
byte-identical afterwards, nothing new at (or beside) the output paths and nothing left in the temp directory.
:func:`assert_bad_input` runs the CLI (in-process, or as a subprocess where the failure could crash the interpreter)
with a private temp directory and checks all of that.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outcome", "assert_bad_input", "snapshot", "cli_command"]


def snapshot(path: Path) -> dict[str, str] | None:
    """Content hash of a file, or of every entry under a directory (None: the path does not exist)."""
    path = Path(path)
    try:
        if not path.exists() and not path.is_symlink():
            return None
    except OSError:                                  # e.g. a name too long to exist
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _listing(d: Path) -> set[str]:
    try:
        return set(os.listdir(d)) if d.is_dir() else set()
    except OSError:
        return set()


def cli_command() -> list[str]:
    return [sys.executable, "-m", "edge_sparse.cli"]


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        return self.stderr.strip()


def _run(args, tmpdir: Path, in_process: bool, env: dict | None, timeout: float, input: str | None) -> Outcome:
    env_all = {"TMPDIR": str(tmpdir), "TVM_BIND_THREADS": "0", **(env or {})}
    if not in_process:
        p = subprocess.run(cli_command() + args, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env_all}, input=input)
        return Outcome(p.returncode, p.stdout, p.stderr)
    from click.testing import CliRunner

    from edge_sparse.cli import cli

    saved = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)
    try:
        r = CliRunner().invoke(cli, args, env=env_all, input=input)
    finally:
        tempfile.tempdir = saved
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(*r.exc_info))
        raise AssertionError(f"uncaught {type(r.exception).__name__} (a traceback for the user):\n{tb}")
    return Outcome(r.exit_code, r.stdout, r.stderr)


def assert_bad_input(args, *fragments, inputs=(), outputs=(), in_process: bool = True, env: dict | None = None,
                     timeout: float = 300, input: str | None = None) -> Outcome:
    """Run ``edge-sparse ARGS`` and assert the bad-input contract; ``fragments`` must appear in the error line.

    ``inputs``: files or directories that must be byte-identical afterwards (also checked: they still exist).
    ``outputs``: paths the command was asked to write: they must be as before (absent, or unchanged), and their
    parent directories must hold no new entries (no staging directory, no ``.tmp`` file).
    """
    args = [str(a) for a in args]
    before_in = {Path(p): snapshot(Path(p)) for p in inputs}
    before_out = {Path(p): snapshot(Path(p)) for p in outputs}
    parents = {Path(p).parent for p in outputs}
    before_parents = {d: _listing(d) for d in parents}
    with tempfile.TemporaryDirectory(prefix="contract-") as tmp:
        tmpdir = Path(tmp) / "tmp"
        tmpdir.mkdir()
        res = _run(args, tmpdir, in_process, env, timeout, input)
        # onnxruntime writes a session-id file ".ses" into $TMPDIR when it is imported and reuses it: not a leftover
        left = sorted(n for n in os.listdir(tmpdir) if n != ".ses")
    where = f"edge-sparse {' '.join(args)}"
    assert res.exit_code == 2, f"{where}: exit {res.exit_code}, want 2\nstdout: {res.stdout}\nstderr: {res.stderr}"
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"{where}: stderr has {len(lines)} lines, want exactly 1:\n{res.stderr}"
    assert lines[0].startswith("error: "), f"{where}: stderr does not start with 'error: ': {lines[0]!r}"
    assert "Traceback" not in res.stderr + res.stdout, f"{where}: traceback printed"
    for f in fragments:
        assert f in lines[0], f"{where}: {f!r} not in the error line {lines[0]!r}"
    for p, snap in before_in.items():
        assert snapshot(p) == snap, f"{where}: input {p} changed"
    for p, snap in before_out.items():
        assert snapshot(p) == snap, f"{where}: output path {p} changed (want untouched)"
    for d, names in before_parents.items():
        new = sorted(_listing(d) - names)
        assert not new, f"{where}: left {new} in {d}"
    assert not left, f"{where}: left {left} in the temp directory"
    return res
