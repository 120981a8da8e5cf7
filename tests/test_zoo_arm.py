"""Issue 17: the new zoo models (PP-OCR det, silero VAD, EfficientNet-Lite0) compiled for rpi4 as self-contained
bundles, run under qemu-aarch64 with an EMPTY sysroot (``-L`` pointing at an empty directory: nothing from the host's
aarch64 libraries), matched against onnxruntime on the host.

``./run`` starts through the glibc loader shipped in ``lib/sysroot`` (its ELF interpreter path is relative to the
bundle directory), which is what makes ``adb push`` + ``adb shell ./run`` work on a phone whatever its libc.
Needs ``g++-aarch64-linux-gnu`` and ``qemu-user`` (CI installs them).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ort_run
from edge_sparse import compiler, models

TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}
EM_AARCH64 = 183


@pytest.fixture(scope="module", autouse=True)
def _tools():
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    assert not missing, f"install {' '.join(missing)} (apt) to build and emulate aarch64 bundles"


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo-cache")


def _run_standalone(bundle: Path, args, empty: Path) -> subprocess.CompletedProcess:
    """``./run ARGS`` from the bundle directory under qemu with an empty sysroot."""
    return subprocess.run(["qemu-aarch64", "-L", str(empty), "./run", *map(str, args)], cwd=bundle,
                          capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["silero-vad", "ppocr-det", "efficientnet-lite0"])
def test_zoo_model_rpi4_standalone_bundle_matches_onnxruntime(zoo_cache, tmp_path, name):
    r = models.recipes()[name]
    src = models.get(name, cache_dir=zoo_cache, quiet=True)
    bundle = tmp_path / "bundle"
    man = compiler.compile(src, "rpi4", bundle, sparse="off", bundle=True, quiet=True)   # shapes from the recipe
    assert [i["name"] for i in man["inputs"]] == list(r.input_shapes)

    # the launcher and everything it loads are aarch64 files inside the bundle, hashed in the manifest
    info = man["bundle"]["standalone"]
    assert info["launcher"] == "run" and "libc.so.6" in info["libraries"] and "libstdc++.so.6" in info["libraries"]
    for rel in ["run", *(f"{info['sysroot']}/{lib}" for lib in info["libraries"])]:
        head = (bundle / rel).read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64, rel
        assert rel in man["files"], rel

    empty = tmp_path / "empty-sysroot"
    empty.mkdir()
    x = r.sample_input(0)
    np.savez(tmp_path / "in.npz", **x)
    proc = _run_standalone(bundle, ["-i", tmp_path / "in.npz", "-o", tmp_path / "out.npz"], empty)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    ref = ort_run(src, r.onnx_feeds(0))
    for out_name, want in zip(r.output_names, ref):
        # float32, ARM kernels sum in another order than ORT's x86 ones; scaled to the output's magnitude
        np.testing.assert_allclose(got[out_name], want, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    if name == "efficientnet-lite0":
        assert int(got["logits"].argmax()) == models.zoo.IMAGENET_MILITARY_UNIFORM


@pytest.mark.slow
def test_standalone_launcher_bench_and_info(tmp_path, synthetic_models):
    bundle = tmp_path / "b"
    compiler.compile(synthetic_models["cnn"], "rpi5", bundle, sparse="off", bundle=True, quiet=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run_standalone(bundle, ["--info"], empty)
    assert proc.returncode == 0, proc.stderr
    # the runtime libraries it loaded are the bundle's own (model directory found next to ./run)
    assert f"{bundle}/lib/libtvm_runtime.so: apache-tvm 0.27.0.post1 (sha256 ok)" in proc.stdout, proc.stdout
    proc = _run_standalone(bundle, ["--bench", "3", "--warmup", "1", "--threads", "1", "--json", tmp_path / "b.json"],
                           empty)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["count"] == 3 and report["min_ms"] <= report["median_ms"]
    run_md = (bundle / "RUN.md").read_text()
    assert "adb push b /data/local/tmp/" in run_md and "./run --bench" in run_md


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mbv2_112", "effnet_56"])
def test_mobile_block_rpi4_bundle_matches_onnxruntime(tmp_path, name):
    """The mobile-CNN kernel paths on NEON (rpi4 tiles): depthwise stride 2 with its padding read in place, swish
    computed per register tile, the squeeze-excitation gate on the projection weights; run under qemu."""
    from edge_sparse.models import synthetic

    src = synthetic.save(getattr(synthetic, name)(), tmp_path / f"{name}.onnx")
    bundle = tmp_path / "bundle"
    compiler.compile(src, "rpi4", bundle, sparse="off", bundle=True, quiet=True)
    empty = tmp_path / "empty-sysroot"
    empty.mkdir()
    size, cin = (112, 16) if name.endswith("112") else (56, 24)
    x = {"x": np.random.default_rng(7).standard_normal((1, cin, size, size)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **x)
    proc = _run_standalone(bundle, ["-i", tmp_path / "in.npz", "-o", tmp_path / "out.npz"], empty)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["y"], ort_run(src, x)[0], rtol=1e-4, atol=1e-4)
