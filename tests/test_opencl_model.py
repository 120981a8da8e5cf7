"""Whole models for adreno/mali: every OpenCL kernel (TVM's dense ones and our sparse ones) replayed in Relax call
order on PoCL, compared with onnxruntime on the same inputs (tolerance: max abs error <= 1e-4 * max |ref|).
Also the check-opencl CLI and the OpenCL family's export.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_sparse.targets.opencl import check as oc
from conftest import invoke

REL_TOL = 1e-4


def _prune(model: onnx.ModelProto, R: int, sparsity: float, seed: int = 0) -> onnx.ModelProto:
    """Zero a fraction of Rx1 blocks (R output channels at one input channel) of every MatMul/Gemm/1x1-conv weight."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:                                  # MatMul weight [K, N] (Gemm here is transB=0 too)
            K, N = w.shape
            keep = np.repeat(rng.random((K, -(-N // R))) >= sparsity, R, axis=1)[:, :N]
        elif w.ndim == 4 and w.shape[2:] == (1, 1):      # conv [Cout, Cin, 1, 1]
            cout, cin = w.shape[:2]
            keep = np.repeat(rng.random((cin, -(-cout // R))) >= sparsity, R, axis=1)[:, :cout].T[:, :, None, None]
        else:
            continue
        init.CopyFrom(numpy_helper.from_array((w * keep).astype(np.float32), init.name))
    return m


@pytest.fixture(scope="module")
def pruned_models(tmp_path_factory):
    from edge_sparse.models import synthetic

    d = tmp_path_factory.mktemp("opencl_models")
    built = {
        "mlp_gemm": _prune(synthetic.mlp(batch=1, seq=16, d_in=64, hidden=192, d_out=48, layers=2), 4, 0.8),
        "mlp_gemv": _prune(synthetic.mlp(batch=1, seq=1, d_in=96, hidden=256, d_out=40, layers=1), 16, 0.9),
        "cnn": _prune(synthetic.cnn(size=16, width=32), 8, 0.8),
        "transformer": _prune(synthetic.transformer_block(seq=8), 4, 0.8),
    }
    paths = {}
    for name, m in built.items():
        paths[name] = d / f"{name}.onnx"
        onnx.save(m, paths[name])
    return paths


def _assert_close(report):
    assert report["outputs"], report
    for o in report["outputs"]:
        assert o["finite"], o
        assert o["max_rel_err"] <= REL_TOL, o


def _sparse_formats(report):
    return [x["format"] for x in report["sparse_layers"] if x.get("format") not in (None, "dense")]


@pytest.mark.parametrize("target", ["mali", "adreno"])
@pytest.mark.parametrize("sparse", ["bsr4x1", "csr", "bsr16x1"])
def test_pruned_mlp_gemm_all_kernels_match_onnxruntime(pruned_models, target, sparse):
    report = oc.check_model(pruned_models["mlp_gemm"], target, sparse=sparse)
    assert _sparse_formats(report) == [sparse] * 4          # 2 layers x (up + down projection)
    assert report["launches"] >= 4
    _assert_close(report)


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_pruned_mlp_gemv_auto_matches_onnxruntime(pruned_models, target):
    report = oc.check_model(pruned_models["mlp_gemv"], target, sparse="auto")
    assert _sparse_formats(report), "the cost model should pick a sparse kernel at 90% 16x1 block sparsity"
    _assert_close(report)


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_pruned_cnn_sparse_pointwise_convs_match_onnxruntime(pruned_models, target):
    report = oc.check_model(pruned_models["cnn"], target, sparse="bsr8x1")
    assert sum(x.get("kind") == "conv1x1" and x.get("format") == "bsr8x1" for x in report["sparse_layers"]) == 4, \
        report["sparse_layers"]
    _assert_close(report)


@pytest.mark.slow
def test_pruned_transformer_block_matches_onnxruntime(pruned_models):
    report = oc.check_model(pruned_models["transformer"], "adreno", sparse="bsr4x1")
    assert _sparse_formats(report)
    _assert_close(report)


def test_dense_model_plan_replays_after_save(pruned_models, tmp_path):
    report = oc.check_model(pruned_models["mlp_gemm"], "mali", sparse="off", plan_dir=tmp_path / "plan")
    _assert_close(report)
    plan = oc.LaunchPlan.load(tmp_path / "plan")
    assert len(plan.launches) == report["launches"] and "__kernel" in plan.source


def _squeeze_excitation(C=8, H=12, W=96, Cr=2) -> onnx.ModelProto:
    """x * hardsigmoid(conv(relu(conv(avgpool(x))))): the MobileNetV3 block of PP-OCR cls, shapes from that model."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (Cr, C, 1, 1)), ("b1", (Cr,)), ("w2", (C, Cr, 1, 1)), ("b2", (C,))]]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Conv", ["p", "w1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
             helper.make_node("HardSigmoid", ["c2"], ["s"], alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    g = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, W])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_squeeze_excitation_block_matches_onnxruntime(tmp_path, target):
    """Regression: dlight's gpu GEMV rule on the Adreno pipeline wrote 1/16 of this block's output (NaN-poisoned
    elements stayed NaN in the replay); targets.opencl keeps that rule out of the Adreno pipeline."""
    path = tmp_path / "se.onnx"
    onnx.save(_squeeze_excitation(), path)
    _assert_close(oc.check_model(path, target, sparse="off"))


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_check_opencl_model_and_artifact(pruned_models, tmp_path):
    r = invoke(["check-opencl", pruned_models["mlp_gemm"], "--target", "mali", "--sparse", "bsr4x1", "-q"])
    assert r.exit_code == 0, r.output
    assert "ok" in r.output and "4 sparse layers" in r.output
    art = tmp_path / "art"
    r = invoke(["compile", pruned_models["mlp_gemm"], "-t", "mali", "-o", art, "--sparse", "bsr4x1", "-q"])
    assert r.exit_code == 0, r.output
    r = invoke(["check-opencl", art, "--model", pruned_models["mlp_gemm"], "--json", "-q"])
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads(r.output)
    assert rep["ok"] and rep["target"] == "mali" and len(_sparse_formats(rep)) == 4


def test_cli_check_opencl_bad_input(pruned_models, tmp_path):
    r = invoke(["check-opencl", tmp_path / "missing.onnx"])
    assert r.exit_code == 2 and "not found" in r.output
    r = invoke(["check-opencl", pruned_models["mlp_gemm"], "--target", "rpi4"])
    assert r.exit_code == 2 and "not an OpenCL target" in r.output
    art = tmp_path / "art"
    assert invoke(["compile", pruned_models["mlp_gemv"], "-t", "mali", "-o", art, "--sparse", "off", "-q"]).exit_code == 0
    r = invoke(["check-opencl", art])
    assert r.exit_code == 2 and "--model" in r.output
    r = invoke(["check-opencl", art, "--model", pruned_models["mlp_gemm"]])
    assert r.exit_code == 2 and "sha256" in r.output
    r = invoke(["check-opencl", pruned_models["mlp_gemm"], "--device", "no-such-gpu", "--sparse", "off"])
    assert r.exit_code == 2 and "no OpenCL device" in r.output


def test_cli_check_opencl_reports_mismatch(pruned_models, monkeypatch):
    """A wrong kernel result makes the command fail (exit 1): the check is not vacuous."""
    real_run = oc.Replayer.run

    def corrupted(self, inputs):
        return {k: v + 1.0 for k, v in real_run(self, inputs).items()}

    monkeypatch.setattr(oc.Replayer, "run", corrupted)
    r = invoke(["check-opencl", pruned_models["mlp_gemv"], "--target", "mali", "-q"])
    assert r.exit_code == 1 and "MISMATCH" in r.output


# --------------------------------------------------------------------------------------------------- export
def test_adreno_export_without_ndk_writes_objects_and_link_command(pruned_models, tmp_path, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    r = invoke(["compile", pruned_models["mlp_gemv"], "-t", "adreno", "-o", tmp_path / "a", "--sparse", "bsr16x1", "-q"])
    assert r.exit_code == 0, r.output
    import json
    import tarfile

    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["library"] == "model.tar"
    with tarfile.open(tmp_path / "a" / "model.tar") as tf:
        assert any(n.endswith(".o") for n in tf.getnames())
    assert "aarch64-linux-android28-clang++" in (tmp_path / "a" / "LINK.txt").read_text()


def test_mali_export_is_aarch64_with_opencl_source(pruned_models, tmp_path):
    r = invoke(["compile", pruned_models["mlp_gemv"], "-t", "mali", "-o", tmp_path / "m", "--sparse", "bsr16x1", "-q"])
    assert r.exit_code == 0, r.output
    lib = (tmp_path / "m" / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183      # EM_AARCH64
    assert b"__kernel" in lib                                                         # OpenCL C embedded
