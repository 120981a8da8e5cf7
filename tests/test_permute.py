"""Output-channel permutation before block pruning (passes/permute.py): which channels can be reordered (FFN hidden
units; attention head dimensions with Q tied to K and V to O's inputs), the permuted dense model computing the same
outputs under onnxruntime, the chosen order keeping strictly more block saliency where it must, and prune --permute
giving valid ONNX whose masks are Rx1 blocks in the permuted order."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sparse import pruning
from edge_sparse.models import synthetic
from edge_sparse.passes import calibrate
from edge_sparse.passes import permute as PM
from edge_sparse.passes.prune import find_prunable_layers
from edge_sparse.passes.prune_masks import parse_pattern, to_canonical

from conftest import invoke


def _groups(model: onnx.ModelProto):
    data = calibrate.random_calibration(calibrate.input_specs(model), 1)
    irm = ir.serde.deserialize_model(model)
    layers, _ = find_prunable_layers(irm)
    groups, rejected = PM.find_channel_groups(irm, layers, PM.observed_shapes(model, data))
    return irm, groups, rejected


def _random_perm(group, rng) -> np.ndarray:
    return np.concatenate([lo + rng.permutation(min(group.segment, group.channels - lo))
                           for lo in range(0, group.channels, group.segment)])


def _outputs(model: onnx.ModelProto, data) -> dict:
    return calibrate.run_model(model, data)


def _permuted(model, chosen) -> onnx.ModelProto:
    irm = ir.serde.deserialize_model(model)
    PM.PermuteChannels(chosen)(irm)
    return ir.serde.serialize_model(irm)


def _assert_same(a: dict, b: dict):
    for k in a:
        scale = float(np.max(np.abs(a[k])))
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 * scale)


def test_ffn_groups_and_dense_outputs_unchanged():
    model = synthetic.mlp(seq=16, d_in=32, hidden=64, d_out=32, layers=2)
    _, groups, rejected = _groups(model)
    found = {tuple(g.producers): g for g in groups}
    assert set(found) == {("fc0_1.weight",), ("fc0_2.weight",), ("fc1_1.weight",)}
    g = found[("fc0_1.weight",)]
    assert g.consumers == ["fc0_2.weight"] and g.segment == g.channels == 64
    assert g.edits == {"fc0_1.weight": 1, "fc0_1.bias": 0, "fc0_2.weight": 0}
    assert "graph output" in rejected["fc1_2.weight"]
    data = calibrate.random_calibration(calibrate.input_specs(model), 3, seed=1)
    rng = np.random.default_rng(0)
    chosen = [(g, _random_perm(g, rng)) for g in groups]
    permuted = _permuted(model, chosen)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in permuted.graph.initializer}
    assert not np.array_equal(before["fc0_1.weight"], after["fc0_1.weight"])
    _assert_same(_outputs(model, data), _outputs(permuted, data))
    # the same permutation without the consumer's rows changes the function: the check above can fail
    broken = PM.ChannelGroup(g.producers, [], g.channels, g.segment, {"fc0_1.weight": 1, "fc0_1.bias": 0})
    out = _outputs(_permuted(model, [(broken, chosen[[c[0] for c in chosen].index(g)][1])]), data)
    assert np.max(np.abs(out["y"] - _outputs(model, data)["y"])) > 1e-2


def test_attention_groups_tie_q_with_k_and_v_with_o():
    model = synthetic.transformer_block(seq=8, d_model=32, heads=4, ffn=64)
    _, groups, rejected = _groups(model)
    found = {tuple(sorted(g.producers)): g for g in groups}
    qk = found[("attn.k.weight", "attn.q.weight")]
    assert qk.consumers == [] and qk.segment == 8 and qk.channels == 32
    assert qk.edits == {"attn.q.weight": 1, "attn.q.bias": 0, "attn.k.weight": 1, "attn.k.bias": 0}
    v = found[("attn.v.weight",)]
    assert v.consumers == ["attn.out.weight"] and v.segment == 8
    assert found[("ffn.fc1.weight",)].consumers == ["ffn.fc2.weight"]
    assert "LayerNormalization" in rejected["attn.out.weight"]        # residual stream: not reorderable
    data = calibrate.random_calibration(calibrate.input_specs(model), 2, seed=1)
    dense = _outputs(model, data)
    rng = np.random.default_rng(0)
    _assert_same(dense, _outputs(_permuted(model, [(g, _random_perm(g, rng)) for g in groups]), data))
    # Q reordered without K, or across heads: the outputs change (both constraints are needed)
    q_only = PM.ChannelGroup(["attn.q.weight"], [], 32, 8, {"attn.q.weight": 1, "attn.q.bias": 0})
    assert np.max(np.abs(_outputs(_permuted(model, [(q_only, _random_perm(qk, rng))]), data)["y"] - dense["y"])) > 1e-3
    across = np.roll(np.arange(32), 4)                                # moves dimensions into the next head
    assert np.max(np.abs(_outputs(_permuted(model, [(v, across)]), data)["y"] - dense["y"])) > 1e-3


def test_cnn_pointwise_pair_and_rejections():
    _, groups, rejected = _groups(synthetic.cnn())
    assert [(g.producers, g.consumers) for g in groups] == [(["block3.pw1.weight"], ["block3.pw2.weight"])]
    assert groups[0].edits == {"block3.pw1.weight": 0, "block3.pw1.bias": 0, "block3.pw2.weight": 1}
    assert "block1.dw" in rejected["stem.weight"]                     # a depthwise conv reads the channels


def _interleaved_scores(n=32, k=8):
    """Rows alternate between saliency on the first and on the second half of the inputs: in the identity order every
    block of R rows mixes both kinds, so a block mask must drop half of each block's saliency."""
    s = np.full((n, k), 0.01)
    s[0::2, : k // 2] = 1.0
    s[1::2, k // 2:] = 1.0
    return s


@pytest.mark.parametrize("per_row", [False, True])
def test_choose_permutation_strictly_improves(per_row):
    s = _interleaved_scores()
    pattern = parse_pattern("16x1")
    perm, before, after = PM.choose_permutation([s], [pattern], [0.5], per_row, segment=32)
    assert sorted(perm) == list(range(32))
    assert after > before + 0.3 and after > 0.95
    assert after == pytest.approx(PM.retained_saliency([s], [pattern], [0.5], per_row, perm))
    assert before == pytest.approx(PM.retained_saliency([s], [pattern], [0.5], per_row, np.arange(32)))
    # segments of 16 (two heads): rows may only move within their head
    perm, _, after16 = PM.choose_permutation([s], [pattern], [0.5], per_row, segment=16)
    assert sorted(perm[:16]) == list(range(16)) and after16 <= after + 1e-12
    # already well ordered: the identity is kept
    ordered = s[np.argsort(np.arange(32) % 2, kind="stable")]
    perm, b, a = PM.choose_permutation([ordered], [pattern], [0.5], per_row, segment=32)
    assert a == b and np.array_equal(perm, np.arange(32))


def _structured_ffn(hidden=32, d=16, seq=8) -> onnx.ModelProto:
    """x[2, seq, d] -> MatMul W1 (+b1) -> Relu -> MatMul W2 (+b2) -> y, with W1's output channels (columns)
    alternating between weights on the first and on the second half of the inputs (as :func:`_interleaved_scores`)."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((d, hidden)) * 0.02).astype(np.float32)
    w1[: d // 2, 0::2] = rng.standard_normal((d // 2, hidden // 2)) + 2.0
    w1[d // 2:, 1::2] = rng.standard_normal((d // 2, hidden // 2)) + 2.0
    inits = {"w1": w1, "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
             "w2": (rng.standard_normal((hidden, d)) * 0.3).astype(np.float32),
             "b2": (rng.standard_normal(d) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1/add"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
             helper.make_node("MatMul", ["hr", "w2"], ["o"], name="fc2"),
             helper.make_node("Add", ["o", "b2"], ["y"], name="fc2/add")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, seq, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, seq, d])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _block_rows_share_masks(w_canon: np.ndarray, rows: int):
    zero = w_canon == 0
    for lo in range(0, len(zero), rows):
        assert (zero[lo:lo + rows] == zero[lo]).all(), f"rows {lo}..{lo + rows} do not share one mask"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_permute_keeps_more_and_stays_valid(method):
    model = _structured_ffn()
    data = {"x": np.random.default_rng(0).standard_normal((24, 8, 16)).astype(np.float32)}
    runs = {p: pruning.prune(model, sparsity=0.5, pattern="16x1", method=method, calib=data, permute=p, quiet=True,
                             skip=["w2"]) for p in (False, True)}
    plain, perm = runs[False], runs[True]
    assert plain.report["permutation"] is None
    section = perm.report["permutation"]
    (group,) = section["groups"]
    assert group["producers"] == ["w1"] and group["consumers"] == ["w2"] and group["applied"]
    assert group["retained_after"] > group["retained_before"] + 0.2
    assert section["applied"] == 1 and section["dense_max_rel_diff"] < 1e-5
    onnx.checker.check_model(perm.model)
    w = {i.name: numpy_helper.to_array(i) for i in perm.model.graph.initializer}
    canon = to_canonical(w["w1"], "MatMul")
    _block_rows_share_masks(canon, 16)
    assert np.count_nonzero(canon == 0) == canon.size // 2
    # the record reorders the dense model like the pruned one: kept weights equal the reordered dense weights
    meta = {m.key: m.value for m in perm.model.metadata_props}
    aligned = PM.align(model, perm.model)
    dense_w = {i.name: numpy_helper.to_array(i) for i in aligned.graph.initializer}
    kept = w["w1"] != 0
    np.testing.assert_array_equal(w["w1"][kept], dense_w["w1"][kept])
    np.testing.assert_array_equal(w["w2"], dense_w["w2"])             # skipped consumer: reordered, not pruned
    assert json.loads(meta[PM.METADATA_KEY])[0]["edits"] == {"w1": 1, "b1": 0, "w2": 0}
    _assert_same(_outputs(model, data), _outputs(aligned, data))
    # more saliency kept -> closer to the dense model on held-out samples
    err = {p: r.report["accuracy"]["holdout"]["outputs"]["y"]["rel_l2"] for p, r in runs.items()}
    assert err[True] < err[False]


def test_wanda_statistics_follow_the_permutation():
    """Wanda's input norms of the consumer are taken on the permuted model: the consumer's per-row mask is the
    unpermuted run's mask with its columns reordered (stale statistics would pick other columns)."""
    model = _structured_ffn()
    data = {"x": np.random.default_rng(1).standard_normal((16, 8, 16)).astype(np.float32)}
    runs = {p: pruning.prune(model, sparsity=0.5, pattern="4x1", method="wanda", calib=data, permute=p, quiet=True,
                             holdout=0.0) for p in (False, True)}
    perm = np.asarray(json.loads({m.key: m.value for m in runs[True].model.metadata_props}[PM.METADATA_KEY])[0]["perm"])
    assert not np.array_equal(perm, np.arange(len(perm)))
    w = {p: {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer} for p, r in runs.items()}
    np.testing.assert_array_equal(w[True]["w2"] == 0, (w[False]["w2"] == 0)[perm, :])


def test_sparsegpt_permute_gives_rx1_blocks():
    model = synthetic.transformer_block(seq=8, d_model=32, heads=2, ffn=64)
    data = calibrate.random_calibration(calibrate.input_specs(model), 12, seed=2)
    res = pruning.prune(model, sparsity=0.5, pattern="8x1", method="sparsegpt", calib=data, permute=True, quiet=True)
    onnx.checker.check_model(res.model)
    section = res.report["permutation"]
    assert {tuple(sorted(g["producers"])) for g in section["groups"]} >= {("attn.k.weight", "attn.q.weight")}
    w = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight", "ffn.fc1.weight"):
        _block_rows_share_masks(to_canonical(w[name], "MatMul"), 8)
    assert res.report["accuracy"]["holdout"]["outputs"]["y"]["cosine_mean"] > 0.8


def test_cli_permute_flag(tmp_path):
    path = tmp_path / "ffn.onnx"
    onnx.save(_structured_ffn(), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 8, 16)).astype(np.float32))
    for flag, applied in (("--permute", 1), ("--no-permute", None)):
        out = tmp_path / f"out{flag}.onnx"
        r = invoke(["prune", str(path), "-o", str(out), "-s", "0.5", "-p", "16x1", "--method", "magnitude",
                    "--calib", str(calib), flag, "-q"])
        assert r.exit_code == 0, r.output
        rep = json.loads(out.with_suffix(".report.json").read_text())
        assert (rep["permutation"] or {}).get("applied") == applied


def test_recover_reorders_the_teacher_like_the_student(tmp_path):
    """``recover --match-layers`` compares the pruned layers' outputs with the teacher's: the permutation recorded in
    the student reorders the teacher, so those tensors line up (without the record they do not)."""
    pytest.importorskip("torch")
    from edge_sparse.recover import recover

    model = _structured_ffn()
    data = {"x": np.random.default_rng(0).standard_normal((16, 8, 16)).astype(np.float32)}
    student = pruning.prune(model, sparsity=0.5, pattern="16x1", method="magnitude", calib=data, permute=True,
                            quiet=True).model
    stripped = onnx.ModelProto()
    stripped.CopyFrom(student)
    keep = [p for p in stripped.metadata_props if p.key != PM.METADATA_KEY]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(keep)
    losses = {}
    for name, s in (("recorded", student), ("stripped", stripped)):
        res = recover(s, model, data, steps=1, batch_size=16, lr=1e-9, match_layers=True, threads=1, quiet=True)
        losses[name] = res.report["loss"]["before"]
    assert losses["recorded"] < 0.5 * losses["stripped"], losses


def test_permute_without_calibration_uses_the_eval_samples():
    """Magnitude needs no calibration data: shapes and the unchanged-outputs check then run on the --eval samples."""
    x = np.random.default_rng(4).standard_normal((8, 8, 16)).astype(np.float32)
    res = pruning.prune(_structured_ffn(), sparsity=0.5, pattern="16x1", method="magnitude", eval_data={"x": x},
                        permute=True, quiet=True)
    assert res.report["permutation"]["applied"] == 1
    _block_rows_share_masks(to_canonical(numpy_helper.to_array(
        next(i for i in res.model.graph.initializer if i.name == "w1")), "MatMul"), 16)


def test_gated_ffn_links_gate_and_up():
    """SwiGLU (``silu(x W_gate) * (x W_up) W_down``): gate and up meet in an elementwise Mul, so they share one order."""
    rng = np.random.default_rng(5)
    d, h = 16, 32
    inits = {"gate": rng.standard_normal((d, h)).astype(np.float32), "up": rng.standard_normal((d, h)).astype(np.float32),
             "down": rng.standard_normal((h, d)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "gate"], ["g"], name="gate"),
             helper.make_node("Sigmoid", ["g"], ["gs"], name="sig"),
             helper.make_node("Mul", ["g", "gs"], ["silu"], name="silu"),
             helper.make_node("MatMul", ["x", "up"], ["u"], name="up"),
             helper.make_node("Mul", ["silu", "u"], ["gu"], name="glu"),
             helper.make_node("MatMul", ["gu", "down"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "swiglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, d])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, groups, rejected = _groups(model)
    (group,) = groups
    assert sorted(group.producers) == ["gate", "up"] and group.consumers == ["down"]
    assert group.edits == {"gate": 1, "up": 1, "down": 0}
    data = calibrate.random_calibration(calibrate.input_specs(model), 2, seed=3)
    _assert_same(_outputs(model, data), _outputs(_permuted(model, [(group, np.random.default_rng(0).permutation(h))]),
                                                 data))
    # the up projection alone cannot be reordered: the gate would no longer match
    up_only = PM.ChannelGroup(["up"], ["down"], h, h, {"up": 1, "down": 0})
    out = _outputs(_permuted(model, [(up_only, np.random.default_rng(0).permutation(h))]), data)
    assert np.max(np.abs(out["y"] - _outputs(model, data)["y"])) > 1e-2
