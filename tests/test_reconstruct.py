"""Reconstruction (``--method sparsegpt``): the OBS update against numpy least squares on random layers, the
kernels' patterns kept exactly, and the sequential driver on a tiny graph against onnxruntime: closer to the dense
model than Wanda at the same sparsity, biases refitted, the graph otherwise unchanged."""
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
    # and no better than least squares on its own support, a bound no update can beat
    assert e_obs >= _err(w, _ls_on_support(w, x, keep), x) - 1e-9


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
    # exactly ridge least squares with the damping SparseGPT adds (DAMP x mean of the Hessian's diagonal) ...
    h = a.T @ a / len(a)
    ridge = np.linalg.solve(h + sparsegpt.DAMP * np.mean(np.diag(h)) * np.eye(len(h)), a.T @ y / len(a)).T
    np.testing.assert_allclose(got, ridge, rtol=1e-4, atol=1e-4)
    # ... which is close to plain least squares
    plain = np.linalg.lstsq(a, y, rcond=None)[0].T
    assert np.linalg.norm(a @ got.T - a @ plain.T) / np.linalg.norm(a @ plain.T) < 0.05


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


def test_sparsegpt_is_chosen_by_name_not_by_default(tmp_path):
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    assert pruning.prune(tiny_model(), sparsity=0.5, calib=calib, quiet=True).report["method"] == "wanda"
    res = pruning.prune(tiny_model(), sparsity=0.5, calib=calib, method="sparsegpt", quiet=True)
    assert res.report["method"] == "sparsegpt"
