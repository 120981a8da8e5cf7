"""Label-free distillation (``edge-sparse recover``) and the ONNX -> PyTorch converter it trains through.

The converter is checked against onnxruntime on the synthetic models (conv/pool/Gemm, attention/LayerNorm/GELU,
a fixed batch of 1 run under vmap); ``recover`` on a tiny pruned CNN lowers the distillation loss, keeps every pruned
weight exactly zero, leaves the graph as it was and the model valid, resumes from its checkpoint to the same
weights as an uninterrupted run, and refuses bad input with one line."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from edge_sparse import pruning                                    # noqa: E402
from edge_sparse.errors import UserError                            # noqa: E402
from edge_sparse.onnx_torch import OnnxModule, masked_constants, trainable_constants   # noqa: E402
from edge_sparse.recover import METADATA_KEY, recover               # noqa: E402

from conftest import invoke, ort_run                                # noqa: E402
from test_prune import label_free, save_tiny, weights               # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_converter_matches_onnxruntime(synthetic_models, name):
    path = synthetic_models[name]
    model = onnx.load(str(path))
    spec = model.graph.input[0]
    shape = [d.dim_value or 2 for d in spec.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = ort_run(path, {spec.name: x})
    module = OnnxModule(model, trainable=trainable_constants(model))
    with torch.no_grad():
        out = module(**{spec.name: torch.from_numpy(x)})
    for r, o in zip(ref, [out[n] for n in module.output_names]):
        np.testing.assert_allclose(o.numpy(), r, rtol=1e-4, atol=1e-4)
    if shape[0] == 1:                      # batch fixed at 1: runs per sample under vmap, so a batch of 3 works
        xs = np.random.default_rng(1).standard_normal([3, *shape[1:]]).astype(np.float32)
        with torch.no_grad():
            out = module(**{spec.name: torch.from_numpy(xs)})[module.output_names[0]].numpy()
        for i in range(3):
            np.testing.assert_allclose(out[i], ort_run(path, {spec.name: xs[i:i + 1]})[0][0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("recover")
    dense, data = save_tiny(d, samples=96, seed=2)
    student = d / "pruned.onnx"
    pruning.prune(dense, student, sparsity=0.75, pattern="4x1", method="magnitude", calib=data, quiet=True)
    return dense, student, data


def test_recover_lowers_loss_keeps_zeros_and_graph(pruned, tmp_path):
    dense, student, data = pruned
    out = tmp_path / "recovered.onnx"
    res = recover(student, dense, data, out, steps=60, batch_size=16, lr=3e-3, threads=1, quiet=True)
    loss = res.report["loss"]
    assert loss["after"] < 0.7 * loss["before"], loss
    before, after = onnx.load(str(student)), onnx.load(str(out))
    onnx.checker.check_model(after, full_check=True)
    masked = masked_constants(before)
    assert set(masked) == {"pw.weight", "conv3.weight", "fc.weight", "proj.weight"}   # the Constant-node weight too
    w0, w1 = weights(before), weights(after)
    for name in masked:
        assert np.array_equal(w1[name] == 0, w0[name] == 0), name          # same zeros, no new ones
    changed = [n for n in trainable_constants(before) if not np.array_equal(w0[n], w1[n])]
    assert set(masked) <= set(changed)
    assert [(n.op_type, list(n.input), list(n.output)) for n in before.graph.node if n.op_type != "Constant"] == \
           [(n.op_type, list(n.input), list(n.output)) for n in after.graph.node if n.op_type != "Constant"]
    meta = {p.key: p.value for p in after.metadata_props}
    assert json.loads(meta[METADATA_KEY])["steps"] == 60 and "edge_sparse.pruning" in meta
    # the written model computes what the trained module computed: its loss on the data is the reported one
    x = np.load(data)["x"][:64]
    p_t, p_s = ort_run(dense, {"x": x})[0], ort_run(out, {"x": x})[0]
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1).mean()
    assert kl == pytest.approx(loss["after"], rel=1e-3, abs=1e-6)
    assert not out.with_name(out.name + ".ckpt.safetensors").exists()


def test_recover_resumes_from_checkpoint(pruned, tmp_path):
    dense, student, data = pruned
    ckpt = tmp_path / "run.ckpt.safetensors"
    kw = dict(steps=30, batch_size=8, lr=2e-3, threads=1, quiet=True, checkpoint_every=20)
    recover(student, dense, data, None, checkpoint=ckpt, **kw)      # leaves the step-20 checkpoint behind
    assert ckpt.exists()
    resumed = recover(student, dense, data, None, checkpoint=ckpt, **kw)
    assert resumed.report["resumed_from"] == 20
    straight = recover(student, dense, data, None, **kw)
    a, b = weights(resumed.model), weights(straight.model)
    for name in trainable_constants(straight.model):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    other = dict(kw, lr=1e-3)
    with pytest.raises(UserError, match="other models, data or settings"):
        recover(student, dense, data, None, checkpoint=ckpt, **other)


def test_recover_cli(pruned, tmp_path):
    dense, student, data = pruned
    out = tmp_path / "r.onnx"
    r = invoke(["recover", student, "--teacher", dense, "--data", data, "-o", out, "--steps", "5", "--threads", "1",
                "--batch-size", "8", "--match-layers", "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["steps"] == 5 and rep["match_layers"] and rep["masked_tensors"] == 4
    assert "accuracy" not in rep                                        # no --eval: no held-out data to score
    # --eval: the teacher, the student as given and the recovered model scored side by side on held-out samples
    held = tmp_path / "held.npz"
    x = np.random.default_rng(11).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(held, x=x)
    out2 = tmp_path / "r2.onnx"
    r = invoke(["recover", student, "--teacher", dense, "--data", data, "-o", out2, "--steps", "5", "--threads", "1",
                "--batch-size", "8", "--eval", held])
    assert r.exit_code == 0, r.output
    ev = json.loads(out2.with_suffix(".report.json").read_text())["accuracy"]["eval"]
    want = label_free(dense, out2, {"x": x})
    assert ev["recovered"] == pytest.approx(want, rel=1e-5)
    assert ev["pruned"] == pytest.approx(label_free(dense, student, {"x": x}), rel=1e-5)
    assert ev["data"]["samples"] == 10 and ev["dense"]["cosine"] == 1.0
    assert f"top1_agreement: pruned {ev['pruned']['top1_agreement']:.4g}, recovered {want['top1_agreement']:.4g}, " \
           f"dense 1 on 10 samples (--eval held.npz)" in r.output.splitlines()[0]
    cases = [
        (["recover", student, "--teacher", dense, "--data", data, "-o", tmp_path / "g.onnx", "--eval", data],
         "--eval and --data are the same file"),
        (["recover", student, "--teacher", dense, "--data", data, "-o", out], "already exists"),
        (["recover", student, "--teacher", dense, "--data", data, "-o", student, "--force"], "is an input model"),
        (["recover", dense, "--teacher", dense, "--data", data, "-o", tmp_path / "d.onnx"], "no pruned weights"),
        (["recover", student, "--teacher", dense, "--data", tmp_path / "none.npz", "-o", tmp_path / "e.onnx"],
         "not found"),
    ]
    for args, msg in cases:
        r = invoke(args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.zeros((4, 3, 8, 8), np.float32))
    r = invoke(["recover", student, "--teacher", dense, "--data", bad, "-o", tmp_path / "f.onnx"])
    assert r.exit_code == 2 and "not model inputs" in r.output
    assert not (tmp_path / "f.onnx").exists()


def test_unsupported_operator_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij", name="e")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(UserError, match="operator Einsum .* not supported"):
        OnnxModule(helper.make_model(g))


def test_prune_then_recover_in_one_command(pruned, tmp_path):
    dense, _, data = pruned
    out = tmp_path / "pr.onnx"
    r = invoke(["prune", dense, "-o", out, "-s", "0.75", "-p", "4x1", "-m", "magnitude", "--calib", data,
                "--recover-steps", "20", "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.with_suffix(".report.json").read_text())["recover"]
    assert rep["steps"] == 20 and rep["data"]["samples"] == 72            # the calibration part, not the held-out 24
    assert rep["loss"]["after"] < rep["loss"]["before"]
    # scored on the samples the pruning report used (no --eval: the held-out 24), the dense model beside it
    ev = rep["accuracy"]["eval"]
    assert ev["data"]["origin"] == "held-out part of --calib (--holdout)" and ev["data"]["samples"] == 24
    held = {"x": np.load(data)["x"][72:]}
    assert ev["recovered"] == pytest.approx(label_free(dense, out, held), rel=1e-5)
    assert ev["pruned"] == pytest.approx(
        json.loads(out.with_suffix(".report.json").read_text())["accuracy"]["eval"]["pruned"], rel=1e-9)
    plain = pruning.prune(dense, sparsity=0.75, pattern="4x1", method="magnitude", calib=data, quiet=True).model
    a, b = weights(plain), weights(onnx.load(str(out)))
    for name in masked_constants(plain):                                   # the same zeros as pruning alone
        assert np.array_equal(a[name] == 0, b[name] == 0), name
    # with --eval: all of --calib trains (nothing held out), the recovered model is scored on the --eval samples
    held = tmp_path / "held.npz"
    x = np.random.default_rng(12).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(held, x=x)
    out2 = tmp_path / "pr2.onnx"
    r = invoke(["prune", dense, "-o", out2, "-s", "0.75", "-p", "4x1", "-m", "magnitude", "--calib", data,
                "--recover-steps", "5", "--eval", held])
    assert r.exit_code == 0, r.output
    rep = json.loads(out2.with_suffix(".report.json").read_text())["recover"]
    assert rep["data"]["samples"] == 96 and rep["accuracy"]["eval"]["data"]["origin"] == "--eval"
    want = label_free(dense, out2, {"x": x})
    assert rep["accuracy"]["eval"]["recovered"] == pytest.approx(want, rel=1e-5)
    assert f"top1_agreement: recovered {want['top1_agreement']:.4g}, dense 1 on 10 samples" in r.output.splitlines()[0]


def _block_constant(model: onnx.ModelProto, name: str, weight: np.ndarray, rows: int) -> bool:
    """Every group of ``rows`` output channels shares its zeros at each input (the Rx1 pattern), canonical view."""
    from edge_sparse.passes.prune_masks import to_canonical

    node = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] == name)
    w = to_canonical(weight, node.op_type, any(a.name == "transB" and a.i for a in node.attribute))
    z = (w == 0).reshape(-1, rows, w.shape[1])
    return bool(np.all(z.all(axis=1) | (~z).all(axis=1)))


def test_gradual_pruning_ends_on_the_recorded_pattern_and_sparsity(pruned):
    dense, student, data = pruned
    one_shot = recover(student, dense, data, None, steps=0, threads=1, quiet=True).report["loss"]["after"]
    res = recover(student, dense, data, None, steps=80, batch_size=16, lr=3e-3, gradual=0.5, threads=1, quiet=True)
    assert res.report["gradual"] == 0.5 and res.report["loss"]["before"] == pytest.approx(0.0, abs=1e-6)
    assert res.report["loss"]["after"] < one_shot                        # better than the one-shot masks untrained
    record = json.loads({p.key: p.value for p in onnx.load(str(student)).metadata_props}["edge_sparse.pruning"])
    after, before = weights(res.model), weights(onnx.load(str(student)))
    layers = [n for n in record["layers"] if n in after]
    assert layers
    for name in layers:
        assert np.mean(after[name] == 0) == pytest.approx(record["layers"][name]["sparsity"], abs=1e-6), name
        assert _block_constant(res.model, name, after[name], 4), name
    assert any(not np.array_equal(after[n] == 0, before[n] == 0) for n in layers)   # masks chosen anew, dense start
    onnx.checker.check_model(res.model, full_check=True)


def test_gradual_needs_the_pruning_record(pruned, tmp_path):
    dense, student, data = pruned
    m = onnx.load(str(student))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    with pytest.raises(UserError, match="--gradual needs a model written by 'edge-sparse prune'"):
        recover(bare, dense, data, None, steps=2, gradual=0.5, quiet=True)
    r = invoke(["recover", student, "--teacher", dense, "--data", data, "-o", tmp_path / "g.onnx", "--gradual", "1.5"])
    assert r.exit_code == 2 and "--gradual must be a fraction" in r.output and "Traceback" not in r.output


@pytest.fixture(scope="module")
def minilm():
    from edge_sparse import models
    from edge_sparse.models import data as zoo_data

    path = models.get("minilm-l6", quiet=True)
    return path, zoo_data.dataset("minilm-l6", "eval", 6).inputs


def test_batched_trimmed_path_matches_the_exact_path_on_minilm(minilm):
    """MiniLM's export is fixed at batch 1 and 128 tokens: the fast path runs whole batches trimmed to the longest
    real sentence; at every real position it computes what per-sample vmap at full length computes."""
    from edge_sparse.passes import calibrate
    from edge_sparse.recover import _fast_path

    path, feeds = minilm
    proto = onnx.load(str(path))
    assert calibrate.token_mask_input(calibrate.input_specs(proto), feeds) == "attention_mask"
    module = OnnxModule(proto).eval()
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        ref = module(**t)
        keep = int(feeds["attention_mask"].sum(1).max())
        assert keep < 64
        module.set_fast(True, 128, list(feeds))
        got = module(**{k: v[:, :keep] for k, v in t.items()})
    real = feeds["attention_mask"][:, :keep].astype(bool)
    np.testing.assert_allclose(got["token_embeddings"].numpy()[real], ref["token_embeddings"].numpy()[:, :keep][real],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["sentence_embedding"].numpy(), ref["sentence_embedding"].numpy(),
                               rtol=1e-4, atol=1e-5)
    module.set_fast(False)
    chosen = _fast_path(OnnxModule(proto), OnnxModule(proto).eval(), feeds, "attention_mask", torch)
    assert chosen == {"batched": True, "seq_len": 128, "seq_inputs": list(feeds)}


def test_recover_on_minilm_trains_on_real_tokens_only(minilm, tmp_path):
    path, feeds = minilm
    student = tmp_path / "m.onnx"
    pruning.prune(path, student, sparsity=0.5, pattern="16x1", method="magnitude", quiet=True)
    res = recover(student, path, feeds, None, steps=2, batch_size=3, lr=1e-4, threads=1, quiet=True)
    ex = res.report["execution"]
    assert ex["batched"] and ex["padding_input"] == "attention_mask" and len(ex["trimmed_inputs"]) == 3
    assert 0 < res.report["loss"]["after"] < 10 and np.isfinite(res.report["loss"]["before"])
