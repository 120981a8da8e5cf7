"""Dense CPU schedules (targets/cpu/schedules.py): rules chosen per op class, numerics against onnxruntime, register
tiles per preset, aarch64 builds, the tuning database round trip."""
from __future__ import annotations

import os
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sparse import targets
from edge_sparse.errors import UserError
from edge_sparse.targets import cpu
from edge_sparse.targets.cpu import schedules

RTOL = ATOL = 1e-4   # float32; fast exp/erf/tanh are accurate to ~1e-6 relative


# ------------------------------------------------------------------------------------------------ helpers
def _graph(nodes, inputs, outputs, inits=None, opset=17):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))).astype(np.float32)


def _import(model):
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    return from_onnx(model, shape_dict=shapes, keep_params_in_input=False), shapes


def _scheduled_funcs(model, preset="host"):
    """{PrimFunc name: PrimFunc} after our Relax passes (before lowering)."""
    import tvm

    mod, _ = _import(model)
    p = targets.get(preset)
    with p.tvm_target():
        mod = tvm.transform.Sequential(cpu.relax_passes(p, lower=False))(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _scheduled(model, preset="host"):
    """{PrimFunc name: rule name} after our Relax passes (before lowering)."""
    return {name: str(f.attrs.get(schedules.SCHEDULED_ATTR, "")) for name, f in _scheduled_funcs(model, preset).items()
            if f.attrs is not None}


def _loop_nests(func) -> int:
    """Top-level loop nests of a scheduled PrimFunc (one: every block computed inside the conv's tile loops)."""
    from tvm import s_tir, tirx

    body = func.body.block.body if isinstance(func.body, s_tir.SBlockRealize) else func.body
    return len(body.seq) if isinstance(body, tirx.SeqStmt) else 1


def _run_tvm(model, inputs, threads=1):
    import tvm
    from tvm import relax

    mod, _ = _import(model)
    ex = cpu.build(mod, targets.get("host"))
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(inputs[i.name], tvm.cpu()) for i in model.graph.input])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def _run_ort(model, inputs):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def _check(model, seed=0, threads=1):
    rng = np.random.default_rng(seed)
    inputs = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
              for i in model.graph.input}
    got, want = _run_tvm(model, inputs, threads), _run_ort(model, inputs)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------ tiles
def test_tile_config_follows_the_register_file():
    host_like = targets.Preset("x", "", "cpu", "x86_64", {"kind": "llvm"}, None,
                               {"vector_bits": 512, "vector_registers": 32}, {"kind": "host"})
    avx2 = targets.Preset("y", "", "cpu", "x86_64", {"kind": "llvm"}, None,
                          {"vector_bits": 256, "vector_registers": 16}, {"kind": "host"})
    assert schedules.tile_config(host_like) == schedules.TileConfig(lanes=16, registers=32, mt=8, nvec=2)
    assert schedules.tile_config(avx2) == schedules.TileConfig(lanes=8, registers=16, mt=4, nvec=2)
    for name in ("rpi4", "rpi5", "android-arm64"):
        cfg = schedules.tile_config(targets.get(name))
        assert (cfg.lanes, cfg.nt) == (4, 16) and cfg.mt * cfg.nvec <= cfg.registers // 2


@pytest.mark.parametrize("n,expect", [(384, (48, 16)), (1536, (48, 16)), (200, (40, 8)), (48, (48, 16)), (256, (32, 16)),
                                      (120, (40, 8)), (7, (7, 7)), (16, (16, 16))])
def test_vector_tile_uses_power_of_two_vectors_without_tails(n, expect):
    cfg = schedules.TileConfig(lanes=16, registers=32, mt=8, nvec=2)
    nt, width = schedules._vector_tile(n, cfg)
    assert (nt, width) == expect
    assert n % nt == 0 and nt % width == 0


# ------------------------------------------------------------------------------------------------ op classes
def _matmul_bias_gelu(m=64, k=96, n=160, seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["h"]),
             helper.make_node("Div", ["h", "sq2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    inits = {"w": _w(rng, k, n), "b": _w(rng, n, 1)[:, 0], "sq2": np.array(1.4142135, np.float32),
             "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    return _graph(nodes, [("x", [1, m, k])], [("y", [1, m, n])], inits)


def test_matmul_bias_gelu_is_register_tiled_and_matches_ort():
    model = _matmul_bias_gelu()
    rules = _scheduled(model)
    assert any("matmul" in name and rule == "contraction" for name, rule in rules.items()), rules
    _check(model)


def test_odd_output_width_is_padded_and_matches_ort():
    rng = np.random.default_rng(1)
    n = 101  # odd and wider than one register tile: pad_einsum path (like OCR's 6625 classes)
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])],
                   [("x", [12, 40])], [("y", [12, n])], {"w": _w(rng, 40, n), "b": _w(rng, n, 1)[:, 0]})
    assert "contraction" in _scheduled(model).values()
    _check(model, seed=1)


def test_attention_batched_matmul_softmax_matches_ort():
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    model = _graph(nodes, [("q", [1, 4, 32, 16]), ("kt", [1, 4, 16, 32]), ("v", [1, 4, 32, 16])],
                   [("y", [1, 4, 32, 16])])
    rules = _scheduled(model)
    assert list(rules.values()).count("contraction") == 2, rules
    _check(model)


@pytest.mark.parametrize("k,stride,group,cin,cout", [(1, 1, 1, 16, 48), (3, 1, 1, 8, 32), (3, 2, 1, 8, 24),
                                                     (3, 1, 32, 32, 32), (3, 2, 24, 24, 24), (5, 1, 1, 3, 20)])
def test_conv2d_classes_are_scheduled_and_match_ort(k, stride, group, cin, cout):
    rng = np.random.default_rng(k * 10 + stride)
    hw = 18
    out_hw = (hw + 2 * (k // 2) - k) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[k // 2] * 4, group=group), helper.make_node("Relu", ["c"], ["y"])]
    model = _graph(nodes, [("x", [1, cin, hw, hw])], [("y", [1, cout, out_hw, out_hw])],
                   {"w": _w(rng, cout, cin // group, k, k), "b": _w(rng, cout, 1)[:, 0]})
    rules = _scheduled(model)
    assert any("conv2d" in name and rule == "contraction" for name, rule in rules.items()), rules
    _check(model)


def _act(name, inp, out):
    """Mobile-CNN activations as exporters write them."""
    if name == "relu6":
        return [helper.make_node("Clip", [inp, "zero", "six"], [out])]
    if name == "swish":
        return [helper.make_node("Sigmoid", [inp], [inp + "_s"]), helper.make_node("Mul", [inp, inp + "_s"], [out])]
    if name == "hardswish":   # opset 14 HardSwish (torch.nn.Hardswish)
        return [helper.make_node("HardSwish", [inp], [out])]
    if name == "hardsigmoid_mul":   # older exports: x * HardSigmoid(x, alpha=1/6)
        return [helper.make_node("HardSigmoid", [inp], [inp + "_h"], alpha=1.0 / 6),
                helper.make_node("Mul", [inp, inp + "_h"], [out])]
    raise ValueError(name)


@pytest.mark.parametrize("act", ["relu6", "swish", "hardswish", "hardsigmoid_mul"])
@pytest.mark.parametrize("k,stride,group,c,hw", [(1, 1, 1, 40, 15), (3, 2, 40, 40, 17), (3, 1, 40, 40, 9),
                                                 (5, 2, 24, 24, 13), (3, 2, 144, 144, 14)])
def test_mobile_conv_epilogues_are_fused_and_match_ort(act, k, stride, group, c, hw):
    """1x1 and depthwise convs (odd sizes, stride 2, channels not a multiple of the vector) with the epilogues of
    MobileNet/EfficientNet: one loop nest per conv (padding read in place, epilogue computed per register tile)."""
    rng = np.random.default_rng(k + stride + c)
    out_hw = (hw + 2 * (k // 2) - k) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[k // 2] * 4, group=group), *_act(act, "c", "y")]
    model = _graph(nodes, [("x", [1, c, hw, hw])], [("y", [1, c, out_hw, out_hw])],
                   {"w": _w(rng, c, c // group, k, k) * 3, "b": _w(rng, c, 1)[:, 0],
                    "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)})
    convs = {n: f for n, f in _scheduled_funcs(model).items() if n.startswith("fused_conv2d")}
    assert len(convs) == 1, list(_scheduled_funcs(model))
    func = next(iter(convs.values()))
    assert str(func.attrs[schedules.SCHEDULED_ATTR]) == "contraction"
    assert _loop_nests(func) == 1, func.script()
    _check(model, seed=k)


@pytest.mark.parametrize("kind,k,stride,cin,cout,size", [("conv1d", 256, 128, 1, 258, 640),   # silero VAD's STFT
                                                          ("conv1d", 3, 1, 20, 37, 11),
                                                          ("conv2d", 3, 2, 8, 37, 13)])
def test_odd_output_channels_of_strided_convs_are_padded_and_match_ort(kind, k, stride, cin, cout, size):
    """Output channels that are no multiple of the vector (258 = 2 x 129 STFT bins) on a strided conv, whose input
    index is no einsum access: the tile still covers whole vectors (zero-padded weights, copy out after)."""
    rng = np.random.default_rng(cout + k)
    nd = 1 if kind == "conv1d" else 2
    out = (size + 2 * (k // 2 if k < 10 else 0) - k) // stride + 1
    pads = [k // 2 if k < 10 else 0] * (2 * nd)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k] * nd, strides=[stride] * nd, pads=pads)]
    model = _graph(nodes, [("x", [1, cin] + [size] * nd)], [("y", [1, cout] + [out] * nd)],
                   {"w": _w(rng, cout, cin, *([k] * nd))})
    rules = _scheduled(model)
    assert any(name.startswith(kind) and rule == "contraction" for name, rule in rules.items()), rules
    _check(model, seed=k)


@pytest.mark.parametrize("kernel,strides,pads,rewritten", [([2, 2], [2, 2], [0, 0, 0, 0], True),
                                                          ([2, 3], [2, 3], [0, 0, 0, 0], True),
                                                          ([4, 4], [2, 2], [1, 1, 1, 1], False)])
def test_conv_transpose_without_overlap_is_a_1x1_conv_and_matches_ort(kernel, strides, pads, rewritten):
    """A transposed conv whose kernel equals its stride is a 1x1 conv plus depth-to-space (no zero-dilated input);
    an overlapping one keeps TVM's legalisation. Both with bias and a sigmoid epilogue, as in DBNet's head."""
    rng = np.random.default_rng(sum(kernel))
    cin, cout, hw = 12, 5, 7
    out = [(hw - 1) * s - pads[i] - pads[i + 2] + k for i, (k, s) in enumerate(zip(kernel, strides))]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], kernel_shape=kernel, strides=strides,
                              pads=pads), helper.make_node("Sigmoid", ["c"], ["y"])]
    model = _graph(nodes, [("x", [1, cin, hw, hw])], [("y", [1, cout, *out])],
                   {"w": _w(rng, cin, cout, *kernel), "b": _w(rng, cout, 1)[:, 0]})
    names = list(_scheduled(model))
    assert any("conv2d_transpose" in n for n in names) != rewritten, names
    _check(model, seed=kernel[1])


@pytest.mark.parametrize("k,stride,gate_first", [(1, 1, False), (3, 2, True)])
def test_squeeze_excitation_scale_moves_onto_the_conv_weights(k, stride, gate_first):
    """conv(h * gate, W) == conv(h, W * gate) for a per-channel gate (zero padding stays zero): no kernel multiplies
    the whole map any more, only the weights; the result matches onnxruntime."""
    rng = np.random.default_rng(k)
    c, co, hw = 32, 24, 21
    out = (hw + 2 * (k // 2) - k) // stride + 1
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Sigmoid", ["p"], ["g"]),
             helper.make_node("Mul", ["g", "x"] if gate_first else ["x", "g"], ["s"]),
             helper.make_node("Conv", ["s", "w", "b"], ["y"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[k // 2] * 4)]
    model = _graph(nodes, [("x", [1, c, hw, hw])], [("y", [1, co, out, out])],
                   {"w": _w(rng, co, c, k, k), "b": _w(rng, co, 1)[:, 0]})
    funcs = _scheduled_funcs(model)
    for name, f in funcs.items():
        if "multiply" in name:   # only the weight scaling multiplies (its output: the weights' size)
            assert int(np.prod([int(d) for d in f.params[-1].shape])) == co * c * k * k, name
    assert any("multiply" in name for name in funcs), list(funcs)
    _check(model, seed=k)


def test_pooling_norms_and_layout_ops_match_ort():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["t", "g", "bb"], ["ln"], axis=-1, epsilon=1e-5),
             helper.make_node("ReduceMean", ["ln"], ["y"], axes=[-1], keepdims=1)]
    model = _graph(nodes, [("x", [1, 24, 20, 20])], [("y", [1, 5, 5, 1])],
                   {"g": _w(rng, 24, 1)[:, 0] + 1, "bb": _w(rng, 24, 1)[:, 0]}, opset=17)
    _check(model)
    rules = set(_scheduled(model).values())
    assert rules <= {"contraction", "row_reduction", "injective", "fallback"} and "" not in rules


def test_channels_last_to_first_transpose_keeps_a_pixel_row_in_cache():
    """NHWC -> NCHW: the channel loop runs inside the row loop (each task gathers from one pixel row, in L1),
    not outside it (every channel re-reading the whole map from L2)."""
    from tvm import s_tir, te

    x = te.placeholder((1, 56, 56, 24), name="x")
    y = te.compute((1, 24, 56, 56), lambda n, c, h, w: x[n, h, w, c], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    assert schedules._injective(sch, schedules.TileConfig(lanes=16, registers=32, mt=8, nvec=2))
    outer = sch.get(sch.get_loops(sch.get_sblock("y"))[0])
    assert int(outer.extent) == 56 * 24 and int(outer.kind) == 1   # ForKind.PARALLEL
    # the fused parallel loop is (h, c): the channel is the fused index modulo 24, the row its quotient
    text = sch.mod["main"].script()
    assert re.search(r"_fused % (T\.int64\()?24", text) and re.search(r"_fused // (T\.int64\()?24", text), text


def test_residual_input_is_transposed_once():
    """The layout conversion transposes a tensor once per consumer (MobileNetV2's block input feeds the expand conv
    and the residual add): after common-subexpression elimination one transpose in, one out."""
    import tvm
    from tvm import relax

    from edge_sparse.models import synthetic

    mod, _ = _import(synthetic.mbv2_56())
    p = targets.get("host")
    with p.tvm_target():
        mod = tvm.transform.Sequential(cpu.relax_passes(p, lower=False))(mod)
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e.args[0].name_hint) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    assert len([c for c in calls if c.startswith("transpose")]) == 2, calls


def test_every_primfunc_of_the_synthetic_models_gets_a_rule():
    from edge_sparse.models import synthetic

    for build in (synthetic.mlp, synthetic.cnn, synthetic.transformer_block):
        rules = _scheduled(build())
        assert rules and all(rules.values()), (build.__name__, rules)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer_block"])
def test_synthetic_models_match_ort(name):
    from edge_sparse.models import synthetic

    _check(getattr(synthetic, name)(), threads=2 if name == "mlp" else 1)


# ------------------------------------------------------------------------------------------------ other presets
@pytest.mark.parametrize("preset,model", [("rpi4", "transformer_block"), ("rpi5", "transformer_block"),
                                          ("rpi4", "effnet_56")])
def test_same_schedules_build_for_aarch64(preset, model, tmp_path):
    from edge_sparse.models import synthetic

    mod, _ = _import(getattr(synthetic, model)())
    p = targets.get(preset)
    ex = cpu.build(mod, p)
    asm = "".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
    assert "fmla" in asm and "v0.4s" in asm   # NEON FMAs on 4 x f32
    if shutil.which(p.link.get("cxx", "aarch64-linux-gnu-g++")) is None:
        pytest.skip("aarch64 cross g++ not installed: built but not linked")
    fname = cpu.export(ex, tmp_path, p)
    assert (tmp_path / fname).stat().st_size > 0


# ------------------------------------------------------------------------------------------------ zoo models
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-rec", "minilm-l6"])
def test_zoo_models_match_ort(name, tmp_path):
    from edge_sparse import models, runtime
    from edge_sparse.compiler import compile as compile_model

    recipe = models.recipes()[name]
    path = models.get(name, quiet=True)
    manifest = compile_model(path, "host", tmp_path / "art", input_shapes=dict(recipe.input_shapes), sparse="off",
                             quiet=True)
    assert manifest["compile"]["seconds"] < 120
    inputs = recipe.sample_input()
    got = list(runtime.load(tmp_path / "art", threads=1).run(inputs).values())[0]
    import onnxruntime as ort

    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


# ------------------------------------------------------------------------------------------------ tune
def test_tune_rejects_what_it_cannot_do(tmp_path):
    from edge_sparse.models import synthetic
    from edge_sparse.tuning import tune

    onnx_path = tmp_path / "m.onnx"
    synthetic.save(synthetic.mlp(seq=4, d_in=16, hidden=32, d_out=16), onnx_path)
    with pytest.raises(UserError, match="tracker"):
        tune(onnx_path, "host", tmp_path / "db", rpc="127.0.0.1:9090", quiet=True)
    with pytest.raises(UserError, match="--tracker HOST:PORT"):
        tune(onnx_path, "rpi4", tmp_path / "db", quiet=True)
    (tmp_path / "db").mkdir()
    with pytest.raises(UserError, match="--force"):
        tune(onnx_path, "host", tmp_path / "db", quiet=True)


@pytest.mark.slow
def test_tuning_database_round_trip(tmp_path):
    from edge_sparse import runtime
    from edge_sparse.compiler import compile as compile_model
    from edge_sparse.models import synthetic
    from edge_sparse.tuning import tune

    model = synthetic.mlp(seq=8, d_in=32, hidden=64, d_out=32)
    onnx_path = tmp_path / "m.onnx"
    synthetic.save(model, onnx_path)
    summary = tune(onnx_path, "host", tmp_path / "db", trials=4, quiet=True)
    assert summary["records"] > 0 and (tmp_path / "db" / "database_workload.json").exists()
    compile_model(onnx_path, "host", tmp_path / "art", sparse="off", tuning_db=tmp_path / "db", quiet=True)
    x = np.random.default_rng(0).standard_normal((1, 8, 32)).astype(np.float32)
    got = list(runtime.load(tmp_path / "art").run({"x": x}).values())[0]
    np.testing.assert_allclose(got, _run_ort(model, {"x": x}), rtol=RTOL, atol=ATOL)
