"""Bundles for aarch64 (rpi4, rpi5): runtime from the pinned wheels, prebuilt runner, C++ example, run under qemu.

Needs ``g++-aarch64-linux-gnu``, ``qemu-user`` and ``cmake`` (CI installs them) and, once, the network to fetch the
aarch64 wheels into the cache (``$EDGE_SPARSE_CACHE`` or ``~/.cache/edge-sparse``). Outputs from the emulated
aarch64 runner are compared with onnxruntime on the host: |tvm - ort| <= ATOL + RTOL * |ort| (float32; the ARM
kernels sum in a different order than ORT's x86 GEMM).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ort_run

ATOL = 1e-4
RTOL = 1e-4
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user", "cmake": "cmake"}


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    assert not missing, f"install {' '.join(missing)} (apt) to build and emulate aarch64 bundles"


def _prune_blocks(w: np.ndarray, keep: float, rng, R: int = 16) -> np.ndarray:
    """Zero whole Rx1 blocks (R output channels at one input channel), keeping a fraction ``keep``."""
    K, N = w.shape
    mask = rng.random((K, N // R)) < keep
    return (w * np.repeat(mask, R, axis=1)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A dense MLP and the same MLP with 80% of its 16x1 weight blocks zeroed (both tiny: qemu is slow)."""
    import onnx
    from onnx import numpy_helper

    from edge_sparse.models import synthetic

    root = tmp_path_factory.mktemp("bundle_models")
    dense = synthetic.mlp(seq=4, d_in=64, hidden=128, d_out=32, seed=1)
    synthetic.save(dense, root / "dense.onnx")
    sparse = onnx.ModelProto()
    sparse.CopyFrom(dense)
    rng = np.random.default_rng(7)
    for init in sparse.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(_prune_blocks(w, 0.2, rng), init.name))
    synthetic.save(sparse, root / "sparse.onnx")
    return {"dense": root / "dense.onnx", "sparse": root / "sparse.onnx"}


def _build(models, kind: str, target: str, out: Path) -> dict:
    from edge_sparse import compiler

    return compiler.compile(str(models[kind]), target, out, sparse="off" if kind == "dense" else "bsr16x1",
                            bundle=True, force=True, quiet=True)


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for target in ("rpi4", "rpi5"):
        for kind in ("dense", "sparse"):
            out[(target, kind)] = root / f"{kind}-{target}"
            _build(models, kind, target, out[(target, kind)])
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("io") / "inputs.npz"
    np.savez(path, x=x)
    return path, x


def _qemu(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*QEMU, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def _assert_close(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return float(np.abs(got - want).max())


# ---------------------------------------------------------------------------------------------- layout + manifest
@pytest.mark.slow
def test_bundle_layout_and_manifest(bundles):
    from edge_sparse.artifact import sha256_file

    root = bundles[("rpi4", "dense")]
    man = json.loads((root / "manifest.json").read_text())
    for rel in ("model.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "bin/edge-sparse-run", "RUN.md",
                "include/edge_sparse.hpp", "include/tvm/ffi/function.h", "include/dlpack/dlpack.h",
                "src/edge-sparse-run.cpp"):
        assert (root / rel).is_file(), rel
    assert os.access(root / "bin" / "edge-sparse-run", os.X_OK)
    b = man["bundle"]
    assert b["runtime"]["tvm"] == man["tvm"]["version"] == "0.27.0.post1"
    assert b["runtime"]["tvm_ffi"] == man["tvm"]["ffi_version"] == "0.1.14.post1"
    for rel, lib in b["runtime"]["libraries"].items():
        assert lib["sha256"] == sha256_file(root / rel) == man["files"][rel]["sha256"]
    elf = (root / "bin" / "edge-sparse-run").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183   # EM_AARCH64
    sizes = b["sizes"]
    assert sizes["model"] == (root / "model.so").stat().st_size
    assert sizes["runtime"] == sum((root / "lib" / n).stat().st_size for n in ("libtvm_runtime.so", "libtvm_ffi.so"))
    assert sizes["device"] == sizes["model"] + sizes["runtime"] + sizes["runner"]
    run_md = (root / "RUN.md").read_text()
    assert f"scp -r {root.name} " in run_md and "--bench" in run_md
    assert "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1" in run_md


# ---------------------------------------------------------------------------------------------- runner under qemu
@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_runner_matches_onnxruntime(bundles, models, sample, target, kind, tmp_path):
    root = bundles[(target, kind)]
    man = json.loads((root / "manifest.json").read_text())
    if kind == "sparse":
        assert man["layers"] and all(l["format"] == "bsr16x1" and l["kernel"].startswith("bsr")
                                     for l in man["layers"]), man["layers"]
    inputs, x = sample
    out = tmp_path / "outputs.npz"
    proc = _qemu([root / "bin" / "edge-sparse-run", root, "-i", inputs, "-o", out])
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)["y"]
    (want,) = ort_run(models[kind], {"x": x})
    diff = _assert_close(got, want)
    print(f"{target} {kind}: max |qemu runner - ort| = {diff:.3g}")


@pytest.mark.slow
def test_runner_single_npy_io_and_bench(bundles, models, sample, tmp_path):
    root = bundles[("rpi5", "dense")]
    _, x = sample
    np.save(tmp_path / "x.npy", x)
    proc = _qemu([root / "bin" / "edge-sparse-run", "-i", f"x={tmp_path / 'x.npy'}", "-o", tmp_path / "y.npy",
                  "--bench", "5", "--warmup", "1", "--threads", "1", "--json", tmp_path / "bench.json"])
    # (MODEL_DIR defaults to the bundle root, the directory above bin/)
    assert proc.returncode == 0, proc.stderr
    _assert_close(np.load(tmp_path / "y.npy"), ort_run(models["dense"], {"x": x})[0])
    stats = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line and not line.startswith("first"))
    assert stats["count"] == "5" and stats["threads"] == "1"
    assert float(stats["median"].split()[0]) > 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["count"] == 5 and report["threads"] == 1 and report["model"] == str(root)
    assert report["min_ms"] <= report["median_ms"] <= report["max_ms"]


@pytest.mark.slow
def test_runner_rejects_bad_input_clearly(bundles, tmp_path):
    root = bundles[("rpi4", "dense")]
    np.savez(tmp_path / "wrong.npz", x=np.zeros((1, 4, 65), np.float32))
    proc = _qemu([root / "bin" / "edge-sparse-run", root, "-i", tmp_path / "wrong.npz"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: " + f"{tmp_path / 'wrong.npz'}:x holds float32 [1, 4, 65]; input 'x' needs float32 [1, 4, 64]"


# ---------------------------------------------------------------------------------------------- integrity checks
@pytest.mark.slow
def test_runner_refuses_modified_model(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles[("rpi4", "dense")], copy)
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")
    proc = _qemu([copy / "bin" / "edge-sparse-run", "--info"])
    assert proc.returncode == 2
    assert "model.so does not match its sha256 in manifest.json" in proc.stderr


@pytest.mark.slow
def test_runner_refuses_other_runtime_version(bundles, tmp_path):
    """libtvm_ffi.so of apache-tvm-ffi 0.1.15.post1 (the version that crashes TVM 0.27's JSON paths) in place of
    0.1.14.post1: the runner names both versions and stops before loading the model."""
    from edge_sparse.bundle import runtime_files

    other = runtime_files("0.27.0.post1", "0.1.15.post1", quiet=True)
    copy = tmp_path / "b"
    shutil.copytree(bundles[("rpi4", "dense")], copy)
    shutil.copy2(other.lib / "libtvm_ffi.so", copy / "lib" / "libtvm_ffi.so")
    proc = _qemu([copy / "bin" / "edge-sparse-run", "--info"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not apache-tvm-ffi 0.1.14.post1's libtvm_ffi.so" in proc.stderr, proc.stderr
    ok = _qemu([bundles[("rpi4", "dense")] / "bin" / "edge-sparse-run", "--info"])
    assert ok.returncode == 0 and "apache-tvm-ffi 0.1.14.post1 (sha256 ok)" in ok.stdout


# ---------------------------------------------------------------------------------------------- C++ example
@pytest.mark.slow
def test_cpp_example_cross_built_runs_under_qemu(bundles, models, sample, tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "cpp"
    root = bundles[("rpi5", "sparse")]
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", example, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_TOOLCHAIN_FILE={example / 'cmake' / 'aarch64-linux-gnu.cmake'}",
                    f"-DEDGE_SPARSE_BUNDLE={root}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build], check=True, capture_output=True)
    inputs, x = sample
    proc = _qemu([build / "edge_sparse_example", root, inputs, tmp_path / "out.npz"])
    assert proc.returncode == 0, proc.stderr
    assert "expected error: unknown input 'no_such_input'; the model's inputs are: x" in proc.stdout
    diff = _assert_close(np.load(tmp_path / "out.npz")["y"], ort_run(models["sparse"], {"x": x})[0])
    print(f"C++ example rpi5 sparse: max |qemu - ort| = {diff:.3g}")
