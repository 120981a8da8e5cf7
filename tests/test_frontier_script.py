"""Issue 16: ``benchmarks/frontier.py`` itself, end to end on the smallest zoo model (PP-OCR cls) with a handful of
real samples, a one-rung ladder, the cost-model kernel table (``--no-measure``: the models are still timed) and one
Pi search (rpi5; rpi4 vs rpi5 choices are tests/test_optimize.py's): the JSON's schema, ratios that are the measured
medians' ratios, the onnxruntime fp32 / int8 (dynamic and static QDQ) points, disjoint calibration / selection / test
samples (checked against the data loaders independently), the dense model's real metric recomputed with onnxruntime,
the Pi's own choice labelled an estimate, and the README headline row."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, ort_run

_ROOT = Path(__file__).resolve().parents[1]
N_CALIB, N_SELECT, N_EVAL = 4, 8, 12


def _script():
    spec = importlib.util.spec_from_file_location("frontier_bench", _ROOT / "benchmarks" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("frontier")
    fr = _script()
    from edge_sparse import models

    # an extra point: the model pruned elsewhere (here magnitude 16x1 at 50%; in practice a GPU-distilled model)
    from edge_sparse.models import data

    np.savez(d / "calib.npz", **data.dataset("ppocr-cls", "calib", N_CALIB).inputs)     # for prune's report
    r = invoke(["prune", models.get("ppocr-cls", quiet=True), "-o", d / "pruned.onnx", "-s", "0.5", "-p", "16x1",
                "-m", "magnitude", "--calib", d / "calib.npz", "-q"])
    assert r.exit_code == 0, r.output
    rc = fr.main(["--model", "ppocr-cls", "--threads", "1", "--calib", str(N_CALIB), "--select", str(N_SELECT),
                  "--eval", str(N_EVAL), "--samples", "1", "--ladder", "0.5", "--max-evals", "2", "--rounds", "3",
                  "--min-seconds", "0.1", "--no-measure", "--pi-targets", "rpi5", "--cache", str(d / "cache"),
                  "--extra", f"magnitude50={d / 'pruned.onnx'}", "--out", str(d / "result")])
    assert rc == 0
    return fr, json.loads((d / "result.json").read_text()), d


def test_result_schema_and_onnxruntime_points(run):
    _, res, d = run
    assert {"model", "threads", "host_shared", "note", "data", "max_drop", "metric", "settings", "chosen",
            "select_drops", "real_metrics", "rounds", "median_ms", "speedup", "raspberry_pi_estimates",
            "frontier"} <= set(res)
    assert res["model"].startswith("ppocr-cls") and res["metric"] == "top1" and res["threads"] == 1
    assert len(res["load_average_1min"]) == len(res["rounds"]) + 1 and isinstance(res["host_shared"], bool)
    assert (d / "result.png").stat().st_size > 1000
    # onnxruntime fp32 and int8 (dynamic; static QDQ for this CNN): timed every round, scored on the test samples
    assert len(res["rounds"]) == 3
    for row in res["rounds"]:
        assert set(row) == {"ours_ms", "ort_fp32_ms", "ort_int8_ms", "ort_int8_pc_ms", "ort_int8_qdq_ms",
                            "extra:magnitude50_ms"}
        assert all(v > 0 for v in row.values())
    assert set(res["real_metrics"]) == {"dense fp32 (onnxruntime)", "onnxruntime int8", "onnxruntime int8 per channel",
                                        "onnxruntime int8 QDQ", "ours", "magnitude50"}
    for scores in res["real_metrics"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["agreement"] <= 1.0
    base = res["frontier"]["baselines"]
    assert set(base) == {"onnxruntime fp32", "onnxruntime int8"} and all(b["latency_ms"] > 0 for b in base.values())
    assert res["chosen"]["drop"] <= 0.01 and res["frontier"]["chosen"]["summary"] == res["chosen"]["summary"]
    for name in ("rpi4", "rpi5"):
        pi = res["raspberry_pi_estimates"][name]
        assert pi["estimate"] is True and pi["ours_ms"] > 0 and pi["threads"] == 4


def test_each_pi_gets_its_own_choice_labelled_an_estimate(run):
    """optimize -t rpi4 / rpi5 without the device: cost-model latencies (labelled), the same budget met on the
    selection samples, the chosen ONNX's real metric on the test samples, whole-model time by the host's ratio."""
    fr, res, _ = run
    own = res["raspberry_pi_choices"]
    factor = res["raspberry_pi_estimates"]["rpi5"]["whole_model_factor"]
    assert factor > 0 and "estimate, not a measurement" in own["method"]
    assert own["dense_real_metrics"] == res["real_metrics"]["dense fp32 (onnxruntime)"]
    assert set(own) == {"rpi5", "dense_real_metrics", "method"}
    for name in ("rpi5",):
        c = own[name]
        assert c["latency_source"] == "estimate (cost model)" and c["threads"] == 4
        assert c["select_drop"] <= 0.01 and sum(c["chosen"].values()) == len(res["frontier"]["layers"])
        assert 0 < c["layers_ms"] and c["whole_model_ms"] == pytest.approx(c["layers_ms"] * factor, abs=2e-3)
        assert c["speedup_vs_dense_fp32_layers"] == pytest.approx(c["dense_fp32_layers_ms"] / c["layers_ms"],
                                                                  rel=1e-3)
        assert 0.0 <= c["real_metrics"]["accuracy"] <= 1.0
        assert f"{c['whole_model_ms']:.3g} ms ({fr._short(c['chosen'])})" in fr.headline_row(res)


def test_ratios_are_the_measured_medians_ratios(run):
    fr, res, _ = run
    med = {k: float(np.median([r[k] for r in res["rounds"]])) for k in res["rounds"][0]}
    assert res["median_ms"] == pytest.approx(med)
    assert res["speedup"] == {"vs_onnxruntime_fp32": round(med["ort_fp32_ms"] / med["ours_ms"], 3),
                              "vs_onnxruntime_int8": round(med["ort_int8_ms"] / med["ours_ms"], 3),
                              "vs_onnxruntime_int8_qdq": round(med["ort_int8_qdq_ms"] / med["ours_ms"], 3),
                              "vs_onnxruntime_int8_per_channel": round(med["ort_int8_pc_ms"] / med["ours_ms"], 3)}
    # the function the script uses, on rounds whose medians differ from their means and from any single round
    rounds = [{"ours_ms": 2.0, "ort_fp32_ms": 9.0, "ort_int8_ms": 3.0},
              {"ours_ms": 1.0, "ort_fp32_ms": 6.0, "ort_int8_ms": 8.0},
              {"ours_ms": 7.0, "ort_fp32_ms": 5.0, "ort_int8_ms": 4.0}]
    m, sp = fr.summarize_rounds(rounds)
    assert m == {"ours_ms": 2.0, "ort_fp32_ms": 6.0, "ort_int8_ms": 4.0}
    assert sp == {"vs_onnxruntime_fp32": 3.0, "vs_onnxruntime_int8": 2.0}
    # the README row quotes those ratios and medians
    row = fr.headline_row(res)
    sp = res["speedup"]
    assert row.startswith("| ppocr-cls (top1) |") and row.count(" | ") == 5
    assert f"**{sp['vs_onnxruntime_fp32']:.2f}x** ({res['median_ms']['ours_ms']:.3g} vs " \
           f"{res['median_ms']['ort_fp32_ms']:.3g} ms)" in row
    assert f"**{sp['vs_onnxruntime_int8']:.2f}x**" in row and f"{sp['vs_onnxruntime_int8_qdq']:.2f}x static QDQ" in row
    assert f"{sp['vs_onnxruntime_int8_per_channel']:.2f}x per channel" in row
    assert f"**{res['real_metrics']['ours']['accuracy']:.4g}**" in row


def test_sample_sets_are_disjoint_and_the_ones_the_loaders_give(run):
    fr, res, _ = run
    from edge_sparse import models
    from edge_sparse.models import data

    dig = res["data"]["sample_sha256_16"]
    assert [len(dig[k]) for k in ("calib", "select", "test")] == [N_CALIB, N_SELECT, N_EVAL]
    assert not set(dig["calib"]) & set(dig["select"]) and not set(dig["calib"]) & set(dig["test"])
    assert not set(dig["select"]) & set(dig["test"])
    # independently: the calib split, and the eval split cut at --select
    held = data.dataset("ppocr-cls", "eval", N_SELECT + N_EVAL)
    calib = data.dataset("ppocr-cls", "calib", N_CALIB)
    assert dig["calib"] == fr.sample_digests(calib.inputs)
    assert dig["select"] == fr.sample_digests({k: v[:N_SELECT] for k, v in held.inputs.items()})
    assert dig["test"] == fr.sample_digests({k: v[N_SELECT:] for k, v in held.inputs.items()})
    # optimize saw the calibration and selection samples only
    assert res["frontier"]["calibration_samples"] == N_CALIB and res["frontier"]["eval_samples"] == N_SELECT
    # the dense model's reported accuracy is its accuracy on the test samples (onnxruntime, recomputed here)
    src = models.get("ppocr-cls", quiet=True)
    x = held.inputs["x"][N_SELECT:]
    pred = [int(np.argmax(ort_run(src, {"x": x[i:i + 1]})[0])) for i in range(len(x))]
    acc = float(np.mean(np.array(pred) == np.array(held.labels[N_SELECT:])))
    assert res["real_metrics"]["dense fp32 (onnxruntime)"]["accuracy"] == pytest.approx(acc)


def test_split_data_refuses_overlapping_sets(monkeypatch):
    fr = _script()
    from edge_sparse.models import data

    real = data.dataset

    def leaky(model, split, count=None, cache_dir=None):     # eval serves calibration's renders under new texts
        d = real(model, "calib" if split == "eval" else split, count, cache_dir)
        return data.Dataset(d.model, split, d.inputs, [f"{split}-{i}" for i in range(len(d))], labels=d.labels,
                            source=d.source)

    monkeypatch.setattr(data, "dataset", leaky)
    with pytest.raises(SystemExit, match="calib and select samples overlap"):
        fr.split_data("ppocr-cls", 4, 2, 2)


def test_host_load_labels_a_shared_host_from_the_load_averages():
    fr = _script()
    idle = fr.host_load([0.9, 1.4, 1.2], threads=1)
    assert idle["host_shared"] is False and "no other job" in idle["note"]
    busy = fr.host_load([0.9, 6.3, 5.0], threads=1)
    assert busy["host_shared"] is True and "6.3" in busy["note"] and "only the side-by-side ratios" in busy["note"]
    assert fr.host_load([2.9], threads=2)["host_shared"] is False and fr.host_load([3.1], threads=2)["host_shared"]


def test_extra_point_is_scored_and_timed_beside_the_others(run):
    """``--extra``: the pruned ONNX compiled for the host, its accuracy the onnxruntime accuracy of that ONNX on the
    test samples (recomputed here), its ratios those of the round medians, its budget flag the drop from dense."""
    fr, res, d = run
    from edge_sparse.models import data

    (name, e), = res["extra_points"].items()
    assert name == "magnitude50" and e["metric"] == "accuracy" and e["file"] == "pruned.onnx"
    held = data.dataset("ppocr-cls", "eval", N_SELECT + N_EVAL)
    x = held.inputs["x"][N_SELECT:]
    pred = [int(np.argmax(ort_run(d / "pruned.onnx", {"x": x[i:i + 1]})[0])) for i in range(len(x))]
    assert e["value"] == pytest.approx(float(np.mean(np.array(pred) == np.array(held.labels[N_SELECT:]))))
    assert e["dense"] == res["real_metrics"]["dense fp32 (onnxruntime)"]["accuracy"]
    assert e["drop"] == pytest.approx(e["dense"] - e["value"]) and e["within_budget"] == (e["drop"] <= 0.01 + 1e-12)
    med = res["median_ms"]
    assert e["median_ms"] == med["extra:magnitude50_ms"]
    assert e["vs_onnxruntime_fp32"] == round(med["ort_fp32_ms"] / e["median_ms"], 3)
    assert e["vs_onnxruntime_int8"] == round(med["ort_int8_ms"] / e["median_ms"], 3)
    for bad in (["--extra", "noequals"], ["--extra", f"ours={d / 'pruned.onnx'}"], ["--extra", "x=/no/such.onnx"]):
        with pytest.raises(SystemExit, match="error: --extra"):
            fr.main(["--model", "ppocr-cls", *bad])
