"""Issue 16: ``optimize`` -- the Pareto search against brute force, the accuracy budget checked independently on the
held-out data, one-line exit 2 for budgets no configuration meets, cache resume, and the same choice over a TVM RPC
server on 127.0.0.1 as locally with the same latency table."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_sparse import optimize as O

from conftest import invoke, ort_run

FAST = {"repeat": 10, "min_seconds": 0.05}
LADDER = (0.5, 0.9)


# ------------------------------------------------------------------------------------------------------ search
def _brute(costs, budget):
    best = None
    for choice in itertools.product(*[range(len(o)) for o in costs]):
        lat = sum(costs[i][c][0] for i, c in enumerate(choice))
        err = sum(costs[i][c][1] for i, c in enumerate(choice))
        if err <= budget + 1e-12 and (best is None or lat < best[0] - 1e-12):
            best = (lat, err, choice)
    return best


def _front_best(front, budget):
    fits = [p for p in front if p[1] <= budget + 1e-12]
    return min(fits, key=lambda p: p[0]) if fits else None


def test_pareto_search_hand_table():
    # layer 0: dense 10us/err 0, sparse 4us/err 3, int8 6us/err 1; layer 1: dense 8/0, sparse 2/5, int8 5/1
    costs = [[(10, 0), (4, 3), (6, 1)], [(8, 0), (2, 5), (5, 1)]]
    front = O.pareto_search(costs)
    # by hand: budget 0 -> both dense (18); 2 -> int8+int8 (11); 4 -> sparse+int8 (9); 6 -> int8+sparse (8);
    # 8 -> sparse+sparse (6)
    for budget, (lat, choice) in {0: (18, (0, 0)), 2: (11, (2, 2)), 4: (9, (1, 2)), 6: (8, (2, 1)),
                                  8: (6, (1, 1))}.items():
        got = _front_best(front, budget)
        assert (got[0], got[2]) == (lat, choice), budget
    errs = [p[1] for p in front]
    lats = [p[0] for p in front]
    assert errs == sorted(errs) and lats == sorted(lats, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_pareto_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs = [[(float(rng.integers(1, 50)), float(rng.integers(0, 20))) for _ in range(rng.integers(2, 5))]
             for _ in range(5)]
    front = O.pareto_search(costs)
    for budget in range(0, 100, 3):
        want, got = _brute(costs, budget), _front_best(front, budget)
        assert (want is None) == (got is None)
        if want is not None:
            assert got[0] == pytest.approx(want[0]), (budget, want, got)
            lat = sum(costs[i][c][0] for i, c in enumerate(got[2]))
            err = sum(costs[i][c][1] for i, c in enumerate(got[2]))
            assert (lat, err) == pytest.approx((got[0], got[1]))


def test_parse_drop():
    assert O.parse_drop("1%") == pytest.approx(0.01) and O.parse_drop("0.02") == pytest.approx(0.02)
    for bad in ("x", "150%", "-1", "nan"):
        with pytest.raises(O.UserError):
            O.parse_drop(bad)


def test_pooled_cosine_weights_by_attention_mask():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int64)
    noisy = y.copy()
    noisy[mask == 0] += 100.0                     # padding positions: ignored by the pooled metric
    pooled = O._pool({"h": y}, {"attention_mask": mask})["h"]
    np.testing.assert_allclose(pooled[0], y[0, :2].mean(axis=0), rtol=1e-6)
    assert O._score({"h": y}, {"h": noisy}, set(), "pooled-cosine", {"attention_mask": mask}) == pytest.approx(1.0)
    assert O._score({"h": y}, {"h": noisy}, set(), "cosine") < 0.9
    assert O._pool({"h": y}, None)["h"] == pytest.approx(y.mean(axis=1))


def _greedy_lines(probs):
    """Greedy CTC decode written out independently: argmax per frame, runs merged, blanks (0) dropped."""
    return [tuple(k for k, _ in itertools.groupby(seq.tolist()) if k != 0) for seq in np.argmax(probs, -1)]


def test_line_agreement_counts_identical_greedy_decodes():
    rng = np.random.default_rng(4)
    dense = rng.random((6, 10, 7)).astype(np.float32)
    dense[:, ::3, 0] += 2.0                                   # some blanks between characters
    out = dense.copy()
    paths = np.argmax(dense, -1)
    # sample 1: one frame's class changed to a new non-blank one -> a different line
    t = 4 if paths[1, 4] != 0 else 5
    out[1, t, (paths[1, t] % 6) + 1] += 10.0
    # sample 2: a frame that repeats its predecessor's class is split by a blank... only if it repeats; else
    # duplicate the previous frame: merged away, the same line
    out[2, 1] = out[2, 0]
    out[2, 1] += 1e-3 * (np.argmax(out[2, 0]) == np.arange(7))
    # sample 3: every score scaled (argmax unchanged)
    out[3] *= 0.5
    want = np.mean([a == b for a, b in zip(_greedy_lines(dense), _greedy_lines(out))])
    score = O._score({"p": dense}, {"p": out}, {"p"}, "line-agreement")
    assert score == pytest.approx(want)
    assert _greedy_lines(out)[1] != _greedy_lines(dense)[1] and score < 1.0
    assert O._score({"p": dense}, {"p": dense * 0.9}, {"p"}, "line-agreement") == 1.0
    # the zoo's text decoder agrees with the paths the metric compares
    from edge_sparse.models.zoo import ctc_decode, ctc_greedy

    charset = ["", *"abcdef"]
    assert ctc_decode(dense, charset) == ["".join(charset[k] for k in p) for p in _greedy_lines(dense)]
    assert ctc_greedy(dense) == _greedy_lines(dense)


# -------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-block MLP (int8 kernels need K % 4 == 0 and N % 16 == 0) with disjoint calibration and evaluation sets."""
    return _mlp_dir(tmp_path_factory.mktemp("optimize"), seq=8, samples=24, seed=0)


def _mlp_dir(d: Path, seq: int, samples: int, seed: int) -> Path:
    """``d`` with ``mlp.onnx`` (the synthetic 2-block MLP at ``seq`` tokens), ``calib.npz`` and ``eval.npz``."""
    from edge_sparse.models import synthetic

    synthetic.save(synthetic.mlp(seq=seq, d_in=64, hidden=128, d_out=64, layers=2, seed=3), d / "mlp.onnx")
    rng = np.random.default_rng(seed)
    np.savez(d / "calib.npz", x=rng.standard_normal((samples, seq, 64)).astype(np.float32))
    np.savez(d / "eval.npz", x=rng.standard_normal((samples, seq, 64)).astype(np.float32))
    return d


def _cosine_drop(model_path, dense_path, x):
    worst = 1.0
    dense = [ort_run(dense_path, {"x": x[i:i + 1]}) for i in range(len(x))]       # the model's batch is 1
    got = [ort_run(model_path, {"x": x[i:i + 1]}) for i in range(len(x))]
    for k in range(len(dense[0])):
        a = np.concatenate([d[k] for d in dense])
        b = np.concatenate([g[k] for g in got])
        a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        worst = min(worst, float(cos.mean()))
    return 1.0 - worst


def _run(tiny, out, **kw):
    args = dict(calib=tiny / "calib.npz", eval_data=tiny / "eval.npz", ladder=LADDER, cache_dir=tiny / "cache",
                quiet=True, **FAST)
    args.update(kw)
    return O.optimize(args.pop("model", tiny / "mlp.onnx"), out, **args)


@pytest.mark.parametrize("budget", [0.002, 0.05])
def test_budget_holds_on_held_out_data(tiny, tmp_path, budget):
    from edge_sparse.runtime import load

    out = tmp_path / "out"
    front = _run(tiny, out, max_drop=budget)
    x = np.load(tiny / "eval.npz")["x"]
    # the budget holds when measured independently with onnxruntime on the held-out samples
    drop = _cosine_drop(out / "model.onnx", tiny / "mlp.onnx", x)
    assert drop <= budget
    assert front["chosen"]["drop"] == pytest.approx(drop, abs=1e-6)
    # the compiled artifact computes what the chosen ONNX computes
    m = load(out / "artifact")
    got = m.run({"x": x[:1]})
    want = ort_run(out / "model.onnx", {"x": x[:1]})
    np.testing.assert_allclose(next(iter(got.values())),
                               want[0], rtol=2e-2, atol=2e-2)
    data = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.png").stat().st_size > 1000
    assert set(data["baselines"]) == {"onnxruntime fp32", "onnxruntime int8"}
    assert all(b["latency_ms"] > 0 for b in data["baselines"].values())
    # the chosen model beside the dense one on the --eval samples, as the pruning report scores them (no labels here)
    acc = data["accuracy"]
    assert acc["data"]["origin"] == "--eval" and acc["data"]["samples"] == 24 and not acc["labelled"]
    assert acc["chosen"]["cosine"] == pytest.approx(1 - drop, abs=1e-6) and acc["dense"]["cosine"] == 1.0
    chosen = [p for p in data["points"] if p["chosen"]]
    assert len(chosen) == 1 or data["chosen"]["summary"] == {"fp32": len(data["layers"])}
    assert all(p["drop"] <= budget for p in data["points"] if p["pareto"] and p["chosen"])
    assert any(p["pareto"] for p in data["points"])
    # every evaluated point's drop is a real measurement: a looser budget can only pick a predicted-faster model
    for p in data["points"]:
        assert 0.0 <= p["drop"] <= 1.0


def test_looser_budget_is_faster_in_the_table(tiny, tmp_path):
    tight = _run(tiny, tmp_path / "a", max_drop=0.0005)
    loose = _run(tiny, tmp_path / "b", max_drop=0.2)
    assert loose["chosen"]["predicted_ms"] <= tight["chosen"]["predicted_ms"]
    assert loose["chosen"]["drop"] <= 0.2 and tight["chosen"]["drop"] <= 0.0005


def test_unreachable_budget_is_one_line_exit_2(tiny, tmp_path):
    out = tmp_path / "out"
    r = invoke(["optimize", tiny / "mlp.onnx", "--calib", tiny / "calib.npz", "--eval", tiny / "eval.npz",
                "--max-drop", "1%", "--latency-ms", "0.00001", "--ladder", "0.5,0.9", "--cache", tiny / "cache",
                "-o", out, "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no configuration meets --max-drop 1% and --latency-ms")
    assert " ms " in lines[0] and "drop" in lines[0] and "Traceback" not in r.output
    assert not out.exists()


def test_bad_inputs_are_one_line(tiny, tmp_path):
    base = ["optimize", tiny / "mlp.onnx", "--calib", tiny / "calib.npz", "-o", tmp_path / "o", "--quiet"]
    r = invoke(base + ["--eval", tiny / "calib.npz", "--max-drop", "1%"])
    assert r.exit_code == 2 and "disjoint" in r.output
    r = invoke(base + ["--eval", tiny / "eval.npz"])
    assert r.exit_code == 2 and "budget" in r.output
    r = invoke(base + ["--eval", tiny / "eval.npz", "--max-drop", "abc"])
    assert r.exit_code == 2 and "--max-drop" in r.output


def test_latency_table_resumes_from_cache(tiny, tmp_path, monkeypatch):
    """An interrupted table keeps what it measured; the next run measures only the rest, then none."""
    from edge_sparse import targets

    proto = onnx.load(tiny / "mlp.onnx")
    preset = targets.get("host")
    _, layers = O._find_layers(tiny / "mlp.onnx", proto, preset, ("16x1",), LADDER, True, None, None)
    total = sum(len(la.options) for la in layers)
    real = O._measure
    calls = []

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(O, "_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        O.latency_table(layers, preset, measure=True, cache_dir=tmp_path)
    cached = json.loads(next(tmp_path.glob("host-*.json")).read_text())["entries"]
    assert len(cached) == 3

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    calls.clear()
    monkeypatch.setattr(O, "_measure", counting)
    table = O.latency_table(layers, preset, measure=True, cache_dir=tmp_path)
    distinct = {f"{O._signature(la.kernel, 1)}|{k}" for la in layers for k in la.options}
    assert len(calls) == len(distinct) - 3 <= total
    assert all(r["source"].startswith("measured") and r["us"] > 0 for t in table.values() for r in t.values())
    calls.clear()
    again = O.latency_table(layers, preset, measure=True, cache_dir=tmp_path)
    assert calls == [] and again == table


# --------------------------------------------------------------------------------------------------------- RPC
def test_rpc_run_chooses_what_the_local_run_chooses(tiny, tmp_path):
    from conftest import start_process_group as _start
    from conftest import stop_process_group as _stop
    from test_bench import HOST, _free_port, _wait_listening

    port = _free_port()
    proc = _start(["tvm.exec.rpc_server", "--host", HOST, "--port", str(port), "--port-end", str(port + 1)])
    try:
        _wait_listening(port, proc)
        remote = _run(tiny, tmp_path / "rpc", max_drop=0.01, rpc=f"{HOST}:{port}", cache_dir=tmp_path / "cache")
    finally:
        _stop(proc)
    assert remote["where"] == f"rpc {HOST}:{port}" and remote["baselines"] == {}
    sources = {r["source"] for la in remote["layers"] for r in la["latency_us"].values()}
    assert sources == {f"measured (rpc {HOST}:{port})"}
    local = _run(tiny, tmp_path / "local", max_drop=0.01, cache_dir=tmp_path / "cache")
    assert local["where"] == "local"
    assert local["chosen"]["config"] == remote["chosen"]["config"]
    assert [la["latency_us"] for la in local["layers"]] == [la["latency_us"] for la in remote["layers"]]


# ------------------------------------------------------------------------------ a target without its device here
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The MLP at 64 tokens: compute-bound enough that rpi4's cost model puts dense int8 behind fp32 (no dotprod)
    and rpi5's ahead of it (sdot)."""
    return _mlp_dir(tmp_path_factory.mktemp("optimize-wide"), seq=64, samples=16, seed=1)


def test_target_without_device_chooses_from_its_own_cost_model(wide, tmp_path, monkeypatch):
    """rpi4 and rpi5 with no --rpc: each run's table is its own preset's cost model, the choice follows it (int8 on
    the Pi 5, fp32 on the Pi 4 where the table makes int8 slower), every latency is labelled an estimate, accuracy is
    measured here on the held-out data, and the chosen model is cross-compiled for the target."""
    from edge_sparse import targets

    budget = 0.005
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    fronts = {name: _run(wide, tmp_path / name, target=name, max_drop=budget, quiet=False) for name in ("rpi4", "rpi5")}
    assert "does not run on this machine" in tty.text and "estimates from its cost model" in tty.text
    x = np.load(wide / "eval.npz")["x"]
    int8_faster = {}
    for name, front in fronts.items():
        preset = targets.get(name)
        _, layers = O._find_layers(wide / "mlp.onnx", onnx.load(wide / "mlp.onnx"), preset, ("16x1",), LADDER, True,
                                   None, None)
        # the table is this preset's cost model, entry by entry
        want = {la.name: {k: round(O._estimate(la.kernel, k, preset), 3) for k in la.options} for la in layers}
        got = {la["name"]: {k: r["us"] for k, r in la["latency_us"].items()} for la in front["layers"]}
        assert got == want
        assert {r["source"] for la in front["layers"] for r in la["latency_us"].values()} == {"cost model"}
        int8_faster[name] = {la.name: want[la.name]["int8"] < want[la.name]["fp32"] for la in layers}
        # every latency is labelled an estimate; no onnxruntime point is made up
        assert front["latency_source"] == O.ESTIMATE and front["chosen"]["latency_source"] == O.ESTIMATE
        assert front["where"] == "cost model" and front["threads"] == preset.cores
        assert all(p["latency_source"] == O.ESTIMATE and p["measured_ms"] is None for p in front["points"])
        assert front["baselines"] == {} and "speedup" not in front
        assert front["baselines_note"].startswith("not measured and not estimated")
        assert front["chosen"]["latency_ms"] == front["chosen"]["predicted_ms"] > 0
        # accuracy: measured here, independently, on the held-out samples
        drop = _cosine_drop(tmp_path / name / "model.onnx", wide / "mlp.onnx", x)
        assert front["chosen"]["drop"] == pytest.approx(drop, abs=1e-6) and drop <= budget
        man = json.loads((tmp_path / name / "artifact" / "manifest.json").read_text())
        assert man["target"]["name"] == name and man["target"]["arch"] == "aarch64"
        assert (tmp_path / name / "frontier.png").stat().st_size > 1000
    # the premise: the two tables disagree about int8, and the choices follow them
    assert all(int8_faster["rpi5"].values()) and not any(int8_faster["rpi4"].values())
    assert any(k.startswith("int8") for k in fronts["rpi5"]["chosen"]["summary"])
    assert not any(k.startswith("int8") for k in fronts["rpi4"]["chosen"]["summary"])
    assert fronts["rpi4"]["chosen"]["config"] != fronts["rpi5"]["chosen"]["config"]


def test_target_without_device_bundle_runs_under_qemu(tiny, tmp_path):
    """The CLI end to end for rpi5 with --bundle and no device: the estimate is said so, and the cross-compiled
    bundle computes under qemu-aarch64 (empty sysroot) what the chosen ONNX computes in onnxruntime."""
    import subprocess

    if shutil.which("qemu-aarch64") is None:
        pytest.fail("install qemu-user (apt; scripts/install-system-deps.sh) to run aarch64 bundles")
    out = tmp_path / "out"
    r = invoke(["optimize", tiny / "mlp.onnx", "-t", "rpi5", "--calib", tiny / "calib.npz", "--eval",
                tiny / "eval.npz", "--max-drop", "1%", "--ladder", "0.5,0.9", "--bundle", "-o", out])
    assert r.exit_code == 0, r.output
    assert "ESTIMATE of its prunable layers (rpi5 cost model, 4 cores; not measured)" in r.output
    assert "onnxruntime: not measured and not estimated" in r.output
    x = np.load(tiny / "eval.npz")["x"][:1]
    np.savez(tmp_path / "in.npz", x=x)
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(["qemu-aarch64", "-L", str(tmp_path / "empty"), "./run", "-i", str(tmp_path / "in.npz"),
                           "-o", str(tmp_path / "y.npz")], cwd=out / "artifact", capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], ort_run(out / "model.onnx", {"x": x})[0],
                               rtol=1e-3, atol=1e-4)


def test_target_without_device_rejects_what_needs_one(tiny, tmp_path):
    base = ["optimize", tiny / "mlp.onnx", "-t", "rpi5", "--calib", tiny / "calib.npz", "--eval", tiny / "eval.npz",
            "-o", tmp_path / "o", "--quiet"]
    for extra, words in ((["--latency-ms", "5"], "--latency-ms needs the model measured on 'rpi5'"),
                         (["--max-drop", "1%", "--threads", "1"], "cost model estimates all its 4 cores")):
        r = invoke(base + extra)
        assert r.exit_code == 2 and r.output.startswith("error: ") and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    with pytest.raises(O.UserError, match="can be timed only on the device"):
        _run(tiny, tmp_path / "o", target="rpi5", max_drop=0.01, measure=True)


# ---------------------------------------------------------------------------------------------------- progress
class _Tty:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_per_phase_and_quiet(tiny, tmp_path, monkeypatch, quiet):
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    _run(tiny, tmp_path / "out", max_drop=0.01, quiet=quiet, measure=False, baselines=False)
    if quiet:
        assert tty.text == ""
    else:
        for phase in ("latency table", "sensitivity table", "searching", "evaluating candidates", "compiling model",
                      "benchmarking model", "chosen"):
            assert phase in tty.text, phase


def test_recover_steps_distil_each_evaluated_pruned_configuration(tiny, tmp_path, monkeypatch):
    """--recover-steps runs the recover stage on every evaluated configuration that prunes, before quantize."""
    pytest.importorskip("torch")
    from edge_sparse import recover as R

    real, seen = R.recover, []

    def spy(student, teacher, data, *a, **k):
        seen.append(k["steps"])
        return real(student, teacher, data, *a, **k)

    monkeypatch.setattr(R, "recover", spy)
    front = _run(tiny, tmp_path / "out", max_drop=0.05, recover_steps=3, measure=False, baselines=False)
    pruned = [p for p in front["points"] if any(":" in k for k in p["summary"])]
    assert front["recover_steps"] == 3 and len(seen) == len(pruned) > 0 and set(seen) == {3}
    x = np.load(tiny / "eval.npz")["x"]
    assert _cosine_drop(tmp_path / "out" / "model.onnx", tiny / "mlp.onnx", x) <= 0.05


# ------------------------------------------------------------------------------------- recognizer and classifier
@pytest.fixture(scope="module")
def ctc(tiny):
    """The tiny MLP with a softmax over its 64 outputs per frame: a [1, 8 frames, 64 classes] CTC recognizer."""
    from onnx import helper

    proto = onnx.load(tiny / "mlp.onnx")
    for n in proto.graph.node:
        n.output[:] = ["logits" if o == "y" else o for o in n.output]
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], name="ctc/Softmax", axis=-1))
    onnx.checker.check_model(proto)
    path = tiny / "ctc.onnx"
    onnx.save(proto, path)
    return path


def test_line_agreement_budget_holds_on_a_ctc_recognizer(tiny, ctc, tmp_path):
    budget = 0.2
    front = _run(tiny, tmp_path / "out", model=ctc, max_drop=budget, metric="line-agreement", measure=False,
                 baselines=False)
    x = np.load(tiny / "eval.npz")["x"]
    dense = np.concatenate([ort_run(ctc, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([ort_run(tmp_path / "out" / "model.onnx", {"x": x[i:i + 1]})[0] for i in range(len(x))])
    agree = np.mean([a == b for a, b in zip(_greedy_lines(dense), _greedy_lines(got))])
    assert front["metric"] == "line-agreement" and front["chosen"]["drop"] == pytest.approx(1 - agree, abs=1e-9)
    assert 1 - agree <= budget
    # every evaluated point's drop is its real line disagreement: some candidate lost lines, so the metric bites
    assert any(p["drop"] > 0 for p in front["points"])


def test_line_agreement_needs_a_sequence_of_class_scores(tiny, tmp_path):
    r = invoke(["optimize", tiny / "mlp.onnx", "--calib", tiny / "calib.npz", "--eval", tiny / "eval.npz",
                "--max-drop", "1%", "--metric", "line-agreement", "--no-measure", "--ladder", "0.5",
                "-o", tmp_path / "o", "--quiet"])
    assert r.exit_code == 2 and r.output.startswith("error: --metric line-agreement needs a CTC recognizer"), r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_top1_budget_holds_on_a_cnn_classifier(tmp_path):
    """The PP-OCR cls shape of problem: 1x1 convs prunable, a Gemm + Softmax head, top-1 agreement as the metric."""
    from edge_sparse.models import synthetic

    synthetic.save(synthetic.cnn(size=32, width=32, classes=4, seed=2), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    x = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    budget = 0.1
    front = O.optimize(tmp_path / "cnn.onnx", tmp_path / "out", calib=tmp_path / "calib.npz",
                       eval_data=tmp_path / "eval.npz", max_drop=budget, metric="top1", ladder=(0.5, 0.9),
                       measure=False, baselines=False, quiet=True, **FAST)
    dense = np.concatenate([ort_run(tmp_path / "cnn.onnx", {"x": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([ort_run(tmp_path / "out" / "model.onnx", {"x": x[i:i + 1]})[0] for i in range(len(x))])
    agree = float(np.mean(dense.argmax(-1) == got.argmax(-1)))
    assert front["chosen"]["drop"] == pytest.approx(1 - agree, abs=1e-9) and 1 - agree <= budget
    assert any(":" in k for p in front["points"] for k in p["summary"])      # pruned candidates were evaluated


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_int8_layers_are_per_channel_in_the_chosen_scheme_and_compile_to_what_onnxruntime_computes(tiny, scheme):
    """An int8 option is applied as ``quantize`` per output channel with the search's ``int8_scheme``: dynamic
    (MatMulInteger, activation ranges per call; the default) or static (QDQ); our int8 kernels then compute what
    onnxruntime computes on that ONNX."""
    from edge_sparse import targets
    from edge_sparse.compiler import compile as compile_model
    from edge_sparse.runtime import load

    proto = onnx.load(tiny / "mlp.onnx")
    calib = dict(np.load(tiny / "calib.npz"))
    work, layers = O._find_layers(tiny / "mlp.onnx", proto, targets.get("host"), ["16x1"], [0.5], True, None, None)
    int8 = [la for la in layers if "int8" in la.options]
    assert len(int8) >= 2
    model = O._apply(work, layers, {la.name: "int8" if la in int8 else "fp32" for la in layers}, calib, None, None,
                     0, scheme)
    ops = [n.op_type for n in model.graph.node]
    if scheme == "dynamic":
        assert ops.count("MatMulInteger") == len(int8) and "QuantizeLinear" not in ops
    else:
        assert "MatMulInteger" not in ops and ops.count("QuantizeLinear") >= len(int8)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    n_out = sorted(la.kernel.N for la in int8)
    scales = sorted(v.size for k, v in inits.items() if k.endswith("scale") and v.dtype == np.float32 and v.size > 1)
    assert all(n in scales for n in n_out), (n_out, scales)          # one weight scale per output channel
    path = tiny / f"int8-{scheme}.onnx"
    onnx.save(model, path)
    compile_model(str(path), "host", tiny / f"art-{scheme}", threads=1, quiet=True, force=True)
    x = np.load(tiny / "eval.npz")["x"][:1]
    got = next(iter(load(tiny / f"art-{scheme}").run({"x": x}).values()))
    np.testing.assert_allclose(got, ort_run(path, {"x": x})[0], rtol=2e-2, atol=2e-2)
