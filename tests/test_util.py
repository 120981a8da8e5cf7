"""Shared infrastructure: atomic writes, hashing, HOST:PORT parsing, latency statistics, arch names."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from edge_sparse.errors import UserError
from edge_sparse.util import (atomic_dir, atomic_path, atomic_write, latency_stats, normalize_arch, parse_host_port,
                              sha256_file, time_calls)


def test_atomic_write_bytes_text_and_writer(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, "text")
    assert p.read_text() == "text"
    atomic_write(tmp_path / "x.npz", lambda f: np.savez(f, a=np.arange(3)))
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bin", "x.npz"]      # no temp files left


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_write_failure_leaves_old_file(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["a.json"]


def test_atomic_no_replace(tmp_path):
    p = tmp_path / "a"
    p.write_text("old")
    with pytest.raises(FileExistsError):
        atomic_write(p, "new", replace=False)
    assert p.read_text() == "old"
    with pytest.raises(FileExistsError):      # the destination appears while the temp file is written
        with atomic_path(tmp_path / "b", replace=False) as tmp:
            tmp.write_text("mine")
            (tmp_path / "b").write_text("theirs")
    assert (tmp_path / "b").read_text() == "theirs"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "b"]


def test_atomic_dir_replace_and_failure(tmp_path):
    d = tmp_path / "art"
    with atomic_dir(d) as stage:
        (stage / "f").write_text("1")
    assert (d / "f").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as stage:
            (stage / "f").write_text("2")
            raise RuntimeError
    assert (d / "f").read_text() == "1"
    with atomic_dir(d) as stage:
        (stage / "g").write_text("3")
    assert sorted(x.name for x in d.iterdir()) == ["g"]
    with pytest.raises(FileExistsError):
        with atomic_dir(d, replace=False) as stage:
            (stage / "h").write_text("4")
    assert sorted(x.name for x in d.iterdir()) == ["g"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]


def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("text,default,want", [("127.0.0.1:9090", None, ("127.0.0.1", 9090)),
                                               ("localhost", 9190, ("localhost", 9190)),
                                               ("[::1]:7", None, ("::1", 7)), ("[::1]", 5, ("::1", 5))])
def test_parse_host_port(text, default, want):
    assert parse_host_port(text, default) == want


@pytest.mark.parametrize("text,default,msg", [("host", None, "HOST:PORT"), ("h:x", 1, "not a number"),
                                              ("h:70000", 1, "out of range"), (":9", 1, "HOST:PORT"),
                                              ("::1:9", 1, "brackets")])
def test_parse_host_port_errors(text, default, msg):
    with pytest.raises(UserError, match=msg):
        parse_host_port(text, default, "--rpc")


def test_latency_stats_and_time_calls():
    calls = []
    s = time_calls(lambda: calls.append(1), warmup=3, repeat=7)
    assert len(s) == 7 and len(calls) == 10
    st = latency_stats(np.array([1.0, 2.0, 3.0, 4.0]) / 1e3)
    assert st["p90_ms"] == pytest.approx(np.percentile([1, 2, 3, 4], 90)) and st["median_ms"] == 2.5
    with pytest.raises(ValueError):
        latency_stats([])


def test_normalize_arch():
    assert normalize_arch("AMD64") == "x86_64" and normalize_arch("arm64") == "aarch64"
    assert normalize_arch("aarch64") == "aarch64"
