"""Pruning passes on tiny graphs built in code: exact sparsity per pattern, block/N:M layouts per op, skips, the
graph otherwise unchanged, Wanda norms and accuracy metrics against numpy/onnxruntime, recipes, allocation, and the
CLI's bad-input contract (one line, exit 2, no file written)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sparse import pruning
from edge_sparse.errors import UserError
from edge_sparse.passes import calibrate
from edge_sparse.passes.prune import LayerPlan, PrunableLayer, find_prunable_layers, prune_weight
from edge_sparse.passes.prune_masks import mask, parse_pattern

from conftest import invoke, ort_run

RNG = np.random.default_rng(0)
PRUNED = ["pw.weight", "conv3.weight", "fc.weight", "proj.weight"]     # prunable, not default-skipped
ALL_LAYERS = ["stem.weight", *PRUNED, "head.weight"]


def _w(*shape, scale=0.3, rng=None):
    return ((rng or RNG).standard_normal(shape) * scale).astype(np.float32)


def tiny_model(seed: int | None = None) -> onnx.ModelProto:
    """x[N,3,8,8] -> stem conv 3x3 -> pw conv 1x1 -> conv 3x3 -> GAP -> Gemm(transB) -> Relu -> MatMul (weight in a
    Constant node, as old exporters write it) -> Add -> head Gemm -> Softmax. Batch is dynamic. ``seed``: weights from
    a generator of their own (default: the module's shared one, so each call differs)."""
    rng = np.random.default_rng(seed) if seed is not None else RNG
    inits = {
        "stem.weight": _w(8, 3, 3, 3, rng=rng), "stem.bias": _w(8, rng=rng),
        "pw.weight": _w(16, 8, 1, 1, rng=rng), "pw.bias": _w(16, rng=rng),
        "conv3.weight": _w(16, 16, 3, 3, scale=0.1, rng=rng),
        "fc.weight": _w(32, 16, rng=rng), "fc.bias": _w(32, rng=rng),
        "proj.bias": _w(24, rng=rng),
        "head.weight": _w(24, 10, rng=rng), "head.bias": _w(10, rng=rng),
    }
    proj = _w(32, 24, rng=rng)
    nodes = [
        helper.make_node("Conv", ["x", "stem.weight", "stem.bias"], ["s"], name="stem", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem/relu"),
        helper.make_node("Conv", ["s_r", "pw.weight", "pw.bias"], ["p"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["p"], ["p_r"], name="pw/relu"),
        helper.make_node("Conv", ["p_r", "conv3.weight"], ["c"], name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["h_r"], name="fc/relu"),
        helper.make_node("Constant", [], ["proj.weight"], name="proj/const", value=numpy_helper.from_array(proj)),
        helper.make_node("MatMul", ["h_r", "proj.weight"], ["m"], name="proj"),
        helper.make_node("Add", ["m", "proj.bias"], ["m_b"], name="proj/add"),
        helper.make_node("Gemm", ["m_b", "head.weight", "head.bias"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_tiny(d, samples: int, seed: int):
    """``tiny_model()`` and ``samples`` random inputs for it written into ``d``: (model path, .npz path)."""
    path = d / "tiny.onnx"
    onnx.save(tiny_model(), str(path))
    calib = d / "calib.npz"
    np.savez(calib, x=np.random.default_rng(seed).standard_normal((samples, 3, 8, 8)).astype(np.float32))
    return path, calib


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("prune"), samples=20, seed=1)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _nodes_sig(model: onnx.ModelProto):
    return [(n.op_type, n.name, list(n.input), list(n.output),
             [(a.name, a.i, list(a.ints)) for a in n.attribute if a.type != onnx.AttributeProto.TENSOR])
            for n in model.graph.node]


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_exact_and_lowest_scores(sparsity, per_row):
    scores = np.abs(np.random.default_rng(2).standard_normal((24, 40)))
    keep = mask(scores, parse_pattern("unstructured"), sparsity, per_row)
    if per_row:
        assert (np.sum(~keep, axis=1) == round(sparsity * 40)).all()
        for r in range(24):    # every pruned score <= every kept score in its row
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    else:
        assert np.sum(~keep) == round(sparsity * scores.size)
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("rows", [4, 8, 16])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_block_mask_whole_blocks_over_output_channels(rows, sparsity):
    scores = np.abs(np.random.default_rng(3).standard_normal((64, 48)))
    keep = mask(scores, parse_pattern(f"{rows}x1"), sparsity, per_row=False)
    blocks = keep.reshape(64 // rows, rows, 48)          # [block of output channels, channel in block, input]
    assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all(), "a block is partly pruned"
    assert np.sum(~blocks[:, 0, :]) == round(sparsity * blocks[:, 0, :].size)
    block_scores = scores.reshape(64 // rows, rows, 48).mean(axis=1)
    assert block_scores[~blocks[:, 0, :]].max() <= block_scores[blocks[:, 0, :]].min()


def test_block_mask_tail_block_shorter_than_r():
    scores = np.abs(np.random.default_rng(4).standard_normal((20, 8)))     # 20 = 16 + a tail of 4
    keep = mask(scores, parse_pattern("16x1"), 0.5, per_row=False)
    assert (keep[:16].all(axis=0) | ~keep[:16].any(axis=0)).all()
    assert (keep[16:].all(axis=0) | ~keep[16:].any(axis=0)).all()
    assert np.sum(~keep[[0, 16], :]) == 8                 # 16 blocks, half pruned


def test_nm_mask_two_of_four_per_output_channel_with_tail():
    scores = np.abs(np.random.default_rng(5).standard_normal((6, 11)))     # groups 4,4 and a tail of 3
    keep = mask(scores, parse_pattern("2:4"), 0.0, per_row=False)
    for g in (slice(0, 4), slice(4, 8)):
        assert (keep[:, g].sum(axis=1) == 2).all()
        top2 = np.argsort(-scores[:, g], axis=1)[:, :2]
        assert np.take_along_axis(keep[:, g], top2, axis=1).all()
    assert (keep[:, 8:].sum(axis=1) == 2).all()           # a short tail keeps its best N


def _layer(op, shape, trans_b=False):
    repeat = int(np.prod(shape[2:])) if op == "Conv" else 1
    return PrunableLayer("w", "n", op, tuple(shape), trans_b, "x", 1 if op == "Conv" else -1, repeat)


def test_block_layout_per_op():
    """Rx1 blocks are R consecutive output channels at one input feature, in each op's own weight layout."""
    step = LayerPlan(parse_pattern("4x1"), 0.5)
    w = _w(12, 8)                                                          # MatMul W[K=12, N=8]: blocks along N
    p = prune_weight(_layer("MatMul", w.shape), w, step, "magnitude")
    z = (p == 0).reshape(12, 2, 4)
    assert (z.all(axis=2) | ~z.any(axis=2)).all() and z.mean() == 0.5
    w = _w(8, 12)                                                          # Gemm transB W[N=8, K=12]: along rows
    p = prune_weight(_layer("Gemm", w.shape, True), w, step, "magnitude")
    z = (p == 0).reshape(2, 4, 12)
    assert (z.all(axis=1) | ~z.any(axis=1)).all() and z.mean() == 0.5
    w = _w(8, 3, 3, 3)                                                     # Conv [Cout, Cin, kh, kw]: along Cout
    p = prune_weight(_layer("Conv", w.shape), w, step, "magnitude")
    z = (p == 0).reshape(2, 4, 27)
    assert (z.all(axis=1) | ~z.any(axis=1)).all() and abs(z.mean() - 0.5) < 1 / 27


def test_nm_layout_per_op():
    """2:4 runs along the reduction dimension of each output channel."""
    step = LayerPlan(parse_pattern("2:4"), 0.5)
    w = _w(16, 6)                                                          # MatMul: K is axis 0
    p = prune_weight(_layer("MatMul", w.shape), w, step, "magnitude")
    assert ((p.T != 0).reshape(6, 4, 4).sum(axis=2) == 2).all()
    w = _w(6, 4, 2, 2)                                                     # Conv: K = Cin*kh*kw = 16
    p = prune_weight(_layer("Conv", w.shape), w, step, "magnitude")
    assert ((p.reshape(6, 16) != 0).reshape(6, 4, 4).sum(axis=2) == 2).all()


def test_wanda_scores_use_input_norms():
    """Wanda keeps a small weight on a loud input over a larger weight on a quiet one; magnitude does not."""
    w = np.array([[1.0, 2.0]], dtype=np.float32)
    layer = _layer("Gemm", (1, 2), True)                                   # one output, two inputs
    norms = {"x": np.array([10.0, 1.0])}
    step = LayerPlan(parse_pattern("unstructured"), 0.5)
    assert prune_weight(layer, w, step, "magnitude").tolist() == [[0.0, 2.0]]
    assert prune_weight(layer, w, step, "wanda", norms).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("text", ["3x3", "4x2", "0x1", "4:2", "0:4", "sparse", "2/4", ""])
def test_unknown_patterns_rejected(text):
    with pytest.raises(UserError):
        parse_pattern(text)


# ------------------------------------------------------------------------------------ layers and skips
def test_find_layers_and_default_skips():
    model = ir.serde.deserialize_model(tiny_model())
    layers, rejected = find_prunable_layers(model)
    assert [layer.name for layer in layers] == ALL_LAYERS
    assert not rejected
    from edge_sparse.passes.prune import default_skips

    assert set(default_skips(model, layers)) == {"stem.weight", "head.weight"}


def test_collect_input_norms_matches_numpy(tiny):
    path, calib = tiny
    model = onnx.load(str(path))
    x = np.load(calib)["x"]
    from edge_sparse.passes.methods import InputNorm

    norms = calibrate.collect_statistics(model, {"x": InputNorm(1), "f": InputNorm(-1)}, {"x": x}, batch=8)
    np.testing.assert_allclose(norms["x"], np.sqrt((x.astype(np.float64) ** 2).sum(axis=(0, 2, 3))), rtol=1e-6)
    # f = flattened GAP of conv3 output; recompute it with a probe run, then reduce in numpy
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, None))
    f = ort_run_model(probe, {"x": x})[1]
    np.testing.assert_allclose(norms["f"], np.sqrt((f.astype(np.float64) ** 2).sum(axis=0)), rtol=1e-5)


def ort_run_model(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ---------------------------------------------------------------------------------------- whole prune
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("4x1", 0.5), ("8x1", 0.75), ("2:4", None)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_exact_sparsity_skips_and_unchanged_graph(tiny, tmp_path, pattern, sparsity, method):
    path, calib = tiny
    out = tmp_path / "p.onnx"
    res = pruning.prune(path, out, sparsity=sparsity, pattern=pattern, method=method, calib=calib, quiet=True,
                        report_path=tmp_path / "r.json")
    dense, pruned = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(pruned)
    assert _nodes_sig(dense) == _nodes_sig(pruned)
    assert [(i.name, list(i.dims), i.data_type) for i in dense.graph.initializer] == \
           [(i.name, list(i.dims), i.data_type) for i in pruned.graph.initializer]
    wd, wp = weights(dense), weights(pruned)
    target = 0.5 if pattern == "2:4" else sparsity
    rows = {r["name"]: r for r in res.report["layers"]}
    for name, w in wd.items():
        if name not in PRUNED:
            assert np.array_equal(w, wp[name]), f"{name} changed although skipped or not a weight"
            continue
        kept = wp[name] != 0
        assert np.array_equal(wp[name][kept], w[kept]), "pruning changed surviving weights"
        reached = 1 - kept.mean()
        assert rows[name]["sparsity"] == pytest.approx(reached, abs=1e-6)
        assert rows[name]["pattern"] == ("unstructured" if pattern == "unstructured" else pattern)
        assert abs(reached - target) <= 0.5 / min(w.shape[0], 16) + 1e-9, (name, reached)
    assert rows["stem.weight"]["skipped"] and rows["head.weight"]["skipped"]
    meta = {p.key: p.value for p in pruned.metadata_props}
    facts = json.loads(meta["edge_sparse.pruning"])
    assert facts["method"] == method and set(facts["layers"]) == set(PRUNED)
    for name in PRUNED:
        assert facts["layers"][name]["sparsity"] == pytest.approx(rows[name]["sparsity"], abs=1e-6)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == res.report["layers"]


def test_exact_unstructured_layer_sparsity(tiny, tmp_path):
    path, _ = tiny
    res = pruning.prune(path, sparsity=0.6, pattern="unstructured", method="magnitude", quiet=True)
    wp = weights(res.model)
    for name in PRUNED:
        assert np.count_nonzero(wp[name] == 0) == round(0.6 * wp[name].size)


def test_zero_sparsity_runs_identically(tiny, tmp_path):
    path, calib = tiny
    out = tmp_path / "zero.onnx"
    pruning.prune(path, out, sparsity=0.0, method="wanda", calib=calib, quiet=True)
    x = np.load(calib)["x"]
    assert np.array_equal(ort_run(path, {"x": x})[0], ort_run(out, {"x": x})[0])
    assert weights(onnx.load(str(out))).keys() == weights(onnx.load(str(path))).keys()
    for name, w in weights(onnx.load(str(path))).items():
        assert np.array_equal(w, weights(onnx.load(str(out)))[name])


def test_report_accuracy_matches_onnxruntime(tiny, tmp_path):
    """The report's metrics equal those recomputed from onnxruntime outputs of the written file (rtol 1e-6)."""
    path, calib = tiny
    out = tmp_path / "p.onnx"
    res = pruning.prune(path, out, sparsity=0.7, pattern="unstructured", method="wanda", calib=calib, holdout=0.25,
                        quiet=True)
    x = np.load(calib)["x"]
    assert res.report["calibration"]["samples"] == 15 and res.report["calibration"]["holdout_samples"] == 5
    for split, part in (("calibration", x[:15]), ("holdout", x[15:])):
        d, p = ort_run(path, {"x": part})[0].astype(np.float64), ort_run(out, {"x": part})[0].astype(np.float64)
        m = res.report["accuracy"][split]["outputs"]["probs"]
        cos = (d * p).sum(1) / np.linalg.norm(d, axis=1) / np.linalg.norm(p, axis=1)
        assert m["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-6)
        assert m["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
        assert m["rel_l2"] == pytest.approx(np.linalg.norm(d - p) / np.linalg.norm(d), rel=1e-5)
        assert m["max_abs"] == pytest.approx(np.abs(d - p).max(), rel=1e-5, abs=1e-9)
        assert m["top1_agreement"] == pytest.approx(np.mean(d.argmax(1) == p.argmax(1)))
    # without --eval the held-out evaluation falls back to the held-out part, label-free, and says so
    ev = res.report["accuracy"]["eval"]
    assert ev["data"]["origin"] == "held-out part of --calib (--holdout)" and ev["data"]["samples"] == 5
    assert not ev["labelled"] and ev["metric"] == "top1_agreement"
    assert ev["pruned"] == pytest.approx(label_free(path, out, {"x": x[15:]}), rel=1e-5)
    assert ev["dense"] == {"cosine": 1.0, "cosine_min": 1.0, "top1_agreement": 1.0}


def label_free(dense, pruned, inputs) -> dict:
    """Worst output's mean / min per-sample cosine and top-1 agreement, from onnxruntime and numpy (one output)."""
    d = ort_run(dense, inputs)[0].astype(np.float64)
    p = ort_run(pruned, inputs)[0].astype(np.float64)
    d, p = d.reshape(len(d), -1), p.reshape(len(p), -1)
    cos = (d * p).sum(1) / np.linalg.norm(d, axis=1) / np.linalg.norm(p, axis=1)
    return {"cosine": cos.mean(), "cosine_min": cos.min(), "top1_agreement": np.mean(d.argmax(1) == p.argmax(1))}


def test_eval_npz_without_labels_scores_against_dense(tiny, tmp_path):
    """``--eval`` with a plain .npz: label-free metrics on those samples; no held-out part is taken from --calib."""
    path, calib = tiny
    x = np.random.default_rng(7).standard_normal((12, 3, 8, 8)).astype(np.float32)
    ev_path = tmp_path / "held.npz"
    np.savez(ev_path, x=x)
    out = tmp_path / "p.onnx"
    r = invoke(["prune", path, "-o", out, "-s", "0.7", "-m", "wanda", "--calib", calib, "--eval", ev_path])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.with_suffix(".report.json").read_text())
    ev = rep["accuracy"]["eval"]
    want = label_free(path, out, {"x": x})
    assert ev["pruned"] == pytest.approx(want, rel=1e-5) and want["cosine"] < 1 - 1e-5     # pruning changed the outputs
    assert ev["data"] == {"origin": "--eval", "source": str(ev_path), "samples": 12, "file": str(ev_path)}
    assert rep["calibration"]["samples"] == 20 and "holdout" not in rep["accuracy"]    # all of --calib calibrates
    first = r.output.splitlines()[0]
    assert f"top1_agreement: pruned {want['top1_agreement']:.4g}, dense 1 on 12 samples (--eval held.npz)" in first
    # the calibration samples under another name: scored, with a warning that they are not held out
    copy = tmp_path / "copy.npz"
    np.savez(copy, x=np.load(calib)["x"][:6])
    r = invoke(["prune", path, "-o", out, "-s", "0.7", "-m", "wanda", "--calib", calib, "--eval", copy, "--force"])
    assert r.exit_code == 0 and "warning: 6 of the 6 --eval samples also occur in the calibration data" in r.output


# ------------------------------------------------------------------------------------------- recipes
def test_recipe_per_layer_rules_and_skips(tiny, tmp_path):
    path, _ = tiny
    recipe = tmp_path / "r.toml"
    recipe.write_text('sparsity = 0.5\npattern = "unstructured"\nskip = ["conv3.*"]\n'
                      '[[layer]]\nmatch = "fc.weight"\nsparsity = 0.75\npattern = "8x1"\n'
                      '[[layer]]\nmatch = "proj"\npattern = "2:4"\n'
                      '[[layer]]\nmatch = "head.*"\nsparsity = 0.25\n')
    res = pruning.prune(path, recipe=recipe, method="magnitude", quiet=True)
    rows = {r["name"]: r for r in res.report["layers"]}
    w = weights(res.model)
    assert rows["conv3.weight"]["skipped"] and np.count_nonzero(w["conv3.weight"] == 0) == 0
    assert rows["stem.weight"]["skipped"] == "first conv (default skip)"
    assert rows["pw.weight"]["sparsity"] == 0.5 and rows["pw.weight"]["pattern"] == "unstructured"
    assert rows["fc.weight"]["sparsity"] == 0.75 and rows["fc.weight"]["pattern"] == "8x1"
    assert rows["proj.weight"]["pattern"] == "2:4"            # matched by node name "proj"
    assert ((w["proj.weight"].T != 0).reshape(24, 8, 4).sum(axis=2) == 2).all()
    assert rows["head.weight"]["skipped"] is None and rows["head.weight"]["sparsity"] == 0.25   # rule un-skips


def test_recipe_default_skips_off(tiny, tmp_path):
    path, _ = tiny
    recipe = tmp_path / "r.toml"
    recipe.write_text("sparsity = 0.5\ndefault_skips = false\n")
    res = pruning.prune(path, recipe=recipe, method="magnitude", quiet=True)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.02) for r in res.report["layers"])


# -------------------------------------------------------------------------------- sensitivity + allocation
def test_allocate_hits_target_and_favours_insensitive_layers():
    sizes = {"a": 1000, "b": 1000, "c": 4000}
    curves = {"a": {0.5: 0.01, 0.7: 0.02, 0.8: 0.04, 0.9: 0.08},
              "b": {0.5: 0.2, 0.7: 0.5, 0.8: 0.8, 0.9: 1.2},
              "c": {0.5: 0.02, 0.7: 0.05, 0.8: 0.1, 0.9: 0.2}}
    alloc = pruning.allocate(sizes, curves, 0.7)
    assert sum(alloc[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.7, abs=1e-9)
    assert alloc["a"] > alloc["b"] and alloc["c"] > alloc["b"]
    nm = pruning.allocate({"a": 10, "b": 10}, {"a": {0.5: 0.1}, "b": {0.5: 0.5}}, 0.25,
                          {"a": [0.0, 0.5], "b": [0.0, 0.5]})
    assert nm == {"a": 0.5, "b": 0.0}


def test_analyze_sensitivity_matches_single_layer_onnxruntime_runs(tiny, tmp_path):
    path, calib = tiny
    result = pruning.analyze(path, calib=calib, method="magnitude", levels=(0.5, 0.9), sparsity=0.6, samples=8,
                             quiet=True)
    x = np.load(calib)["x"][:8]
    dense_model = onnx.load(str(path))
    d = ort_run(path, {"x": x})[0].astype(np.float64)
    layers = {layer.name: layer for layer in find_prunable_layers(ir.serde.deserialize_model(dense_model))[0]}
    for row in result["layers"]:
        assert set(row["sensitivity"]) == {"0.5", "0.9"}
        for level in (0.5, 0.9):
            res = pruning.prune(path, skip=[n for n in ALL_LAYERS if n != row["name"]], default_skips=False,
                                sparsity=level, method="magnitude", quiet=True)
            p = ort_run_model(res.model, {"x": x})[0].astype(np.float64)
            want = np.linalg.norm(p - d) / np.linalg.norm(d)
            assert row["sensitivity"][f"{level:g}"]["rel_l2"] == pytest.approx(want, rel=1e-4, abs=1e-7), row["name"]
        assert row["name"] in layers
    alloc = result["allocation"]["layers"]
    active = [r for r in result["layers"] if not r["skipped"]]
    total = sum(r["params"] for r in active)
    assert sum(alloc[r["name"]] * r["params"] for r in active) / total == pytest.approx(0.6, abs=1e-3)


def test_prune_with_sensitivity_allocation(tiny, tmp_path):
    path, calib = tiny
    res = pruning.prune(path, sparsity=0.6, method="wanda", calib=calib, allocate_by="sensitivity", quiet=True)
    active = [r for r in res.report["layers"] if not r["skipped"]]
    reached = sum(r["sparsity"] * r["params"] for r in active) / sum(r["params"] for r in active)
    assert reached == pytest.approx(0.6, abs=0.01)
    assert len({round(r["sparsity"], 2) for r in active}) > 1, "sensitivity allocation gave a uniform result"
    assert all("sensitivity" in r for r in active)


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_prune_and_analyze(tiny, tmp_path):
    path, calib = tiny
    out = tmp_path / "cli.onnx"
    r = invoke(["prune", path, "-o", out, "-s", "0.5", "-p", "4x1", "--calib", calib, "-v"])
    assert r.exit_code == 0, r.output
    assert out.exists() and (tmp_path / "cli.report.json").exists()
    assert "top-1 agreement" in r.output and "holdout" in r.output
    r = invoke(["analyze", path, "--calib", calib, "--json", "--levels", "0.5,0.8", "--samples", "4"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [row["name"] for row in data["layers"]] == ALL_LAYERS
    r = invoke(["analyze", path, "--calib", calib, "--levels", "0.5"])
    assert r.exit_code == 0 and "pw.weight" in r.output and "first conv" in r.output


def _bad(tmp_path, args):
    out = tmp_path / "bad.onnx"
    r = invoke(["prune", *args[:1], "-o", out, *args[1:]])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not out.exists() and not (tmp_path / "bad.report.json").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    return lines[0]


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "abc"])
def test_bad_sparsity(tiny, tmp_path, value):
    assert "sparsity" in _bad(tmp_path, [tiny[0], "-s", value])


@pytest.mark.parametrize("pattern", ["3x3", "2:2", "blocky"])
def test_bad_pattern(tiny, tmp_path, pattern):
    assert "unknown pattern" in _bad(tmp_path, [tiny[0], "-s", "0.5", "-p", pattern])


def test_bad_method(tiny, tmp_path):
    assert "unknown method" in _bad(tmp_path, [tiny[0], "-s", "0.5", "-m", "wand"])


def test_recipe_naming_no_layer(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[layer]]\nmatch = "encoder.*"\nsparsity = 0.5\n')
    assert "matches no prunable layer" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--recipe", recipe])
    recipe.write_text('skip = ["nothing*"]\n')
    assert "matches no prunable layer" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--recipe", recipe])
    assert "matches no prunable layer" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--skip", "nope"])


def test_bad_recipe_file(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("sparsity = [\n")
    assert "not valid TOML" in _bad(tmp_path, [tiny[0], "--recipe", recipe])
    recipe.write_text("sparsty = 0.5\n")
    assert "unknown key" in _bad(tmp_path, [tiny[0], "--recipe", recipe])


def test_calibration_wrong_names_or_shapes(tiny, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((4, 3, 8, 8), np.float32))
    assert "not model inputs" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--calib", wrong])
    np.savez(wrong, x=np.zeros((4, 3, 9, 8), np.float32))
    assert "shape" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--calib", wrong])
    np.savez(wrong, x=np.zeros((3, 8, 8), np.float32))
    assert "shape" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--calib", wrong])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "cannot read" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--calib", tmp_path / "junk.npz"])
    assert "not found" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--calib", tmp_path / "missing.npz"])


def test_output_equal_to_input_and_existing_output(tiny, tmp_path):
    path, _ = tiny
    before = path.read_bytes()
    r = invoke(["prune", path, "-o", path, "-s", "0.5"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: ") and "is the input" in r.output
    assert path.read_bytes() == before
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep")
    r = invoke(["prune", path, "-o", existing, "-s", "0.5"])
    assert r.exit_code == 2 and "--force" in r.output and existing.read_bytes() == b"keep"
    r = invoke(["prune", path, "-o", existing, "-s", "0.5", "--force"])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(str(existing)))


def test_other_bad_inputs(tiny, tmp_path):
    path, calib = tiny
    assert "not found" in _bad(tmp_path, [tmp_path / "nope.onnx", "-s", "0.5"])
    assert "calibration data" in _bad(tmp_path, [path, "-s", "0.5", "-m", "wanda"])
    assert "not both" in _bad(tmp_path, [path, "-s", "0.5", "--calib", calib, "--calib-random", "4"])
    assert "2:4" in _bad(tmp_path, [path, "-s", "0.8", "-p", "2:4"])
    assert "--sparsity is required" in _bad(tmp_path, [path])
    assert "allocation" in _bad(tmp_path, [path, "-s", "0.5", "--allocate", "greedy"])


def test_no_calibration_warns_and_reports_on_random_inputs(tiny, tmp_path):
    path, _ = tiny
    out = tmp_path / "m.onnx"
    r = invoke(["prune", path, "-o", out, "-s", "0.5", "--holdout", "0"])
    assert r.exit_code == 0, r.output
    assert "warning: no calibration data" in r.output and "warning: no held-out split" in r.output
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["method"] == "magnitude" and "holdout" not in report["accuracy"]
    assert report["calibration"] == {"source": "random (8)", "samples": 8, "holdout_samples": 0, "token_mask": None}


def test_calib_random_warns_and_defaults_to_wanda(tiny, tmp_path):
    path, _ = tiny
    r = invoke(["prune", path, "-o", tmp_path / "m.onnx", "-s", "0.5", "--calib-random", "8", "-q"])
    assert r.exit_code == 0, r.output
    assert "poor proxy" in r.output
    assert json.loads((tmp_path / "m.report.json").read_text())["method"] == "wanda"


def test_fixed_batch_needs_whole_batches(tmp_path):
    model = tiny_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    path = tmp_path / "b2.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((5, 3, 8, 8), np.float32))
    assert "batch size 2" in _bad(tmp_path, [path, "-s", "0.5", "--calib", calib])
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    res = pruning.prune(path, sparsity=0.5, calib=calib, holdout=0.25, quiet=True)
    assert res.report["calibration"]["samples"] == 6 and res.report["calibration"]["holdout_samples"] == 2


def test_sensitivity_allocation_with_two_four_leaves_some_layers_dense(tiny):
    path, calib = tiny
    res = pruning.prune(path, sparsity=0.3, pattern="2:4", calib=calib, allocate_by="sensitivity", quiet=True)
    active = {r["name"]: r["sparsity"] for r in res.report["layers"] if not r["skipped"]}
    assert set(active.values()) <= {0.0, 0.5} and 0.0 in active.values() and 0.5 in active.values()


def test_recipe_sparsity_conflicting_with_nm_pattern(tiny, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[layer]]\nmatch = "fc.weight"\npattern = "2:4"\nsparsity = 0.7\n')
    assert "prunes exactly 0.5" in _bad(tmp_path, [tiny[0], "-s", "0.5", "--recipe", recipe])


# ------------------------------------------------------------------------------------------- method objects
def test_method_registry_defaults_and_unknown():
    from edge_sparse.passes import methods as M

    assert {"magnitude"} <= set(M.names())
    assert not M.get(M.default(False)).needs_calibration
    assert M.get("magnitude").updates_weights is False
    with pytest.raises(UserError, match="unknown method 'magnitud'"):
        M.get("magnitud")


def test_a_new_method_is_one_class(tiny, tmp_path):
    """A method defined outside the package (here: scores by the layer's mean |activation|, and halves the kept
    weights so that an update is visible) is registered by its class alone and runs through prune() with its
    calibration statistic."""
    from edge_sparse.passes import methods as M

    seen = []

    class MeanAbs(M.Statistic):
        def __init__(self, axis):
            self.axis, self.total = axis, None

        def update(self, activation):
            a = np.abs(np.moveaxis(activation, self.axis, -1)).reshape(-1, activation.shape[self.axis]).sum(0)
            self.total = a if self.total is None else self.total + a

        def result(self):
            return self.total

    @M.register
    class HalveKept(M.PruningMethod):
        name = "test-halve-kept"
        needs_calibration = True
        updates_weights = True

        def statistic(self, layer):
            return MeanAbs(layer.feature_axis)

        def score(self, layer, weight, statistic):
            seen.append(layer.name)
            return np.abs(weight) * M.canonical_feature_norm(layer, statistic)[None, :]

        def prune(self, layer, weight, pattern, sparsity, statistic=None):
            return super().prune(layer, weight, pattern, sparsity, statistic) * 0.5

    try:
        path, calib = tiny
        res = pruning.prune(path, tmp_path / "p.onnx", sparsity=0.5, method="test-halve-kept", calib=calib,
                            quiet=True)
        assert res.report["method"] == "test-halve-kept" and sorted(seen) == sorted(PRUNED)
        wd, wp = weights(onnx.load(str(path))), weights(res.model)
        for name in PRUNED:
            kept = wp[name] != 0
            np.testing.assert_allclose(wp[name][kept], 0.5 * wd[name][kept])
        assert "method test-halve-kept needs calibration data" in _bad(tmp_path, [path, "-s", "0.5", "-m", "test-halve-kept"])
    finally:
        M._REGISTRY.pop("test-halve-kept", None)


# ------------------------------------------------------------------------------------ real metrics (--eval)
@pytest.fixture(scope="module")
def zoo_eval(tmp_path_factory):
    """``models get NAME --calib N --eval N`` for the two OCR models (the zoo files are in the user cache)."""
    d = tmp_path_factory.mktemp("zoo-eval")
    for name, n in (("ppocr-cls", 16), ("ppocr-rec", 4)):
        r = invoke(["models", "get", name, "-o", d / name, "--calib", "8", "--eval", str(n), "-q"])
        assert r.exit_code == 0, r.output
    return d


def _zoo_files(zoo_eval, name):
    from edge_sparse.models import recipes

    d, stem = zoo_eval / name, recipes()[name].filename[:-len(".onnx")]
    return d / f"{stem}.onnx", d / f"{stem}.calib.npz", d / f"{stem}.eval.npz"


@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-rec"])
def test_eval_report_has_the_real_metric_of_dense_and_pruned(zoo_eval, tmp_path, name):
    """The report's real metric (cls accuracy; rec line accuracy and CER against the rendered ground truth) for the
    dense and the pruned model equals data.score of their onnxruntime outputs on the labelled held-out lines."""
    from edge_sparse.models import data, zoo

    model, calib, ev_path = _zoo_files(zoo_eval, name)
    out = tmp_path / "p.onnx"
    r = invoke(["prune", model, "-o", out, "-s", "0.5", "-m", "magnitude", "--calib", calib, "--eval", ev_path])
    assert r.exit_code == 0, r.output
    ev = json.loads(out.with_suffix(".report.json").read_text())["accuracy"]["eval"]
    ds = data.read_written(zoo_eval / name, name)["eval"]
    charset = zoo.ocr_charset(model) if name == "ppocr-rec" else None
    d, p = ort_run(model, ds.inputs)[0], ort_run(out, ds.inputs)[0]
    want_dense = data.score(ds, {"y": d}, dense={"y": d}, charset=charset)
    want = data.score(ds, {"y": p}, dense={"y": d}, charset=charset)
    assert ev["dense"] == pytest.approx(want_dense, abs=1e-6) and ev["pruned"] == pytest.approx(want, abs=1e-6)
    metric = "accuracy" if name == "ppocr-cls" else "line_accuracy"
    assert ev["labelled"] and ev["metric"] == metric and want[metric] < want_dense[metric]   # 50% costs accuracy
    if name == "ppocr-rec":
        assert set(want) == {"line_accuracy", "cer", "agreement"} and want["cer"] > want_dense["cer"]
    assert ev["data"]["samples"] == len(ds) and ev["data"]["source"] == ds.source and ev["data"]["model"] == name
    first = r.output.splitlines()[0]
    assert f"{metric}: pruned {want[metric]:.4g}, dense {want_dense[metric]:.4g} on {len(ds)} samples" in first


def test_eval_errors_are_one_line(zoo_eval, tiny, tmp_path):
    import shutil

    model, calib, ev_path = _zoo_files(zoo_eval, "ppocr-cls")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(ev_path, lone / ev_path.name)                         # the labels' side file left behind
    tiny_path, tiny_calib = tiny
    rec_eval = _zoo_files(zoo_eval, "ppocr-rec")[2]
    cases = [
        ([model, "--calib", calib, "--eval", calib], "--eval and --calib are the same file"),
        ([model, "--calib", calib, "--eval", lone / ev_path.name], ".data.json not found beside"),
        ([model, "--calib", calib, "--eval", rec_eval], "holds ppocr-rec's held-out data, but the model is not"),
        ([tiny_path, "--calib", tiny_calib, "--eval", ev_path], "holds ppocr-cls's held-out data, but the model is not"),
    ]
    for args, msg in cases:
        out = tmp_path / "e.onnx"
        r = invoke(["prune", args[0], "-o", out, "-s", "0.5", "-m", "magnitude", *args[1:]])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_eval_report_on_minilm_has_cosine_and_spearman_on_the_lee_pairs(tmp_path):
    """minilm-l6's --eval (with the pairs file beside it): cosine to dense on the held-out sentences and Spearman
    against the human scores and against the dense model on the 1,225 Lee pairs, as data.score computes them."""
    from edge_sparse.models import data

    d = tmp_path / "m"
    r = invoke(["models", "get", "minilm-l6", "-o", d, "--calib", "2", "--eval", "4", "-q"])
    assert r.exit_code == 0, r.output
    stem = d / "all-MiniLM-L6-v2-seq128"
    out = tmp_path / "p.onnx"
    r = invoke(["prune", f"{stem}.onnx", "-o", out, "-s", "0.5", "-m", "magnitude", "--calib", f"{stem}.calib.npz",
                "--eval", f"{stem}.eval.npz"])
    assert r.exit_code == 0, r.output
    ev = json.loads(out.with_suffix(".report.json").read_text())["accuracy"]["eval"]
    import onnxruntime as ort

    sets = data.read_written(d, "minilm-l6")
    sessions = [ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for m in (f"{stem}.onnx", out)]

    def run(sess, inputs):                           # the model's batch is 1: one sample per call
        n = len(next(iter(inputs.values())))
        rows = [sess.run(["sentence_embedding"], {k: v[i:i + 1] for k, v in inputs.items()})[0] for i in range(n)]
        return {"sentence_embedding": np.concatenate(rows)}

    want = {}
    for split in ("eval", "pairs"):
        ds = sets[split]
        want[split] = data.score(ds, run(sessions[1], ds.inputs), dense=run(sessions[0], ds.inputs))
    assert ev["pruned"]["cosine"] == pytest.approx(want["eval"]["cosine"], abs=1e-6) and want["eval"]["cosine"] < 0.99
    for k in ("spearman_human", "spearman_dense"):
        assert ev["pruned"][k] == pytest.approx(want["pairs"][k], abs=1e-6)
    assert ev["dense"]["spearman_dense"] == pytest.approx(1.0) and ev["dense"]["cosine"] == pytest.approx(1.0)
    assert ev["data"]["pairs"]["pairs"] == 1225 and ev["data"]["samples"] == 4 and ev["metric"] == "cosine"
