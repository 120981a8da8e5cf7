"""The sparsify Relax pass end to end: pruned ONNX -> from_onnx -> sparsify -> family build -> VM, vs onnxruntime.

Property-based over layer kinds (MatMul 2-D/3-D, Gemm transB, 1x1 Conv), bias, ReLU / Erf-GELU epilogues, formats,
sparsities (0% and 100% included) and batch sizes. Tolerance: |tvm - ort| <= 1e-4 * (1 + max|ort|).
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper

from edge_sparse import targets
from edge_sparse.errors import UserError
from edge_sparse import formats as F
from edge_sparse.passes.sparsify import find_layers, sparsify

ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from tests.test_sparse_kernels import prune  # noqa: E402

HOST = targets.get("host")


def _layer_nodes(kind: str, inp: str, out: str, K: int, N: int, bias: bool, act: str | None, fmt: str,
                 sparsity: float, rng, tag: str, spatial=None):
    """ONNX nodes + initializers of one layer act(inp @ W + b); the weight pruned in ``fmt``."""
    w = prune(rng.standard_normal((K, N)).astype(np.float32), fmt, sparsity, rng)       # [K, N]
    b = rng.standard_normal(N).astype(np.float32)
    nodes, inits = [], {}
    y = f"{tag}_lin"
    if kind == "matmul":
        inits[f"{tag}_W"] = w
        nodes.append(oh.make_node("MatMul", [inp, f"{tag}_W"], [y]))
        if bias:
            inits[f"{tag}_B"] = b
            nodes.append(oh.make_node("Add", [y, f"{tag}_B"], [f"{tag}_biased"]))
            y = f"{tag}_biased"
    elif kind == "gemm":
        inits[f"{tag}_W"] = np.ascontiguousarray(w.T)                                  # transB: [N, K]
        ins = [inp, f"{tag}_W"] + ([f"{tag}_B"] if bias else [])
        if bias:
            inits[f"{tag}_B"] = b
        nodes.append(oh.make_node("Gemm", ins, [y], transB=1))
    else:  # conv1x1
        inits[f"{tag}_W"] = np.ascontiguousarray(w.T).reshape(N, K, 1, 1)
        ins = [inp, f"{tag}_W"] + ([f"{tag}_B"] if bias else [])
        if bias:
            inits[f"{tag}_B"] = b
        nodes.append(oh.make_node("Conv", ins, [y], kernel_shape=[1, 1]))
    if act == "relu":
        nodes.append(oh.make_node("Relu", [y], [out]))
    elif act and act.startswith("gelu"):   # the Erf pattern of BERT-style exports, in its three associations
        inits.update({f"{tag}_s2": np.array(1.4142135, np.float32), f"{tag}_one": np.array(1.0, np.float32),
                      f"{tag}_half": np.array(0.5, np.float32)})
        nodes += [oh.make_node("Div", [y, f"{tag}_s2"], [f"{tag}_d"]), oh.make_node("Erf", [f"{tag}_d"], [f"{tag}_e"]),
                  oh.make_node("Add", [f"{tag}_e", f"{tag}_one"], [f"{tag}_a"])]
        if act == "gelu":          # (x * a) * 0.5
            nodes += [oh.make_node("Mul", [y, f"{tag}_a"], [f"{tag}_m"]),
                      oh.make_node("Mul", [f"{tag}_m", f"{tag}_half"], [out])]
        elif act == "gelu_b":      # x * (0.5 * a)   (the MiniLM export)
            nodes += [oh.make_node("Mul", [f"{tag}_half", f"{tag}_a"], [f"{tag}_m"]),
                      oh.make_node("Mul", [y, f"{tag}_m"], [out])]
        else:                      # (x * 0.5) * a
            nodes += [oh.make_node("Mul", [y, f"{tag}_half"], [f"{tag}_m"]),
                      oh.make_node("Mul", [f"{tag}_m", f"{tag}_a"], [out])]
    else:
        nodes.append(oh.make_node("Identity", [y], [out]))
    return nodes, inits


def build_model(kind: str, x_shape, dims, bias, acts, fmt, sparsity, seed):
    """A chain of layers of one kind: x -> layer(dims[0] -> dims[1]) -> ... ; returns (ModelProto, weight names)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {}
    cur = "x"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nn_, ii = _layer_nodes(kind, cur, out, k, n, bias, acts[i % len(acts)], fmt, sparsity, rng, f"l{i}")
        nodes += nn_
        inits.update(ii)
        cur = out
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    names = {hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest(): k
             for k, v in sorted(inits.items(), reverse=True) if v.ndim >= 2}
    return model, names


def compile_and_compare(model, x, mode, names, measure=False):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    mod = from_onnx(model, {"x": list(x.shape)}, keep_params_in_input=False)
    mod2, layers = sparsify(mod, HOST, mode=mode, measure=measure, weight_names=names)
    ex = targets.family_of(HOST).build(mod2, HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    tol = 1e-4 * (1 + float(np.abs(ref).max()))
    assert out.shape == ref.shape
    assert float(np.abs(out - ref).max()) <= tol
    return mod2, layers


def _count_call_tir_sparse(mod) -> int:
    """call_tir calls of sparse kernels in main (identical kernels are one PrimFunc, called several times)."""
    return len(re.findall(r"R\.call_tir\((?:cls\.)?sparse_", mod["main"].script()))


KINDS = st.sampled_from(["matmul", "gemm", "conv1x1"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=KINDS, batch=st.sampled_from([1, 2, 3, 17, 64]), dims=st.lists(st.integers(1, 48), min_size=2, max_size=3),
       bias=st.booleans(), acts=st.lists(st.sampled_from([None, "relu", "gelu", "gelu_b", "gelu_c"]), min_size=1,
                                         max_size=2),
       fmt=st.sampled_from(F.FORMATS), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), seq3d=st.booleans(),
       seed=st.integers(0, 2**16))
def test_forced_format_matches_onnxruntime(kind, batch, dims, bias, acts, fmt, sparsity, seq3d, seed):
    if kind == "conv1x1" and fmt == "2:4":
        fmt = "bsr4x1"   # no 2:4 conv kernel on CPU (such layers stay dense; covered below)
    rng = np.random.default_rng(seed)
    if kind == "conv1x1":
        x_shape = (1 if batch > 3 else batch, dims[0], 3, batch if batch > 3 else 5)
    elif kind == "matmul" and seq3d:
        x_shape = (2, batch, dims[0])
    else:
        x_shape = (batch, dims[0])
    model, names = build_model(kind, x_shape, dims, bias, acts, fmt, sparsity, seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    mod2, layers = compile_and_compare(model, x, fmt, names)
    assert len(layers) == len(dims) - 1
    assert all(entry["format"] == fmt for entry in layers), [e["reason"] for e in layers]
    expected = [f"l{i}_W" for i in range(len(dims) - 1)]
    if len(set(names)) == len(expected):      # distinct weights: each layer carries its own initializer's name
        assert [entry["name"] for entry in layers] == expected
    else:                                     # identical weights (tiny or all-zero) hash alike
        assert {entry["name"] for entry in layers} <= set(expected)
    assert _count_call_tir_sparse(mod2) == len(layers)
    assert [e["activation"] for e in layers] == [
        (acts[i % len(acts)] or "")[:4] or None for i in range(len(dims) - 1)]
    # the fused epilogue leaves no dense matmul/conv behind
    assert "R.matmul" not in mod2.script() and "R.nn.conv2d" not in mod2.script()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=KINDS, fmt=st.sampled_from(["bsr16x1", "bsr8x1"]), batch=st.sampled_from([1, 32]),
       seed=st.integers(0, 2**16))
def test_auto_matches_onnxruntime(kind, fmt, batch, seed):
    """auto on a mix of a highly sparse and a dense layer: output matches, choices are reported for both."""
    rng = np.random.default_rng(seed)
    x_shape = (batch, 128) if kind != "conv1x1" else (1, 128, 4, 8)
    model, names = build_model(kind, x_shape, [128, 256, 128], True, ["relu", None], fmt, 0.0, seed)
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits["l0_W"])
    w = w * (rng.random(w.shape) < 0.0)   # first layer 100% sparse
    inits["l0_W"].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "l0_W"))
    x = rng.standard_normal(x_shape).astype(np.float32)
    _, layers = compile_and_compare(model, x, "auto", {})
    assert len(layers) == 2
    assert layers[0]["format"] != "dense" and layers[0]["block_sparsity"]["bsr16x1"] == 1.0
    assert layers[1]["format"] == "dense" and layers[1]["reason"]
    assert layers[0]["est_us_sparse"] < layers[0]["est_us_dense"]


def test_cost_model_picks_blocks_over_csr_and_dense_at_zero():
    """768x3072 at M=1: 90% in 16x1 blocks -> bsr16x1; the unpruned weight -> dense."""
    rng = np.random.default_rng(0)
    for sparsity, expect in ((0.9, "bsr16x1"), (0.0, "dense")):
        model, _ = build_model("matmul", (1, 768), [768, 3072], True, [None], "bsr16x1", sparsity, 0)
        mod = from_onnx(model, {"x": [1, 768]}, keep_params_in_input=False)
        _, layers = sparsify(mod, HOST, mode="auto")
        assert layers[0]["format"] == expect, layers[0]
    del rng


def test_measure_times_candidates():
    model, names = build_model("matmul", (4, 256), [256, 256], True, ["relu"], "bsr16x1", 0.9, 1)
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    _, layers = compile_and_compare(model, x, "auto", names, measure=True)
    entry = layers[0]
    assert entry["measured"] is True
    assert "dense" in entry["measured_us"] and "bsr16x1" in entry["measured_us"]
    assert all(v > 0 for v in entry["measured_us"].values())


def test_2_4_rejected_weight_stays_dense_and_conv_2_4_runs_as_channels_last_matmul():
    model, _ = build_model("matmul", (3, 32), [32, 32], True, [None], "bsr16x1", 0.0, 2)   # dense weight
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    _, layers = compile_and_compare(model, x, "2:4", {})
    assert layers[0]["format"] == "dense" and "2:4" in layers[0]["reason"]
    # the CPU family runs convs channels-last, so a pruned 1x1 conv is a matmul over its 16 pixels: 2:4 has a kernel
    model, _ = build_model("conv1x1", (1, 32, 4, 4), [32, 16], True, [None], "2:4", 0.5, 2)
    x = np.random.default_rng(2).standard_normal((1, 32, 4, 4)).astype(np.float32)
    _, layers = compile_and_compare(model, x, "2:4", {})
    assert layers[0]["format"] == "2:4" and layers[0]["kernel"] == "nm_gemm_t", layers[0]


def test_off_and_bad_mode():
    model, _ = build_model("matmul", (2, 16), [16, 16], False, [None], "csr", 0.5, 3)
    mod = from_onnx(model, {"x": [2, 16]}, keep_params_in_input=False)
    same, layers = sparsify(mod, HOST, mode="off")
    tvm.ir.assert_structural_equal(same, mod)
    assert layers == []
    with pytest.raises(UserError):
        sparsify(mod, HOST, mode="bsr3x1")


def test_non_constant_and_strided_layers_are_not_candidates():
    """matmul of two activations and a strided 1x1 conv are left alone."""
    rng = np.random.default_rng(4)
    wc = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "x2"], ["p"]), oh.make_node("Conv", ["c", "Wc"], ["q"], strides=[2, 2])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6]),
         oh.make_tensor_value_info("x2", TensorProto.FLOAT, [6, 5]),
         oh.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 6, 6])],
        [oh.make_tensor_value_info("p", TensorProto.FLOAT, None), oh.make_tensor_value_info("q", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(wc, "Wc")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    mod = from_onnx(model, {"x": [4, 6], "x2": [6, 5], "c": [1, 4, 6, 6]}, keep_params_in_input=False)
    assert find_layers(mod["main"]) == []


def test_cross_target_sparsify_builds_for_rpi4():
    """The pass with an AArch64 preset: NEON-sized kernels, the whole module compiles for the Pi."""
    preset = targets.get("rpi4")
    model, _ = build_model("matmul", (2, 64, 96), [96, 192, 96], True, ["gelu", None], "bsr16x1", 0.8, 5)
    mod = from_onnx(model, {"x": [2, 64, 96]}, keep_params_in_input=False)
    mod2, layers = sparsify(mod, preset, mode="bsr16x1")
    assert [e["format"] for e in layers] == ["bsr16x1", "bsr16x1"]
    ex = targets.family_of(preset).build(mod2, preset)
    assert ex is not None


def _pruned_mlp(**dims):
    """The synthetic MLP with every weight pruned to 90% in 16x1 blocks."""
    from edge_sparse.models import synthetic

    model = synthetic.mlp(**dims)
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(prune(w.astype(np.float32), "bsr16x1", 0.9, rng), init.name))
    return model


def test_compile_api_fuses_relu_behind_reshape(tmp_path):
    """Through edge_sparse.compiler.compile (intake folds MatMul+Add into Reshape-Gemm-Reshape before the ReLU):
    the ReLU still lands in the sparse kernel's epilogue, the manifest reports it, and the artifact matches ORT."""
    from edge_sparse import compiler, runtime
    from edge_sparse.models import synthetic

    model = _pruned_mlp(seq=16, d_in=64, hidden=128, d_out=64)
    path = tmp_path / "mlp.onnx"
    synthetic.save(model, path)
    man = compiler.compile(str(path), "host", tmp_path / "art", sparse="bsr16x1", quiet=True)
    assert [e["format"] for e in man["layers"]] == ["bsr16x1", "bsr16x1"]
    assert [e["activation"] for e in man["layers"]] == ["relu", None]
    assert all(e["bias"] for e in man["layers"])
    m = runtime.load(tmp_path / "art")
    inputs = m.make_inputs(seed=1)
    out = list(m.run(inputs).values())[0]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    assert float(np.abs(out - ref).max()) <= 1e-4 * (1 + float(np.abs(ref).max()))

    # compile -v: one line per layer with the chosen format, kernel and the estimates behind the choice
    from click.testing import CliRunner

    from edge_sparse.cli import cli

    path = tmp_path / "mlp-big.onnx"                  # big enough for auto to choose BSR
    synthetic.save(_pruned_mlp(seq=16, d_in=384, hidden=1536, d_out=384), path)
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "art2"), "--sparse", "auto", "-v"])
    assert res.exit_code == 0, res.output
    layers = json.loads((tmp_path / "art2" / "manifest.json").read_text())["layers"]
    rows = [line.split() for line in res.output.splitlines() if line.split()[:1] and line.split()[0] in
            {e["name"] for e in layers}]
    assert len(rows) == len(layers) == 2
    for row, layer in zip(rows, layers):
        assert row[2] == "float32" and row[5] == layer["format"] and row[6] == layer["kernel"]   # after the dtype
        dense_us, chosen_us = float(row[7]), float(row[8])
        if layer["format"] == "dense":
            assert chosen_us == dense_us and len(row) > 9      # and the reason it stayed dense
        else:
            assert dense_us > chosen_us > 0                 # chosen only because estimated faster than dense
    assert any(e["format"] != "dense" for e in layers)


ARM_CASES = [("rpi4", "bsr16x1", 1), ("rpi4", "csr", 1), ("rpi4", "2:4", 1), ("rpi5", "bsr8x1", 1),
             ("rpi4", "csr", 20), ("rpi5", "2:4", 20), ("rpi4", "bsr4x1", 20), ("rpi5", "bsr16x1", 20)]


@pytest.mark.slow
@pytest.mark.parametrize("target,fmt,seq", ARM_CASES)
def test_arm_kernels_match_onnxruntime_under_qemu(target, fmt, seq, tmp_path):
    """Every AArch64 kernel kind (GEMV, rows, transposed GEMM, 2:4 select/gather; NEON tiles) computes the right
    thing: the artifact bundle's runner under qemu-aarch64 vs onnxruntime on the same pruned MLP."""
    import shutil
    import subprocess

    from edge_sparse import compiler
    from edge_sparse.models import synthetic

    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (CI installs g++-aarch64-linux-gnu and qemu-user)")
    model = synthetic.mlp(seq=seq, d_in=72, hidden=136, d_out=40, seed=2)   # 72, 136, 40: no 16-divisible dims
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(prune(w.astype(np.float32), fmt, 0.7, rng), init.name))
    path = tmp_path / "mlp.onnx"
    synthetic.save(model, path)
    art = tmp_path / "art"
    man = compiler.compile(str(path), target, art, sparse=fmt, bundle=True, quiet=True)
    assert [e["format"] for e in man["layers"]] == [fmt, fmt]
    x = np.random.default_rng(4).standard_normal((1, seq, 72)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(art / "bin" / "edge-sparse-run"),
                           str(art), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")["y"]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-4 * (1 + float(np.abs(ref).max()))
