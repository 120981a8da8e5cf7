"""``quantize``: onnxruntime int8 quantization (static QDQ / dynamic) of float and pruned models: the written model
is what onnxruntime.quantization produces, pruned zeros stay exactly zero, metadata and the accuracy report are
recomputed here against onnxruntime, and bad input follows the CLI contract (one line, exit 2, nothing written)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edge_sparse import pruning, quantization
from edge_sparse.models import synthetic
from edge_sparse.passes import calibrate

from conftest import invoke, ort_run


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    model = d / "mlp.onnx"
    synthetic.save(synthetic.mlp(batch=1, seq=8, d_in=64, hidden=128, d_out=32, layers=1), model)
    rng = np.random.default_rng(1)
    calib = d / "calib.npz"
    np.savez(calib, x=rng.standard_normal((24, 8, 64)).astype(np.float32))
    return d, model, calib


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_matches_onnxruntime_quantizer(mlp_files, scheme, per_channel):
    d, model, calib = mlp_files
    out = d / f"q_{scheme}_{per_channel}.onnx"
    res = quantization.quantize(model, out, calib=calib, scheme=scheme, per_channel=per_channel, force=True,
                                quiet=True)
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    if scheme == "static":
        assert ops.count("DequantizeLinear") >= 4 and "QuantizeLinear" in ops and "MatMulInteger" not in ops
    else:
        assert ops.count("MatMulInteger") == 2 and "DynamicQuantizeLinear" in ops
    # symmetric int8 weights: every weight zero point is 0; per-channel scales have one entry per output channel
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None \
                and inits[node.input[0]].dtype == np.int8:
            assert not np.any(inits[node.input[2]]) if len(node.input) > 2 else True
            assert inits[node.input[1]].size == (inits[node.input[0]].shape[1] if per_channel else 1)
        if node.op_type == "MatMulInteger":
            assert inits[node.input[1]].dtype == np.int8
            if len(node.input) > 3:
                assert not np.any(inits[node.input[3]])
    meta = json.loads({p.key: p.value for p in q.metadata_props}[quantization.METADATA_KEY])
    assert meta["scheme"] == scheme and meta["per_channel"] is per_channel and meta["layers"] == 2
    # the report's held-out accuracy is what onnxruntime gives on those samples
    data = dict(np.load(calib))
    _, held = calibrate.split_holdout(data, calibrate.input_specs(onnx.load(str(model))), 0.25)
    ref = np.concatenate([ort_run(model, {"x": held["x"][i:i + 1]})[0] for i in range(len(held["x"]))])
    got = np.concatenate([ort_run(out, {"x": held["x"][i:i + 1]})[0] for i in range(len(held["x"]))])
    cos = np.sum(ref.reshape(len(ref), -1) * got.reshape(len(got), -1), 1) / (
        np.linalg.norm(ref.reshape(len(ref), -1), axis=1) * np.linalg.norm(got.reshape(len(got), -1), axis=1))
    acc = res.report["accuracy"]["holdout"]
    assert acc["samples"] == len(held["x"]) == 6
    assert acc["outputs"]["y"]["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert 0.99 < acc["outputs"]["y"]["cosine_mean"] < 1.0        # int8 changes the output, a little
    # the held-out evaluation (no --eval: the holdout part, label-free) scores the float and the int8 model side by side
    ev = res.report["accuracy"]["eval"]
    assert ev["reference"] == "float" and ev["data"]["origin"] == "held-out part of --calib (--holdout)"
    assert ev["int8"]["cosine"] == pytest.approx(float(cos.mean()), abs=1e-6) and ev["float"]["cosine"] == 1.0


def test_prune_then_quantize_keeps_zeros(mlp_files):
    d, model, calib = mlp_files
    pruned = d / "pruned.onnx"
    pruning.prune(model, pruned, sparsity=0.8, pattern="16x1", calib=calib, default_skips=False, force=True,
                  quiet=True)
    out = d / "pruned_q.onnx"
    res = quantization.quantize(pruned, out, calib=calib, scheme="static", per_channel=True, force=True, quiet=True)
    p = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(pruned)).graph.initializer}
    q = onnx.load(str(out))
    weights = quantization.quantized_weights(q)
    assert len(weights) == 2
    for name, wq in weights.items():
        wf = p[name.removesuffix("_quantized")]
        assert np.all(wq[wf == 0] == 0)                            # every pruned weight stays exactly zero
        assert np.mean(wq[wf != 0] == 0) < 0.01                    # (a few tiny survivors may round to zero)
    sp = res.report["sparsity"]
    assert sp["int8_zeros"] >= sp["float_zeros"] > 0.75 * sp["float_weights"]
    keys = {m.key for m in q.metadata_props}
    assert {"edge_sparse.pruning", quantization.METADATA_KEY} <= keys         # both stages recorded


def test_cli_quantize_and_errors(mlp_files):
    d, model, calib = mlp_files
    out = d / "cli_q.onnx"
    r = invoke(["quantize", model, "-o", out, "--calib", calib, "--scheme", "dynamic", "--per-channel", "--force"])
    assert r.exit_code == 0, r.output
    assert "int8 dynamic" in r.output and "holdout" in r.output
    rep = json.loads((d / "cli_q.report.json").read_text())
    assert rep["quantization"]["format"] == "QOperator"
    # --eval: the float and the int8 model on those samples; every calibration sample sets ranges (no holdout)
    held = d / "held.npz"
    x = np.random.default_rng(5).standard_normal((4, *np.load(calib)["x"].shape[1:])).astype(np.float32)
    np.savez(held, x=x)
    out2 = d / "cli_q2.onnx"
    r = invoke(["quantize", model, "-o", out2, "--calib", calib, "--eval", held, "--force"])
    assert r.exit_code == 0, r.output
    rep = json.loads((d / "cli_q2.report.json").read_text())
    ref = np.concatenate([ort_run(model, {"x": x[i:i + 1]})[0] for i in range(4)]).reshape(4, -1)
    got = np.concatenate([ort_run(out2, {"x": x[i:i + 1]})[0] for i in range(4)]).reshape(4, -1)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert rep["accuracy"]["eval"]["int8"]["cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert "holdout" not in rep["accuracy"] and rep["calibration"]["holdout_samples"] == 0
    assert f"cosine: int8 {cos.mean():.4g}, float 1 on 4 samples (--eval held.npz)" in r.output.splitlines()[0]
    # existing output without --force; quantizing twice; missing calibration; a bad scheme
    for args, needle in [
        (["quantize", model, "-o", out, "--calib", calib], "already exists"),
        (["quantize", out, "-o", d / "twice.onnx", "--calib", calib], "already quantized"),
        (["quantize", model, "-o", d / "nocal.onnx"], "--calib"),
        (["quantize", model, "-o", d / "bad.onnx", "--calib", calib, "--scheme", "weird"], "weird"),
        (["quantize", model, "-o", model, "--calib", calib, "--force"], "is the input"),
    ]:
        r = invoke(args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output
    assert not (d / "twice.onnx").exists() and not (d / "bad.onnx").exists()


def test_quantize_then_prune_static(mlp_files):
    """quantize (static QDQ) then prune: the pruned model is still the same QDQ graph, int8 weights zeroed in
    blocks, kept weights unchanged, and pruning facts recorded next to the quantization facts."""
    d, model, calib = mlp_files
    q = d / "q_first.onnx"
    quantization.quantize(model, q, calib=calib, scheme="static", per_channel=True, force=True, quiet=True)
    out = d / "q_then_p.onnx"
    res = pruning.prune(q, out, sparsity=0.5, pattern="16x4", method="magnitude", calib=calib, default_skips=False,
                        force=True, quiet=True)
    before, after = onnx.load(str(q)), onnx.load(str(out))
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node] or \
        sorted(n.op_type for n in before.graph.node) == sorted(n.op_type for n in after.graph.node)
    wb, wa = quantization.quantized_weights(before), quantization.quantized_weights(after)
    assert set(wb) == set(wa) and len(wa) == 2
    for name in wa:
        kept = wa[name] != 0
        np.testing.assert_array_equal(wa[name][kept], wb[name][kept])          # survivors keep their int8 value
        assert 0.45 < np.mean(wa[name] == 0) < 0.6
    keys = {m.key for m in after.metadata_props}
    assert {"edge_sparse.pruning", quantization.METADATA_KEY} <= keys
    # the report's accuracy compares against the quantized input, run by onnxruntime
    x = np.load(calib)["x"][:1]
    assert res.report["accuracy"]["calibration"]["samples"] > 0
    assert np.isfinite(ort_run(out, {"x": x})[0]).all()
    # a dynamic-quantized model is refused with a clear line
    qd = d / "qd_first.onnx"
    quantization.quantize(model, qd, calib=calib, scheme="dynamic", force=True, quiet=True)
    r = invoke(["prune", qd, "-o", d / "qd_p.onnx", "-s", "0.5", "--calib", calib])
    assert r.exit_code == 2 and "prune the float model first" in r.output and not (d / "qd_p.onnx").exists()
