"""Small shared infrastructure, one helper per job: all-or-nothing writes, file hashing, ``HOST:PORT`` parsing,
latency statistics and timing, the host's CPU architecture name.

Imports only the standard library (numpy for the statistics), so the device-side runtime can use it.

- :func:`atomic_write` / :func:`atomic_path`: a file appears complete or not at all (temp file beside it + rename);
  ``replace=False`` refuses to overwrite an existing file, atomically.
- :func:`atomic_dir`: the same for a directory (build in a staging directory beside it, then rename).
- :func:`check_output`: the one check of an output path before any work: not an input, not inside or around an
  input, not existing without ``--force`` (and ``--force`` replaces only what the command itself writes), a name the
  filesystem takes, a directory that exists and is writable.
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

__all__ = ["rewrite_functions", "atomic_write", "atomic_path", "atomic_dir", "check_output", "json_text", "sha256_file", "sha256_bytes", "parse_host_port",
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
        raise _exists(path)
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
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    done = False
    try:
        if not replace and path.exists():
            raise _exists(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield staging
        os.chmod(staging, mode & ~_umask())          # mkdtemp makes it owner-only
        old = None
        if path.exists() or path.is_symlink():
            if not replace:
                raise _exists(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(path, old)
        try:
            os.rename(staging, path)             # no-replace for a non-empty directory: the kernel checks atomically
        except OSError as e:                         # another process created a non-empty ``path`` meanwhile
            raise _exists(path) from e
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:                                 # parents this call created, deepest first, if still empty
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break


def _exists(path: Path) -> FileExistsError:
    import errno

    return FileExistsError(errno.EEXIST, "exists (created by another process meanwhile?)", str(path))


NAME_MAX = 255   # bytes per path component on Linux filesystems (ext4, xfs, btrfs, tmpfs)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(path: str | os.PathLike | None, *, force: bool, inputs=(), kind: str = "file",
                 replaceable: Callable[[Path], bool] | None = None, what: str = "output") -> Path | None:
    """Refuse a bad output path before any work is done (one UserError line); returns the path (None passes).

    inputs: files or directories the command reads; the output may not be one, lie inside one (an artifact the
    command reads, say) or contain one (``--force`` would delete it).
    kind: ``file`` or ``dir``. An existing output needs ``force``; a directory is replaced only when it is empty or
    ``replaceable(path)`` says it is what this command writes (an artifact, a tuning database).
    """
    from edge_sparse.errors import UserError

    if path is None:
        return None
    out = Path(path)
    name = out.name.encode(errors="surrogateescape")
    if not out.name or len(name) > NAME_MAX:
        raise UserError(f"{what} name '{out.name[:40]}...' is {len(name)} bytes; file names are limited to {NAME_MAX}"
                        if out.name else f"{what} '{out}' has no file name")
    if any(len(part.encode(errors="surrogateescape")) > NAME_MAX for part in out.parts):
        raise UserError(f"{what} path {str(out)[:60]}... has a component over {NAME_MAX} bytes")
    real = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if _overlaps(real, s):
            rel = ("is" if real == s else "is inside" if s in real.parents else "contains")
            raise UserError(f"{what} {out} {rel} the input {src}; choose an output path apart from the inputs "
                            f"(inputs are never overwritten)")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{what} {out} already exists; pass --force to replace it")
        if kind == "file" and out.is_dir():
            raise UserError(f"{what} {out} is a directory; pass a file path")
        if kind == "dir":
            if not out.is_dir() or out.is_symlink():
                raise UserError(f"{what} {out} exists and is not a directory; remove it or choose another path")
            if any(out.iterdir()) and not (replaceable and replaceable(out)):
                raise UserError(f"{what} {out} is a non-empty directory this command did not write; --force replaces "
                                f"only its own outputs: remove it yourself or choose another path")
    parent = out.parent
    if kind == "dir":                                # created if missing: check the deepest existing ancestor
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} directory {out.parent} does not exist; create it first" if not parent.exists()
                        else f"{what} {out}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edge-sparse-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} into {parent}: {e.strerror or e}; choose a writable directory") from None
    return out


def _finite(obj):
    if isinstance(obj, float) or type(obj).__name__ in ("float32", "float64", "float16"):
        import math

        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON for reports: NaN and +-inf become null (bare ``NaN`` is not JSON and breaks other readers);
    numpy scalars become numbers."""
    import json

    def default(o):
        if hasattr(o, "item"):
            return _finite(o.item())
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    return json.dumps(_finite(obj), indent=indent, allow_nan=False, default=default)


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


def nchw_as_rows(builder, x, rows: int, channels: int):
    """Emit ``x`` [N, C, H, W] as the GEMM input X[N*H*W, C] (NCHW -> NHWC, then pixels as rows): how a 1x1 conv
    reaches a matmul kernel; in a channels-last pipeline the transpose fuses into the NHWC producer."""
    from tvm import relax

    xt = builder.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    return builder.emit(relax.op.reshape(xt, (rows, channels)))


def rows_as_nchw(builder, y, n: int, h: int, w: int, channels: int):
    """The inverse of :func:`nchw_as_rows` for the GEMM output Y[N*H*W, C]: [N, C, H, W] (the permute not emitted)."""
    from tvm import relax

    y = builder.emit(relax.op.reshape(y, (n, h, w, channels)))
    return relax.op.permute_dims(y, [0, 3, 1, 2])


def rewrite_functions(mutator, mod):
    """Run a ``relax.PyExprMutator`` (built on ``mod``) over every Relax function of ``mod``; the updated module."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
