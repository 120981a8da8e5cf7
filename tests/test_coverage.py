"""Issue 17: intake freezes inputs (--input-value) and folds If on them, scalar input shapes, zoo shape defaults;
ConvTranspose and Resize compile (the channels-last conv layout must not leave them unlegalized) and match
onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import invoke, ort_run
from edge_sparse import compiler, runtime
from edge_sparse.errors import UserError
from edge_sparse.intake import load_model, parse_input_shape, parse_input_value

RTOL, ATOL = 1e-4, 1e-4


def _save(model, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _branchy(tmp_path):
    """y = If(sr == 16000, x @ W16 + 1, x @ W8 * 2): the shape of silero VAD's sample-rate switch."""
    rng = np.random.default_rng(0)
    w16 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W16")
    w8 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W8")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    k = numpy_helper.from_array(np.array(16000, np.int64), "k16")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W16"], ["t0"]), helper.make_node("Add", ["t0", "one"], ["t"])],
                               "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W8"], ["e0"]), helper.make_node("Mul", ["e0", "two"], ["e"])],
                               "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="rate_switch", then_branch=then_g, else_branch=else_g)]
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]), sr],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w16, w8, one, two, k])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "branchy.onnx")


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("spec,want", [("sr=()", ("sr", ())), ("sr=", ("sr", ())), ("x=1,3", ("x", (1, 3))),
                                       ("x=1x3x4", ("x", (1, 3, 4)))])
def test_parse_input_shape_scalars(spec, want):
    assert parse_input_shape(spec) == want


def test_parse_input_value():
    name, v = parse_input_value("sr=16000")
    assert name == "sr" and v.shape == () and v == 16000
    name, v = parse_input_value("k=[1, 2.5,3]")
    assert name == "k" and v.tolist() == [1.0, 2.5, 3.0]
    assert parse_input_value("k=7,")[1].shape == parse_input_value("k=[7]")[1].shape == (1,)
    for bad in ("sr", "sr=", "=3", "sr=abc", "sr=1,,2"):
        with pytest.raises(UserError, match="malformed --input-value"):
            parse_input_value(bad)
    with pytest.raises(UserError, match="at most"):
        parse_input_value("big=" + ",".join(["1"] * 5000))


# ------------------------------------------------------------------------------------------- --input-value
@pytest.mark.parametrize("rate,branch", [(16000, "then"), (8000, "else")])
def test_input_value_folds_the_if(tmp_path, rate, branch):
    src = _branchy(tmp_path)
    intake = load_model(src, input_values={"sr": np.array(rate)})
    ops = [n.op_type for n in intake.model.graph.node]
    assert "If" not in ops and "Equal" not in ops, ops
    assert ops == (["MatMul", "Add"] if branch == "then" else ["MatMul", "Mul"])
    assert [i.name for i in intake.inputs] == ["x"] and intake.frozen == {"sr": rate}
    x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    want = ort_run(src, {"x": x, "sr": np.array(rate, np.int64)})[0]
    np.testing.assert_allclose(ort_run_model(intake.model, {"x": x})[0], want, rtol=1e-6, atol=1e-6)


def ort_run_model(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_cli_input_value_compiles_and_matches_onnxruntime(tmp_path):
    src = _branchy(tmp_path)
    out = tmp_path / "art"
    r = invoke(["compile", src, "-o", out, "--input-value", "sr=8000", "--sparse", "off", "-q"])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in man["inputs"]] == ["x"] and man["compile"]["input_values"] == {"sr": 8000}
    model = runtime.load(out)
    x = np.random.default_rng(2).standard_normal((1, 8)).astype(np.float32)
    np.testing.assert_allclose(model.run({"x": x})["y"], ort_run(src, {"x": x, "sr": np.array(8000, np.int64)})[0],
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("args,msg", [
    (["--input-value", "rate=16000"], "--input-value names 'rate', but the model's inputs are: x, sr"),
    (["--input-value", "sr=16000.5"], "not exactly representable as int64"),
    (["--input-value", "sr=1,2"], "2 value(s) for an input of shape []"),
    (["--input-value", "sr"], "malformed --input-value 'sr'"),
])
def test_input_value_errors(tmp_path, args, msg):
    r = invoke(["compile", _branchy(tmp_path), "-o", tmp_path / "o", *args])
    assert r.exit_code == 2 and r.output.startswith("error: ") and msg in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- scalar shapes
def _scaled(tmp_path):
    """y = (x @ W) * gain with ``gain`` a float32 scalar (rank-0) input."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    gain = helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Mul", ["m", "gain"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]), gain],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "scaled.onnx")


def test_if_on_a_live_input_still_compiles(tmp_path):
    """Without --input-value the If stays in the graph (TVM's importer turns it into Relax control flow) and the
    artifact takes the scalar ``sr`` at run time; both branches match onnxruntime."""
    src = _branchy(tmp_path)
    compiler.compile(src, "host", tmp_path / "art", sparse="off", quiet=True)
    model = runtime.load(tmp_path / "art")
    assert [(i["name"], i["shape"]) for i in model.inputs] == [("x", [1, 8]), ("sr", [])]
    x = np.random.default_rng(7).standard_normal((1, 8)).astype(np.float32)
    for rate in (16000, 8000):
        feeds = {"x": x, "sr": np.array(rate, np.int64)}
        np.testing.assert_allclose(model.run(feeds)["y"], ort_run(src, feeds)[0], rtol=RTOL, atol=ATOL)


def test_scalar_input_stays_an_input(tmp_path):
    """A rank-0 input declared as such needs no --input-shape; the artifact takes it as a scalar."""
    src = _scaled(tmp_path)
    out = tmp_path / "art"
    compiler.compile(src, "host", out, sparse="off", quiet=True)
    model = runtime.load(out)
    assert [(i["name"], i["shape"]) for i in model.inputs] == [("x", [1, 8]), ("gain", [])]
    x = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    for gain in (0.5, -3.0):
        feeds = {"x": x, "gain": np.array(gain, np.float32)}
        np.testing.assert_allclose(model.run(feeds)["y"], ort_run(src, feeds)[0], rtol=RTOL, atol=ATOL)


def test_scalar_shape_given_explicitly(tmp_path):
    r = invoke(["compile", _scaled(tmp_path), "-o", tmp_path / "o", "--sparse", "off", "--input-shape", "gain=()", "-q"])
    assert r.exit_code == 0, r.output
    assert [i["shape"] for i in runtime.load(tmp_path / "o").inputs] == [[1, 8], []]


def test_scalar_shape_rank_mismatch(tmp_path):
    r = invoke(["compile", _scaled(tmp_path), "-o", tmp_path / "o", "--input-shape", "x=()"])
    assert r.exit_code == 2 and "model input has rank 2" in r.output, r.output


# ------------------------------------------------------------------------------------------- ConvTranspose + Resize
def _upsampler(tmp_path, mode: str):
    """conv 3x3 -> ConvTranspose 2x2 stride 2 (DBNet's neck) -> Resize x2 (``mode``) -> conv 1x1 -> Sigmoid."""
    rng = np.random.default_rng(4)

    def init(name, shape):
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [init("W0", (8, 3, 3, 3)), init("B0", (8,)), init("WT", (8, 4, 2, 2)), init("BT", (4,)),
             init("W1", (2, 4, 1, 1)), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    resize = {"mode": mode}
    if mode == "nearest":
        resize["nearest_mode"] = "floor"
        resize["coordinate_transformation_mode"] = "asymmetric"
    else:
        resize["coordinate_transformation_mode"] = "half_pixel"
    nodes = [helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("ConvTranspose", ["r0", "WT", "BT"], ["up"], name="neck/deconv", strides=[2, 2]),
             helper.make_node("Resize", ["up", "", "scales"], ["rs"], name="neck/resize", **resize),
             helper.make_node("Conv", ["rs", "W1"], ["c1"]),
             helper.make_node("Sigmoid", ["c1"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 48, 64])], inits)
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / f"up_{mode}.onnx")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_conv_transpose_and_resize_match_onnxruntime(tmp_path, mode):
    src = _upsampler(tmp_path, mode)
    compiler.compile(src, "host", tmp_path / "art", sparse="off", quiet=True)
    model = runtime.load(tmp_path / "art")
    x = np.random.default_rng(5).standard_normal((1, 3, 12, 16)).astype(np.float32)
    got = model.run({"x": x})["y"]
    want = ort_run(src, {"x": x})[0]
    assert got.shape == want.shape == (1, 2, 48, 64)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_conv_transpose_builds_for_rpi4(tmp_path):
    from edge_sparse import targets

    targets.cross_compiler_or_error(targets.get("rpi4"))
    man = compiler.compile(_upsampler(tmp_path, "linear"), "rpi4", tmp_path / "art", sparse="off", quiet=True)
    elf = (tmp_path / "art" / man["library"]).read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183   # EM_AARCH64


# ------------------------------------------------------------------------------------------- mobile-CNN epilogues
def test_fast_sigmoid_error_bound(tmp_path):
    """Sigmoid and swish go through topi.fast_exp (vectorised polynomial): error against float64 numpy over the
    whole float range that matters, including saturation (|x| > 88 is clamped)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["swish"])]
    g = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4096]),
                                            helper.make_tensor_value_info("swish", TensorProto.FLOAT, [1, 4096])])
    src = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "sig.onnx")
    compiler.compile(src, "host", tmp_path / "art", sparse="off", quiet=True)
    xs = np.linspace(-100, 100, 4096, dtype=np.float32)[None]
    got = runtime.load(tmp_path / "art").run({"x": xs})
    want = 1.0 / (1.0 + np.exp(-xs.astype(np.float64)))
    assert np.abs(got["s"] - want).max() < 3e-7
    rel = np.abs(got["s"] - want) / want
    assert rel[xs > -87].max() < 1e-6, rel[xs > -87].max()
    np.testing.assert_allclose(got["swish"], xs * want, rtol=1e-6, atol=1e-30)


def test_relu6_stays_channels_last(tmp_path):
    """Clip(0, 6) after a conv is a Relax maximum/minimum (fused into the conv's epilogue), not an opaque call_tir
    that the layout conversion wraps in transposes back to NCHW."""
    import tvm
    from tvm import relax

    from edge_sparse import targets
    from edge_sparse.compiler import import_relax
    from edge_sparse.models import synthetic
    from edge_sparse.targets.cpu import relax_passes

    path = synthetic.save(synthetic.mbv2_56(), tmp_path / "mbv2.onnx")
    preset = targets.get("host")
    mod = import_relax(load_model(path))
    with preset.tvm_target():
        mod = tvm.transform.Sequential(relax_passes(preset, lower=False))(mod)
    names = [gv.name_hint for gv, f in mod.functions_items() if not isinstance(f, relax.Function)]
    assert not [n for n in names if "maximum" in n and "transpose" in n], names
    assert [n for n in names if n.startswith("fused_conv2d") and "maximum_minimum" in n], names


@pytest.mark.parametrize("name", ["mbv2_56", "effnet_56"])
def test_mobile_blocks_match_onnxruntime(tmp_path, name):
    from edge_sparse.models import synthetic

    src = synthetic.save(getattr(synthetic, name)(), tmp_path / f"{name}.onnx")
    compiler.compile(src, "host", tmp_path / "art", sparse="off", quiet=True)
    x = np.random.default_rng(6).standard_normal((1, 24, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(runtime.load(tmp_path / "art").run({"x": x})["y"], ort_run(src, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
