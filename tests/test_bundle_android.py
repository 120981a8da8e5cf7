"""Android (android-arm64) artifacts: without ANDROID_NDK_HOME an object archive plus the one command that links it;
with it, model.so linked by the NDK clang.

There is no NDK on CI, so ``aarch64-linux-android28-clang++`` is a stand-in script that runs
``aarch64-linux-gnu-g++`` from a fake NDK tree. That checks our side (the NDK path we look up, the printed command,
the archive it unpacks, the runner loading the result), not the NDK's own toolchain or bionic. The linked model is
run under qemu-aarch64 with the glibc runtime of an rpi bundle and compared with onnxruntime (atol/rtol 1e-4).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ort_run

QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [p for t, p in {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}.items()
               if shutil.which(t) is None]
    assert not missing, f"install {' '.join(missing)} (apt)"


@pytest.fixture(scope="module")
def fake_ndk(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake-ndk")
    clang = root / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin" / "aarch64-linux-android28-clang++"
    clang.parent.mkdir(parents=True)
    clang.write_text('#!/bin/sh\nexec aarch64-linux-gnu-g++ "$@"\n')
    clang.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    from edge_sparse.models import synthetic

    path = tmp_path_factory.mktemp("android_model") / "mlp.onnx"
    synthetic.save(synthetic.mlp(seq=2, d_in=32, hidden=64, d_out=16, seed=2), path)
    return path


@pytest.fixture(scope="module")
def glibc_runtime(mlp, tmp_path_factory) -> Path:
    """An rpi5 bundle, for its lib/ and bin/ (the aarch64 glibc runtime that qemu can run)."""
    from edge_sparse import compiler

    out = tmp_path_factory.mktemp("rt") / "rpi5"
    compiler.compile(str(mlp), "rpi5", out, sparse="off", bundle=True, force=True, quiet=True)
    return out


def _run_with_glibc_runtime(artifact: Path, runtime: Path, mlp: Path, tmp_path: Path) -> float:
    shutil.copytree(runtime / "lib", artifact / "lib")
    shutil.copytree(runtime / "bin", artifact / "bin")
    x = np.random.default_rng(0).standard_normal((1, 2, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = subprocess.run([*QEMU, str(artifact / "bin" / "edge-sparse-run"), "-i", str(tmp_path / "in.npz"),
                           "-o", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, want = np.load(tmp_path / "out.npz")["y"], ort_run(mlp, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return float(np.abs(got - want).max())


@pytest.mark.slow
def test_without_ndk_archive_and_one_link_command(mlp, fake_ndk, glibc_runtime, tmp_path, monkeypatch):
    from edge_sparse import compiler
    from edge_sparse.bundle import summary_lines

    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    out = tmp_path / "android"
    man = compiler.compile(str(mlp), "android-arm64", out, sparse="off", bundle=True, force=True, quiet=True)
    assert man["library"] == "model.tar" and not (out / "model.so").exists()
    cmd = man["bundle"]["link_command"]
    assert cmd in (out / "RUN.md").read_text()
    printed = summary_lines(man, out, quiet=True)
    assert len(printed) == 1 and printed[0].endswith(cmd)
    # the runner refuses the unlinked archive with the way out
    shutil.copytree(glibc_runtime / "bin", out / "bin")
    shutil.copytree(glibc_runtime / "lib", out / "lib")
    refused = subprocess.run([*QEMU, str(out / "bin" / "edge-sparse-run"), "--info"], capture_output=True, text=True)
    assert refused.returncode == 2 and "link them into model.so with the command in RUN.md" in refused.stderr
    shutil.rmtree(out / "bin")
    shutil.rmtree(out / "lib")
    subprocess.run(["sh", "-c", cmd], cwd=out, check=True, env={"ANDROID_NDK_HOME": str(fake_ndk), "PATH": "/usr/bin:/bin"})
    assert (out / "model.so").is_file()
    diff = _run_with_glibc_runtime(out, glibc_runtime, mlp, tmp_path)
    print(f"android archive linked by the printed command: max |qemu - ort| = {diff:.3g}")


@pytest.mark.slow
def test_with_ndk_links_model_so(mlp, fake_ndk, glibc_runtime, tmp_path, monkeypatch):
    from edge_sparse import compiler

    monkeypatch.setenv("ANDROID_NDK_HOME", str(fake_ndk))
    out = tmp_path / "android"
    man = compiler.compile(str(mlp), "android-arm64", out, sparse="off", bundle=True, force=True, quiet=True)
    assert man["library"] == "model.so" and man["bundle"]["link_command"] is None
    assert json.loads((out / "manifest.json").read_text())["bundle"]["kind"] == "android-arm64"
    for rel in ("include/edge_sparse.hpp", "include/tvm/ffi/function.h", "src/edge-sparse-run.cpp", "RUN.md"):
        assert (out / rel).is_file(), rel
    _run_with_glibc_runtime(out, glibc_runtime, mlp, tmp_path)
