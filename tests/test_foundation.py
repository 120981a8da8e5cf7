"""Issue 2: dense compile path end to end, artifacts, runtime, and the CLI's bad-input handling."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import invoke, ort_run
from edge_sparse import compiler, runtime, targets
from edge_sparse.errors import UserError

# float32 through different summation orders and fused kernels: compare relative to the output's scale
RTOL, ATOL = 1e-4, 1e-4


def _compile(src, out, target="host", **kw):
    return compiler.compile(src, target, out, sparse="off", quiet=True, **kw)


def _check_against_ort(art_dir, src, seed=0):
    model = runtime.load(art_dir)
    x = model.make_inputs("random", seed)
    got = model.run(x)
    ref = ort_run(src, x)
    assert list(got) == [o["name"] for o in model.outputs]
    for (name, y), r in zip(got.items(), ref):
        assert y.shape == r.shape, name
        np.testing.assert_allclose(y, r, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(r).max())))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_host_artifact_matches_onnxruntime(synthetic_models, tmp_path, name):
    src = synthetic_models[name]
    man = _compile(src, tmp_path / "art")
    assert man["library"] == "model.so"
    _check_against_ort(tmp_path / "art", src)


def test_manifest_contents(synthetic_models, tmp_path):
    src = synthetic_models["mlp"]
    _compile(src, tmp_path / "art")
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert m["tvm"]["version"] == "0.27.0.post1" and m["tvm"]["ffi_version"] == "0.1.14.post1"
    assert m["target"]["name"] == "host" and m["target"]["family"] == "cpu"
    assert m["inputs"] == [{"name": "x", "shape": [1, 32, 128], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "y", "shape": [1, 32, 64], "dtype": "float32"}]
    import hashlib

    assert m["source_model"]["sha256"] == hashlib.sha256(Path(src).read_bytes()).hexdigest()
    lib = tmp_path / "art" / "model.so"
    assert m["files"]["model.so"] == {"sha256": hashlib.sha256(lib.read_bytes()).hexdigest(), "bytes": lib.stat().st_size}
    # weights live inside the library: the .so is at least as big as the float32 weights
    weights = sum(np.prod(i.dims) * 4 for i in onnx.load(str(src)).graph.initializer)
    assert lib.stat().st_size > weights


def test_ppocr_cls_matches_onnxruntime(tmp_path):
    from edge_sparse import models

    src = models.get("ppocr-cls")
    _compile(src, tmp_path / "art", input_shapes={"x": (1, 3, 48, 192)})
    model = runtime.load(tmp_path / "art")
    x = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}
    got = model.run(x)
    ref = ort_run(src, x)
    np.testing.assert_allclose(list(got.values())[0], ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["rpi4", "rpi5"])
def test_arm_artifacts_are_aarch64_elf(synthetic_models, tmp_path, preset):
    man = _compile(synthetic_models["cnn"], tmp_path / "art", target=preset)
    head = (tmp_path / "art" / man["library"]).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert man["target"]["target"]["mtriple"] == "aarch64-linux-gnu"


def test_mali_artifact_builds(synthetic_models, tmp_path):
    man = _compile(synthetic_models["mlp"], tmp_path / "art", target="mali")
    head = (tmp_path / "art" / man["library"]).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183
    assert man["target"]["family"] == "opencl"


def test_android_without_ndk_emits_archive(synthetic_models, tmp_path, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    man = _compile(synthetic_models["mlp"], tmp_path / "art", target="android-arm64")
    assert man["library"] == "model.tar"
    assert (tmp_path / "art" / "model.tar").stat().st_size > 0


def test_target_file_preset(tmp_path, synthetic_models):
    f = tmp_path / "board.toml"
    f.write_text("""name = "my-a55"\ndescription = "a Cortex-A55 board"\nfamily = "cpu"\narch = "aarch64"\n"""
                 """[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a55"\n"""
                 """[device]\ncores = 4\nvector_bits = 128\n[link]\nkind = "cross"\ncxx = "aarch64-linux-gnu-g++"\n""")
    p = targets.get(None, f)
    assert p.name == "my-a55" and p.cores == 4
    r = invoke(["compile", synthetic_models["cnn"], "--target-file", f, "-o", tmp_path / "art", "--sparse", "off", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["target"]["name"] == "my-a55"
    r = invoke(["targets", "--target-file", f])
    assert r.exit_code == 0 and "my-a55" in r.output


def test_targets_lists_presets():
    r = invoke(["targets"])
    assert r.exit_code == 0
    for name in ("host", "rpi4", "rpi5", "android-arm64", "adreno", "mali"):
        assert name in r.output


def test_cli_compile_run_inspect(synthetic_models, tmp_path):
    src = synthetic_models["cnn"]
    art = tmp_path / "art"
    r = invoke(["compile", src, "-o", art, "--sparse", "off", "-q"])
    assert r.exit_code == 0, r.output
    x = {"x": np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    np.savez(tmp_path / "x.npz", **x)
    r = invoke(["run", art, "--input", tmp_path / "x.npz", "-o", tmp_path / "y.npz", "-q"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "y.npz") as z:
        np.testing.assert_allclose(z["probs"], ort_run(src, x)[0], rtol=RTOL, atol=1e-6)
    r = invoke(["inspect", art])
    assert r.exit_code == 0 and "hashes verified" in r.output and "probs" in r.output


# ------------------------------------------------------------------------------------------- bad input
def _assert_clean_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.output)
    out = r.output.strip()
    assert "Traceback" not in out
    assert out.count("\n") == 0, out                   # one line
    for f in fragments:
        assert f in out, (f, out)


def test_missing_file(tmp_path):
    r = invoke(["compile", tmp_path / "nope.onnx", "-o", tmp_path / "o"])
    _assert_clean_error(r, "not found")
    assert not (tmp_path / "o").exists()


def test_not_onnx(tmp_path):
    f = tmp_path / "a.onnx"
    f.write_text("hello, I am not a protobuf\n" * 10)
    r = invoke(["compile", f, "-o", tmp_path / "o"])
    _assert_clean_error(r, "not", "ONNX")
    assert not (tmp_path / "o").exists()


def test_truncated_onnx(synthetic_models, tmp_path):
    data = Path(synthetic_models["mlp"]).read_bytes()
    f = tmp_path / "t.onnx"
    f.write_bytes(data[: len(data) // 2])
    r = invoke(["compile", f, "-o", tmp_path / "o"])
    _assert_clean_error(r, "truncated")
    assert not (tmp_path / "o").exists()


def test_unknown_target_suggests(synthetic_models, tmp_path):
    r = invoke(["compile", synthetic_models["mlp"], "-o", tmp_path / "o", "--target", "rpi-5"])
    _assert_clean_error(r, "unknown target 'rpi-5'", "did you mean 'rpi5'")


@pytest.mark.parametrize("spec", ["x=1,a,3", "x", "=1,2", "x=1,-2", "x=0,3"])
def test_malformed_input_shape(synthetic_models, tmp_path, spec):
    r = invoke(["compile", synthetic_models["mlp"], "-o", tmp_path / "o", "--input-shape", spec])
    _assert_clean_error(r, "--input-shape")


def test_input_shape_wrong_name(synthetic_models, tmp_path):
    r = invoke(["compile", synthetic_models["mlp"], "-o", tmp_path / "o", "--input-shape", "y=1,2,3"])
    _assert_clean_error(r, "model's inputs are: x")


def test_dynamic_input_needs_shape(tmp_path):
    from edge_sparse.models import synthetic

    m = synthetic.mlp(seq=8, d_in=16, hidden=32, d_out=16)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    f = tmp_path / "dyn.onnx"
    onnx.save(m, str(f))
    r = invoke(["compile", f, "-o", tmp_path / "o", "--sparse", "off"])
    _assert_clean_error(r, "dynamic shape", "--input-shape x=")
    r = invoke(["compile", f, "-o", tmp_path / "o", "--sparse", "off", "--input-shape", "x=1,8,16", "-q"])
    assert r.exit_code == 0, r.output


def test_existing_output_needs_force(synthetic_models, tmp_path):
    """--force replaces an artifact (or an empty directory), never a directory of someone else's files (issue 13)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke(["compile", synthetic_models["cnn"], "-o", out, "--sparse", "off"])
    _assert_clean_error(r, "already exists", "--force")
    r = invoke(["compile", synthetic_models["cnn"], "-o", out, "--sparse", "off", "--force", "-q"])
    _assert_clean_error(r, "non-empty directory this command did not write")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    r = invoke(["compile", synthetic_models["cnn"], "-o", out, "--sparse", "off", "--force", "-q"])
    assert r.exit_code == 0, r.output
    r = invoke(["compile", synthetic_models["cnn"], "-o", out, "--sparse", "off", "--force", "-q"])
    assert r.exit_code == 0, r.output                   # an artifact is replaced
    assert (out / "manifest.json").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_missing_cross_compiler(synthetic_models, tmp_path):
    f = tmp_path / "board.toml"
    f.write_text("""name = "odd"\nfamily = "cpu"\narch = "aarch64"\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\n"""
                 """[link]\nkind = "cross"\ncxx = "aarch64-nonexistent-g++"\npackage = "g++-aarch64-linux-gnu"\n""")
    r = invoke(["compile", synthetic_models["cnn"], "--target-file", f, "-o", tmp_path / "o"])
    _assert_clean_error(r, "aarch64-nonexistent-g++", "apt-get install g++-aarch64-linux-gnu")
    assert not (tmp_path / "o").exists()


def test_shape_chains_fold_at_intake(tmp_path):
    """What real exports look like: Reshape fed by a Shape->Slice->Concat chain, ConstantOfShape of a Shape, and a Pad
    whose pads are computed from a Shape. Intake folds every shape computation away (the input's dims are static, the
    batch fixed with --input-shape), and the compiled artifact matches onnxruntime on the original model."""
    from onnx import TensorProto, helper

    from edge_sparse.intake import load_model

    def const(name, values):
        return helper.make_node("Constant", [], [name], name=name,
                                value=onnx.numpy_helper.from_array(np.array(values, np.int64), name))

    nodes = [
        const("zero", [0]), const("two", [2]), const("three", [3]), const("minus1", [-1]), const("w35", [35]),
        const("z2", [0, 0]),
        helper.make_node("Shape", ["x"], ["s"], name="shape_x"),
        helper.make_node("Slice", ["s", "zero", "two"], ["s01"], name="slice"),
        helper.make_node("Concat", ["s01", "minus1"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "newshape"], ["r"], name="reshape"),
        helper.make_node("Shape", ["r"], ["sr"], name="shape_r"),
        helper.make_node("ConstantOfShape", ["sr"], ["half"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["r", "half"], ["a"], name="add"),
        helper.make_node("Slice", ["sr", "two", "three"], ["width"], name="slice_w"),
        helper.make_node("Sub", ["width", "w35"], ["one"], name="sub"),
        helper.make_node("Concat", ["z2", "one", "z2", "one"], ["pads"], name="pads", axis=0),
        helper.make_node("Pad", ["a", "pads"], ["p"], name="pad", mode="constant"),
        helper.make_node("Relu", ["p"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 38])
    m = helper.make_model(helper.make_graph(nodes, "shapes", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    src = tmp_path / "shapes.onnx"
    onnx.save(m, str(src))

    folded = load_model(src, {"x": (1, 4, 6, 6)}).model
    ops = {n.op_type for n in folded.graph.node}
    assert not ops & {"Shape", "ConstantOfShape", "Concat", "Slice", "Sub", "Constant"}, ops
    _compile(src, tmp_path / "art", input_shapes={"x": (1, 4, 6, 6)})
    model = runtime.load(tmp_path / "art")
    xin = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    got = model.run({"x": xin})["y"]
    ref = ort_run(src, {"x": xin})[0]
    assert got.shape == ref.shape == (1, 4, 38)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_unsupported_op_reported_before_tvm(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1, 1, 16])
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((1, 64, 8)).astype(np.float32), "W")
    rr = onnx.numpy_helper.from_array(rng.standard_normal((1, 64, 16)).astype(np.float32), "R")
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="encoder/lstm", hidden_size=16)
    m = helper.make_model(helper.make_graph([node], "g", [x], [y], [w, rr]), opset_imports=[helper.make_opsetid("", 17)])
    f = tmp_path / "lstm.onnx"
    onnx.save(m, str(f))
    r = invoke(["compile", f, "-o", tmp_path / "o"])
    _assert_clean_error(r, "LSTM (encoder/lstm)")


def test_tampered_artifact(synthetic_models, tmp_path):
    art = tmp_path / "art"
    _compile(synthetic_models["cnn"], art)
    lib = art / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        runtime.load(art)
    r = invoke(["run", art])
    _assert_clean_error(r, "model.so", "sha256")


def test_wrong_inputs_at_run_time(synthetic_models, tmp_path):
    art = tmp_path / "art"
    _compile(synthetic_models["cnn"], art)
    bad = {
        "name": {"z": np.zeros((1, 3, 32, 32), np.float32)},
        "shape": {"x": np.zeros((1, 3, 16, 16), np.float32)},
        "dtype": {"x": np.zeros((1, 3, 32, 32), np.float64)},
    }
    expect = {"name": "unknown input name", "shape": "has shape [1, 3, 16, 16]", "dtype": "has dtype float64"}
    for kind, arrays in bad.items():
        np.savez(tmp_path / f"{kind}.npz", **arrays)
        r = invoke(["run", art, "--input", tmp_path / f"{kind}.npz"])
        _assert_clean_error(r, expect[kind])


def test_console_script_exit_code(tmp_path):
    """The installed entry point (not only click's test runner) exits 2 with one line and no traceback."""
    exe = shutil.which("edge-sparse")
    cmd = [exe] if exe else [sys.executable, "-m", "edge_sparse.cli"]
    p = subprocess.run(cmd + ["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: model file not found") and "Traceback" not in p.stderr


def test_runtime_imports_no_compiler_stack():
    code = ("import sys, edge_sparse.runtime; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'click', 'onnx_ir') if m in sys.modules]; "
            "print(','.join(bad))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ""


def test_runtime_version_mismatch(synthetic_models, tmp_path):
    art = tmp_path / "art"
    _compile(synthetic_models["cnn"], art)
    m = json.loads((art / "manifest.json").read_text())
    m["tvm"]["ffi_version"] = "0.1.15.post2"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="apache-tvm-ffi 0.1.15.post2"):
        runtime.load(art)
    assert oct((art).stat().st_mode & 0o777) == oct(0o755)
