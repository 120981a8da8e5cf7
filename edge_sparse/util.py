"""Small shared infrastructure, one helper per job: all-or-nothing writes, file hashing, ``HOST:PORT`` parsing,
latency statistics and timing, the host's CPU architecture name.

Imports only the standard library (numpy for the statistics), so the device-side runtime can use it.

- :func:`atomic_write` / :func:`atomic_path`: a file appears complete or not at all (temp file beside it + rename);
  ``replace=False`` refuses to overwrite an existing file, atomically.
- :func:`atomic_dir`: the same for a directory (build in a staging directory beside it, then rename).
- :func:`sha256_file`, :func:`sha256_bytes`.
- :func:`parse_host_port`: ``HOST:PORT``, ``HOST`` (with a default port) or ``[v6]:PORT``.
- :func:`latency_stats`: count, mean, median, min, max, std, p90, p99, throughput; the one percentile formula
  (numpy's linear interpolation) every benchmark uses. :func:`time_calls` collects the samples.
- :func:`normalize_arch`: ``platform.machine()`` names to the names TVM triples use (``arm64`` -> ``aarch64``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

__all__ = ["atomic_write", "atomic_path", "atomic_dir", "sha256_file", "sha256_bytes", "parse_host_port",
           "latency_stats", "time_calls", "normalize_arch", "host_arch"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _place(tmp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
    else:
        os.link(tmp, path)             # atomic no-replace: FileExistsError when ``path`` appeared meanwhile
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, replace: bool = True, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that add or check one keep working); when the
    block ends without an exception it is renamed to ``path``, otherwise removed.

    replace: False raises ``FileExistsError`` instead of overwriting an existing ``path`` (checked atomically).
    mode: permission bits before the umask (temp files are created owner-only; the result is an ordinary file).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())
        _place(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 replace: bool = True, mode: int = 0o666) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function writing into a binary file object) to ``path`` all or
    nothing; see :func:`atomic_path` for ``replace`` and ``mode``. Returns ``path``."""
    path = Path(path)
    with atomic_path(path, replace=replace, mode=mode) as tmp:
        if isinstance(data, str):
            data = data.encode()
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True, mode: int = 0o777) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``path``; when the block ends without an exception the staging
    directory becomes ``path`` (an existing ``path`` is swapped out and deleted), otherwise it is deleted.

    replace: False raises ``FileExistsError`` when ``path`` exists (then, or when another process got there first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        os.chmod(staging, mode & ~_umask())          # mkdtemp makes it owner-only
        old = None
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(f"{path} exists")
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(path, old)
        try:
            os.rename(staging, path)
        except OSError as e:                         # another process created a non-empty ``path`` meanwhile
            raise FileExistsError(f"{path} exists") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_host_port(text: str, default_port: int | None = None, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT``, or ``HOST`` alone when ``default_port`` is given -> ``(host, port)``.

    Bad input raises :class:`~edge_sparse.errors.UserError` naming ``what`` (e.g. ``--rpc``) and the expected form.
    """
    from edge_sparse.errors import UserError

    example = f"127.0.0.1:{default_port or 9090}"
    text = str(text).strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise UserError(f"{what} '{text}': expected [IPv6]:PORT, e.g. [::1]:{default_port or 9090}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise UserError(f"{what} '{text}': write an IPv6 address in brackets, e.g. [::1]:{default_port or 9090}")
    else:
        host, port_text = text, ""
    if not host:
        raise UserError(f"{what} needs HOST:PORT, e.g. {example}; got '{text}'")
    if not port_text:
        if default_port is None:
            raise UserError(f"{what} must be HOST:PORT (e.g. {example}), got '{text}'")
        return host, default_port
    if not port_text.isdigit():
        raise UserError(f"{what} '{text}': port '{port_text}' is not a number (expected HOST:PORT, e.g. {example})")
    port = int(port_text)
    if not 0 < port < 65536:
        raise UserError(f"{what} '{text}': port {port} is out of range (1-65535)")
    return host, port


def latency_stats(seconds) -> dict[str, float]:
    """count, mean, median, min, max, std (population), p90, p99 in milliseconds (percentiles by numpy's linear
    interpolation); throughput in inferences/s. ``seconds``: one sample per timed inference."""
    import numpy as np

    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        raise ValueError("no samples")
    return {
        "count": int(a.size),
        "mean_ms": float(a.mean()),
        "median_ms": float(np.median(a)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "std_ms": float(a.std()),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "throughput_ips": float(1e3 / a.mean()),
    }


def time_calls(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 50, min_seconds: float = 0.0,
               max_count: int | None = None) -> list[float]:
    """Wall seconds of ``fn()`` per call: ``warmup`` untimed calls, then at least ``repeat`` timed calls and at least
    ``min_seconds`` of them (capped at ``max_count`` calls). Feed the result to :func:`latency_stats`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        if max_count is not None and len(times) >= max_count:
            break
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` spelling -> the architecture name TVM triples use (``arm64`` -> ``aarch64``)."""
    m = str(machine).lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_arch() -> str:
    return normalize_arch(platform.machine())
