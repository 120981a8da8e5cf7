"""Reconstruction (``--method sparsegpt``, the default with real calibration data): the OBS mask and the exact refit
on its support against numpy least squares on random layers, the kernels' patterns kept exactly, the dense target
(ridge toward the dense weights), padded positions left out of the statistics, and the sequential driver on tiny
graphs against onnxruntime: closer to the dense model than Wanda at the same sparsity, biases refitted, the graph
otherwise unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_sparse import pruning
from edge_sparse.passes.methods import sparsegpt
from edge_sparse.passes.prune import PrunableLayer
from edge_sparse.passes.prune_masks import mask, parse_pattern

from conftest import ort_run
from test_prune import tiny_model


def _layer_data(n_out=64, k=96, rows=2000, seed=0):
    rng = np.random.default_rng(seed)
    # correlated inputs (rank 32 + noise), as activations are: where updating the kept weights pays off
    x = rng.standard_normal((rows, 32)) @ rng.standard_normal((32, k)) + 0.3 * rng.standard_normal((rows, k))
    x *= rng.uniform(0.2, 3.0, size=k)                                    # uneven feature scales
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    return w, x


def _err(w_ref, w, x):
    return np.linalg.norm(x @ w_ref.T - x @ w.T) / np.linalg.norm(x @ w_ref.T)


def _ls_on_support(w, x, keep):
    """Per-row least squares on the kept support: the best any method can do with that mask."""
    out = np.zeros_like(w, dtype=np.float64)
    y = x @ w.T
    for r in range(w.shape[0]):
        s = keep[r]
        out[r, s] = np.linalg.lstsq(x[:, s], y[:, r], rcond=None)[0]
    return out


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("16x1", 0.5), ("4x1", 0.7), ("2:4", 0.5)])
def test_obs_update_beats_mask_only_and_keeps_the_pattern(pattern, sparsity):
    w, x = _layer_data()
    layer = PrunableLayer("w", "n", "Gemm", w.shape, True, "x", -1)
    stat = sparsegpt.Hessian(layer)
    for chunk in np.array_split(x, 4):
        stat.update(chunk)
    p = parse_pattern(pattern)
    new = sparsegpt.SparseGPT().prune(layer, w, p, sparsity, stat.result())
    keep = new != 0
    # the pattern, exactly: every dropped element is zero, the fraction is the target, blocks / N:M hold
    assert keep.mean() == pytest.approx(1 - sparsity, abs=0.01)
    if p.kind == "block":
        blocks = keep.reshape(-1, p.rows, keep.shape[1])
        assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()
    if p.kind == "nm":
        assert (keep.reshape(keep.shape[0], -1, p.m).sum(-1) == p.n).all()
    # the same mask with the original weights (no update), and Wanda's own mask, both do worse
    masked_only = np.where(keep, w, 0)
    wanda_keep = mask(np.abs(w) * np.linalg.norm(x, axis=0)[None, :], p, sparsity, per_row=True)
    e_obs, e_mask = _err(w, new, x), _err(w, masked_only, x)
    e_wanda = _err(w, np.where(wanda_keep, w, 0), x)
    assert e_obs < 0.8 * e_mask and e_obs < 0.85 * e_wanda, (e_obs, e_mask, e_wanda)
    # no better than least squares on its own support, a bound no update can beat; with a weak ridge toward the dense
    # weights (the default is stronger: it trades error on the calibration rows for error elsewhere), close to it
    weak = sparsegpt.SparseGPT()
    weak.damp = 0.01
    new_weak = weak.prune(layer, w, p, sparsity, stat.result())
    for got, bound in ((new, None), (new_weak, 1.3)):
        e_got, e_ls = _err(w, got, x), _err(w, _ls_on_support(w, x, got != 0), x)
        assert e_ls - 1e-9 <= e_got and (bound is None or e_got <= bound * e_ls), (e_got, e_ls)


def test_kept_weights_are_the_damped_least_squares_optimum_on_their_support():
    """Every row's kept weights solve numpy's least squares on that support, with the damping as rows
    ``sqrt(lam) (w - w_dense)`` appended: exactly the optimum of the objective the OBS pass approximates."""
    w, x = _layer_data(n_out=12, k=40, rows=600, seed=11)
    layer = PrunableLayer("w", "n", "Gemm", w.shape, True, "x", -1)
    stat = sparsegpt.Hessian(layer)
    stat.update(x)
    new = sparsegpt.SparseGPT().prune(layer, w, parse_pattern("unstructured"), 0.5, stat.result())
    keep = new != 0
    lam = sparsegpt.DAMP * np.mean(np.sum(x * x, axis=0) / len(x))      # DAMP x mean of diag(X^T X / n)
    for r in range(len(w)):
        s = np.flatnonzero(keep[r])
        a = np.vstack([x[:, s] / np.sqrt(len(x)), np.sqrt(lam) * np.eye(len(w[r]))[:, s]])
        b = np.concatenate([x @ w[r].astype(np.float64) / np.sqrt(len(x)), np.sqrt(lam) * w[r]])
        np.testing.assert_allclose(new[r, s], np.linalg.lstsq(a, b, rcond=None)[0], rtol=2e-4, atol=2e-5)


def test_dense_target_and_bias_refit_follow_numpy_least_squares():
    """With inputs from a perturbed upstream (x_p != x_d) and a bias, sparsity 0 fits the dense layer's output from
    [x_p, 1] exactly as numpy's (damped) least squares does."""
    w, xd = _layer_data(n_out=16, k=24, rows=800, seed=3)
    b = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    xp = xd + 0.3 * np.random.default_rng(5).standard_normal(xd.shape) + 0.5
    layer = PrunableLayer("w", "n", "Gemm", w.shape, True, "x", -1)
    stat = sparsegpt.Hessian(layer)
    stat.update_pair(xp, xd)
    new_w, new_b = sparsegpt.SparseGPT().reconstruct(layer, w, b, parse_pattern("unstructured"), 0.0, stat.result())
    a = np.hstack([xp, np.ones((len(xp), 1))])
    y = xd @ w.T + b
    got = np.hstack([new_w, new_b[:, None]]).astype(np.float64)
    # exactly ridge least squares toward the dense weights with the damping SparseGPT adds (DAMP x mean of the
    # Hessian's diagonal) ...
    h = a.T @ a / len(a)
    lam = sparsegpt.DAMP * np.mean(np.diag(h))
    wd = np.hstack([w, b[:, None]]).astype(np.float64)
    ridge = np.linalg.solve(h + lam * np.eye(len(h)), a.T @ y / len(a) + lam * wd.T).T
    np.testing.assert_allclose(got, ridge, rtol=1e-4, atol=1e-4)
    # ... which is close to plain least squares
    plain = np.linalg.lstsq(a, y, rcond=None)[0].T
    assert np.linalg.norm(a @ got.T - a @ plain.T) / np.linalg.norm(a @ plain.T) < 0.05


def test_unchanged_inputs_keep_the_dense_layer_at_sparsity_zero():
    """x_p = x_d: the dense weights already reproduce the dense output, so the target is the dense layer itself,
    whatever the damping (a ridge toward zero shrank the directions the calibration inputs hardly span)."""
    w, x = _layer_data(n_out=16, k=48, rows=40, seed=6)             # fewer rows than inputs: a rank-deficient H
    b = np.random.default_rng(4).standard_normal(16).astype(np.float32)
    layer = PrunableLayer("w", "n", "Gemm", w.shape, True, "x", -1)
    stat = sparsegpt.Hessian(layer)
    stat.update_pair(x, x.copy())
    new_w, new_b = sparsegpt.SparseGPT().reconstruct(layer, w, b, parse_pattern("unstructured"), 0.0, stat.result())
    np.testing.assert_allclose(new_w, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_b, b, rtol=1e-5, atol=1e-5)


def test_conv_rows_match_an_explicit_im2col():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    layer = PrunableLayer("w", "n", "Conv", (4, 3, 3, 3), False, "x", 1, 9,
                          {"strides": [2, 1], "pads": [1, 0, 1, 0], "dilations": [1, 1]})
    rows = sparsegpt.rows_of(layer, x)
    w = rng.standard_normal((4, 3, 3, 3))
    import torch

    ref = torch.nn.functional.conv2d(torch.from_numpy(np.pad(x, [(0, 0), (0, 0), (1, 1), (0, 0)])),
                                     torch.from_numpy(w), stride=(2, 1)).numpy()
    got = (rows @ w.reshape(4, -1).T).reshape(2, ref.shape[2], ref.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def _consts(model):
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("4x1", 0.5)])
def test_sequential_prune_beats_wanda_on_a_tiny_graph(tmp_path, pattern, sparsity):
    dense = tiny_model(seed=0)    # its own weights, whatever other tests drew from test_prune's shared generator
    rng = np.random.default_rng(7)
    calib = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    held = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    dpath = tmp_path / "dense.onnx"
    onnx.save(dense, str(dpath))
    results = {}
    for method in ("wanda", "sparsegpt"):
        res = pruning.prune(dense, tmp_path / f"{method}.onnx", sparsity=sparsity, pattern=pattern, method=method,
                            calib=calib, holdout=0.0, quiet=True)
        onnx.checker.check_model(res.model, full_check=True)
        results[method] = res
    ref = ort_run(dpath, {"x": held})[0]
    errs = {m: np.linalg.norm(ort_run(tmp_path / f"{m}.onnx", {"x": held})[0] - ref) for m in results}
    assert errs["sparsegpt"] < 0.7 * errs["wanda"], errs
    d, s, w = _consts(dense), _consts(results["sparsegpt"].model), _consts(results["wanda"].model)
    pruned = ["pw.weight", "conv3.weight", "fc.weight", "proj.weight"]
    for name in pruned:                                 # the target sparsity in every pruned layer, as Wanda's
        assert abs(np.mean(s[name] == 0) - sparsity) < 0.03 and abs(np.mean(w[name] == 0) - sparsity) < 0.03, name
    assert not np.allclose(s["pw.bias"], d["pw.bias"]) and not np.allclose(s["proj.bias"], d["proj.bias"])
    for name in ("stem.weight", "stem.bias", "head.weight", "head.bias"):     # skipped layers untouched
        np.testing.assert_array_equal(s[name], d[name])
    rows = {r["name"]: r for r in results["sparsegpt"].report["layers"]}
    assert rows["proj.weight"]["reconstruction"]["bias_refit"] and rows["conv3.weight"]["reconstruction"]["rows"] > 0
    assert [n.op_type for n in results["sparsegpt"].model.graph.node] == [n.op_type for n in dense.graph.node]


def test_sparsegpt_is_the_default_with_real_calibration_data_only(tmp_path):
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    assert pruning.prune(tiny_model(), sparsity=0.5, calib=calib, quiet=True).report["method"] == "sparsegpt"
    # random inputs: fitting the kept weights to them would be fitting noise; the score method stays the default
    assert pruning.prune(tiny_model(), sparsity=0.5, calib_random=16, quiet=True).report["method"] == "wanda"
    assert pruning.prune(tiny_model(), sparsity=0.5, calib=calib, method="wanda", quiet=True).report["method"] == "wanda"


# ------------------------------------------------------------------------------------------- padded sequences
def _padded_model(mask_name: str) -> onnx.ModelProto:
    """x[N,6,16] -> MatMul+Add -> Relu -> MatMul+Add, times the 0/1 mask, summed over positions: padded positions
    never reach the output (as a transformer's padded states never reach its masked mean pooling)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(21)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((16, 32))), ("b1", rng.standard_normal(32)),
        ("w2", rng.standard_normal((32, 8))), ("b2", rng.standard_normal(8)))]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"))
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "pos"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
        helper.make_node("Add", ["a", "b1"], ["a_b"], name="fc1/add"),
        helper.make_node("Relu", ["a_b"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["o_b"], name="fc2/add"),
        helper.make_node("Cast", [mask_name], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Mul", ["o_b", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "pos"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "padded", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16]),
        helper.make_tensor_value_info(mask_name, TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _padded_calibration(mask_name: str, garbage_seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 6, 16)).astype(np.float32)
    lengths = rng.integers(1, 4, size=48)                        # 1-3 real tokens of 6: mostly padding
    real = np.arange(6)[None, :] < lengths[:, None]
    junk = np.random.default_rng(garbage_seed).standard_normal(x.shape).astype(np.float32) * 20 + 5
    return {"x": np.where(real[..., None], x, junk), mask_name: real.astype(np.int64)}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padded_positions_do_not_steer_pruning(method):
    """Statistics count only the rows of real tokens (input named like a mask): different garbage at the padded
    positions gives the same pruned model; a model whose 0/1 input is not named like a mask counts every row, and
    then the garbage decides."""
    results = {}
    for mask_name in ("attention_mask", "keep"):
        model = _padded_model(mask_name)
        for seed in (1, 2):
            res = pruning.prune(model, sparsity=0.5, method=method, calib=_padded_calibration(mask_name, seed),
                                holdout=0.0, default_skips=False, quiet=True)
            results[mask_name, seed] = _consts(res.model)
            assert res.report["calibration"]["token_mask"] == ("attention_mask" if mask_name != "keep" else None)
    for name in ("w1", "w2"):
        np.testing.assert_allclose(results["attention_mask", 1][name], results["attention_mask", 2][name],
                                   rtol=1e-5, atol=1e-6)
        assert np.mean(results["attention_mask", 1][name] == 0) == pytest.approx(0.5, abs=0.02)
    assert any(not np.allclose(results["keep", 1][n], results["keep", 2][n], rtol=1e-3, atol=1e-4)
               for n in ("w1", "w2"))


def test_token_mask_input_and_rows():
    from edge_sparse.passes.calibrate import InputSpec, token_mask_input, token_rows

    specs = [InputSpec("input_ids", (None, 5), np.dtype(np.int64)),
             InputSpec("token_type_ids", (None, 5), np.dtype(np.int64)),
             InputSpec("attention_mask", (None, 5), np.dtype(np.int64))]
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    data = {"input_ids": np.full((2, 5), 7), "token_type_ids": np.zeros((2, 5), np.int64), "attention_mask": mask}
    assert token_mask_input(specs, data) == "attention_mask"
    assert token_mask_input(specs, {**data, "attention_mask": np.ones((2, 5), np.int64)}) is None   # no padding
    assert token_mask_input(specs, {**data, "attention_mask": mask * 3}) is None                   # not 0/1
    assert token_mask_input(specs[:2], data) is None                                               # token types: 0/1, no mask
    real = mask.reshape(-1).astype(bool)
    np.testing.assert_array_equal(token_rows(mask, np.zeros((2, 5, 7)), -1), real)                  # [B, S, K]
    np.testing.assert_array_equal(token_rows(mask, np.zeros((10, 7)), 1), real)                     # [B*S, K]
    np.testing.assert_array_equal(token_rows(mask, np.zeros((2, 5, 3, 7)), 3), np.repeat(real, 3))  # [B, S, heads, K]
    np.testing.assert_array_equal(token_rows(mask, np.zeros((2, 7, 5)), 1), real)                  # [B, K, S]
    assert token_rows(mask, np.zeros((4, 7)), 1) is None
    assert token_rows(None, np.zeros((2, 5, 7)), -1) is None
