"""Issue 18: ONNX backend node tests (onnx==1.14.1's conformance data) through ``edge_sparse.compile``.

A fixed, representative subset across op families runs here -- every case the issue names among them -- each
compiled for ``host``, run, and compared with the suite's expected outputs (rtol 1e-3, atol 1e-4); cases we cannot
support must end in their one-line error, never a traceback. The full eligible set runs on demand:
``python benchmarks/onnx_conformance.py -j 2 --json report.json``. The data is fetched once by pip into the cache
(``edge_sparse.conformance.node_tests_dir``); CI does it from a clean clone through this module's fixture.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import invoke, ort_run
from edge_sparse import compiler, conformance, runtime

# Cases the issue names: crashes in our pipeline where plain TVM passed.
ISSUE_CASES = [
    "test_max_example", "test_max_one_input", "test_min_example",                      # variadic Max/Min (stack)
    "test_slice_default_steps", "test_slice_end_out_of_bounds",                          # Slice
    "test_scatter_elements_without_axis", "test_scatter_elements_with_reduction_max",    # ScatterElements
    "test_unsqueeze_negative_axes", "test_unique_not_sorted_without_axis",               # Unsqueeze, Unique
    "test_clip_default_min", "test_clip_default_max", "test_clip_default_inbounds",      # scalar / omitted min, max
    # cases of the full run where plain TVM passed and we did not: an empty output, graphs without inputs, a
    # standard op whose function body trips ONNX's strict shape inference
    "test_slice_start_out_of_bounds", "test_constant", "test_optional_has_element_empty_no_input_name_tensor_input",
    "test_optional_has_element_empty_no_input_name_optional_input",
    "test_mvn",
]
# One or more per op family: elementwise, broadcast, matmul/gemm, conv, pooling, normalisation, reductions,
# shape ops, indexing, control of dtypes, sorting/scan, resize.
FAMILY_CASES = [
    "test_add_bcast", "test_sigmoid", "test_erf", "test_pow", "test_mod_mixed_sign_int64", "test_and2d",
    "test_where_example", "test_hardswish", "test_prelu_broadcast",
    "test_matmul_2d", "test_gemm_all_attributes", "test_matmul_4d",
    "test_basic_conv_with_padding", "test_conv_with_strides_padding", "test_convtranspose",
    "test_maxpool_2d_default", "test_averagepool_2d_pads", "test_globalaveragepool",
    "test_batchnorm_epsilon", "test_instancenorm_example", "test_layer_normalization_2d_axis0_expanded",
    "test_softmax_axis_1",
    "test_argmax_keepdims_random",
    "test_transpose_default", "test_concat_2d_axis_0", "test_split_equal_parts_2d",
    "test_expand_dim_unchanged", "test_tile", "test_depthtospace_example", "test_flatten_axis1",
    "test_gather_0", "test_gather_elements_0",
    "test_range_float_type_positive_delta", "test_nonzero_example", "test_scatternd_max", "test_gathernd_example_float32",
    "test_hardmax_one_hot", "test_logsoftmax_large_number", "test_lrn", "test_mish", "test_shape_clip_end", "test_if",
    "test_reduce_max_default_axes_keepdims_random", "test_mean_example", "test_slice_neg_steps",
]
# Cases we cannot support: the fragment of the one-line error they must end in (op and reason).
UNSUPPORTED = {
    "test_lstm_defaults": "TVM cannot import these ops: LSTM",
    "test_adagrad": "onnxruntime cannot load the model",
    "test_top_k": "at TopK: TopK k must be a constant; TVM needs k to be constant",
    "test_constant_pad": "at Pad: 'Var' object has no attribute 'value'; TVM needs pads, value to be constant",
    "test_reshape_negative_dim": "at Reshape: Reshape requires the input new shape to be Shape",
    "test_resize_upsample_scales_nearest": "at Resize: ",
    "test_onehot_with_axis": "at OneHot: Only constant depth currently supported",
    "test_reduce_sum_keepdims_random": "at ReduceSum: Only constant axes currently supported; TVM needs axes to be",
}


@pytest.fixture(scope="module")
def node_tests():
    return conformance.node_tests_dir(quiet=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance")


def test_suite_data(node_tests):
    """The pinned wheel's node tests are all there, and the eligibility rule keeps the same cases everywhere."""
    names = conformance.list_cases(node_tests)
    assert len(names) == 1168
    eligible = [n for n in names if conformance.eligibility(node_tests / n) is None]
    assert len(eligible) == 926
    for case in ISSUE_CASES + FAMILY_CASES + list(UNSUPPORTED):
        assert case in eligible, (case, conformance.eligibility(node_tests / case))
    assert "int32" in conformance.eligibility(node_tests / "test_max_int32")


def test_unpack_refuses_paths_outside_the_data():
    prefix = "onnx/backend/test/data/node/"
    assert conformance._safe_member(prefix + "test_abs/model.onnx") == "test_abs/model.onnx"
    for bad in ("onnx/__init__.py", prefix + "../../x.py", prefix + "test_abs/../../../x", prefix + "/etc/passwd",
                prefix + "test_abs/"):
        assert conformance._safe_member(bad) is None, bad


@pytest.mark.parametrize("name", ISSUE_CASES + FAMILY_CASES)
def test_node_case_passes(node_tests, work, name):
    case = conformance.load_case(name, node_tests)
    out = conformance.run_ours(case, work)
    assert out.status == "pass", (out.status, out.detail, out.traceback)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_node_case_unsupported_is_one_line(node_tests, tmp_path, name):
    """Through the CLI: exit 2, one ``error:`` line naming the op or the reason, no traceback."""
    r = invoke(["compile", node_tests / name / "model.onnx", "-o", tmp_path / "out", "-q"])
    assert r.exit_code == 2, r.output
    out = r.output.strip()
    assert "Traceback" not in out and out.count("\n") == 0, out
    assert out.startswith("error: ") and UNSUPPORTED[name] in out, out
    assert not (tmp_path / "out").exists()


def test_function_body_inference_failure_prints_nothing(node_tests, tmp_path, caplog):
    """ONNX's strict shape inference fails inside MeanVarianceNormalization's function body although onnxruntime and
    TVM run the model: the compile succeeds and nothing (no logged traceback) reaches the user."""
    import logging

    caplog.set_level(logging.WARNING)
    r = invoke(["compile", node_tests / "test_mvn" / "model.onnx", "-o", tmp_path / "out", "-q"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "Traceback" not in caplog.text, caplog.text


def test_tvm_internal_error_is_one_line(node_tests, tmp_path, monkeypatch):
    """A failure inside TVM after intake (here TVM's own ConvertLayout on a variadic Max, which the pipeline no
    longer runs there) reaches the user as one line naming where it failed, exit 2, and nothing is written."""
    from tvm import relax

    from edge_sparse.targets.cpu import guarded

    monkeypatch.setattr(guarded, "ConvertConvLayout", lambda desired: relax.transform.ConvertLayout(desired))
    r = invoke(["compile", node_tests / "test_max_example" / "model.onnx", "-o", tmp_path / "out", "-q"])
    assert r.exit_code == 2, r.output
    out = r.output.strip()
    assert "Traceback" not in out and out.count("\n") == 0, out
    assert out.startswith("error: compiling for host failed inside TVM (") and "Invalid SLayout" in out, out
    assert not (tmp_path / "out").exists()


def _conv_then_max(tmp_path):
    """Conv (NCHW) followed by a variadic Max: the function needs channels-last for the conv, and TVM's
    ConvertLayout fails on the Max's stack."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Max", ["c", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv_max",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "conv_max.onnx"
    onnx.save(model, str(path))
    return path


def test_conv_with_layout_blind_op_compiles_and_matches(tmp_path):
    path = _conv_then_max(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiler.compile(str(path), "host", tmp_path / "art", sparse="off", quiet=True)
    assert any("channels-last conversion skipped" in str(w.message) for w in caught), [str(w.message) for w in caught]
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
         "z": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    got = runtime.load(tmp_path / "art").run(x)["y"]
    np.testing.assert_allclose(got, ort_run(path, x)[0], rtol=1e-4, atol=1e-4)


def test_convs_still_run_channels_last():
    """The restriction keeps the conversion where it matters: a conv model is still converted to NHWC/HWIO."""
    import tvm
    from tvm.script import relax as R

    from edge_sparse.targets.cpu import CONV_LAYOUTS
    from edge_sparse.targets.cpu.guarded import ConvertConvLayout

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), w: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                z = R.nn.relu(y)
                R.output(z)
            return z

    text = ConvertConvLayout(CONV_LAYOUTS)(Mod).script()
    assert 'data_layout="NHWC"' in text and 'kernel_layout="HWIO"' in text, text
