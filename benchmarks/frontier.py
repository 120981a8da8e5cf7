"""Accuracy-latency frontier of ``edge-sparse optimize`` for a zoo model on its real evaluation data (host).

    python benchmarks/frontier.py --model minilm-l6|ppocr-rec|ppocr-cls [--threads 1] [--max-drop 1%]

Data (``edge_sparse.models.data``, from packages, never a hub; calibration, selection and test samples disjoint):

- ``--calib N`` calibration samples (``data.dataset(model, "calib")``: Wikipedia passages from gensim's test data
  for MiniLM, rendered trdg lines for PP-OCR) feed the latency/sensitivity tables, the pruning statistics and the
  int8 ranges;
- ``--select N`` held-out samples (the first N of the ``eval`` split) are what ``optimize`` measures its candidates
  on (``--metric``, label-free, against the dense model) to pick the fastest one within ``--max-drop``;
- ``--eval N`` further held-out samples (the next N of the ``eval`` split, never seen by the search) give the
  reported real metrics through ``data.score``: MiniLM cosine to dense and Spearman on the 1,225 human-scored Lee
  document pairs; PP-OCR rec line accuracy and CER against the ground truth; cls accuracy on lines rotated 0/180.
  The dense model's own score, onnxruntime int8's and ours (the compiled artifact's outputs) stand side by side.
  The three sets are checked disjoint sample by sample; the JSON lists each set's per-sample digests.

Metrics for the search (``--metric``; default per model): ``pooled-cosine`` (MiniLM), ``line-agreement``
(PP-OCR rec: share of lines whose greedy CTC decode equals the dense model's), ``top1`` (PP-OCR cls).

Timing: ``--rounds`` alternating rounds, each: our artifact and onnxruntime fp32 side by side in one
``bench --compare`` call, then onnxruntime int8 (``quantize_dynamic``, MatMul/Gemm) and, for CNNs, onnxruntime int8
static QDQ (``quantize_static``, per-channel, calibrated on the same calibration samples); ratios come from the
medians over rounds. The JSON records the 1-minute load average before and after each round (``host_shared`` when
it exceeded the thread count + 1): on a shared host only the side-by-side ratios are meaningful.

``--extra NAME=MODEL.onnx`` (repeatable) adds a model prepared elsewhere, typically a pruned model distilled with
``edge-sparse recover`` on a GPU (recovery the 2-core search cannot afford): compiled for the host, scored on the
same test samples and timed in the same rounds; the JSON's ``extra_points`` gives its real metrics, its drop from the
dense model on the headline metric against ``--max-drop``, and its ratios to onnxruntime fp32 / int8.

Raspberry Pi 4 / 5 figures are estimates, not measurements: the chosen configuration's layers through the cost
model ``optimize`` uses (``--no-measure`` path, all the preset's cores), times the whole model's measured time here
over its layers' measured latency-table time here (the rest of the model as a proportional overhead).
``--reestimate RESULT.json`` recomputes them for a written result without re-timing.
Each Pi's own choice (``--pi-targets``, default rpi4,rpi5): ``optimize -t PRESET`` without the device, i.e. its cost
model's latency table, the same calibration and selection samples and budget, accuracy measured here; the JSON's
``raspberry_pi_choices`` has the chosen configuration, its estimated layer time (and whole-model time by the same
ratio as above) and its real metrics on the test samples (the chosen ONNX in onnxruntime on this host).
``--pi-only RESULT.json`` runs just these searches for a written result (same settings and samples).

Writes ``--out`` (default ``benchmarks/results/frontier-MODEL-tTHREADS``) ``.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "split_data", "sample_digests", "summarize_rounds", "headline_row", "real_scores", "pi_estimates"]

METRIC = {"minilm-l6": "pooled-cosine", "ppocr-rec": "line-agreement", "ppocr-cls": "top1"}
CNN = {"ppocr-cls"}                        # static QDQ baseline as well (onnxruntime's recommended int8 for CNNs)
# each onnxruntime int8 baseline's key in a timing round
INT8_ROW = {"onnxruntime int8": "ort_int8_ms", "onnxruntime int8 per channel": "ort_int8_pc_ms",
            "onnxruntime int8 QDQ": "ort_int8_qdq_ms"}


def _median(xs):
    return float(np.median(xs)) if xs else None


def sample_digests(inputs: dict[str, np.ndarray]) -> list[str]:
    """One short content hash per sample (:func:`edge_sparse.passes.calibrate.sample_hashes`, first 16 hex digits):
    what identifies a sample."""
    from edge_sparse.passes import calibrate

    return [h[:16] for h in calibrate.sample_hashes(inputs)]


def split_data(model: str, n_calib: int, n_select: int, n_eval: int) -> dict:
    """The benchmark's disjoint sample sets of a zoo ``model``: ``calib`` (the calib split), ``select`` (inputs of the
    first ``n_select`` eval samples: what optimize selects on) and ``test`` (the next ``n_eval``: the reported real
    metrics), ``pairs`` (MiniLM's Lee pairs, else None) and ``digests`` (per set, one per sample). Raises
    SystemExit when two sets share a sample (or calibration shares a text with the held-out ones)."""
    from edge_sparse import models
    from edge_sparse.models import data

    calib = data.dataset(model, "calib", n_calib)
    held = data.dataset(model, "eval", n_select + n_eval)
    select = {k: v[:n_select] for k, v in held.inputs.items()}
    test = data.Dataset(model, "eval", {k: v[n_select:] for k, v in held.inputs.items()}, held.texts[n_select:],
                        labels=held.labels[n_select:] if held.labels is not None else None, source=held.source)
    pairs = data.dataset(model, "pairs") if models.recipes()[model].task == "sentence-embedding" else None
    if set(held.texts) & set(calib.texts):
        raise SystemExit("held-out and calibration texts overlap: the data loaders are broken")
    digests = {"calib": sample_digests(calib.inputs), "select": sample_digests(select),
               "test": sample_digests(test.inputs)}
    names = list(digests)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if set(digests[a]) & set(digests[b]):
                raise SystemExit(f"the {a} and {b} samples overlap: the data loaders are broken")
    return {"calib": calib, "select": select, "test": test, "pairs": pairs, "held_source": held.source,
            "digests": digests}


def host_load(loads: list[float], threads: int) -> dict:
    """``host_shared`` and its note from the 1-minute load averages read before and after each timing round: shared
    when the load (our own timing threads included) ever exceeded ``threads`` + 1."""
    cores = os.cpu_count() or 1
    peak = max(loads)
    shared = peak > threads + 1.0
    note = (f"host: {cores} cores, 1-minute load average up to {peak:.1f} during the timing rounds (other jobs "
            "running): only the side-by-side ratios are meaningful, not the absolute times" if shared else
            f"host: {cores} cores, 1-minute load average up to {peak:.1f} during the timing rounds (no other job)")
    return {"host_shared": shared, "load_average_1min": [round(x, 2) for x in loads], "note": note}


def summarize_rounds(rounds: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(median per runtime over the alternating rounds, our speedup over each onnxruntime baseline from those
    medians)."""
    med = {k: _median([r[k] for r in rounds]) for k in rounds[0]}
    speed = {"vs_onnxruntime_fp32": round(med["ort_fp32_ms"] / med["ours_ms"], 3),
             "vs_onnxruntime_int8": round(med["ort_int8_ms"] / med["ours_ms"], 3)}
    if "ort_int8_qdq_ms" in med:
        speed["vs_onnxruntime_int8_qdq"] = round(med["ort_int8_qdq_ms"] / med["ours_ms"], 3)
    if "ort_int8_pc_ms" in med:
        speed["vs_onnxruntime_int8_per_channel"] = round(med["ort_int8_pc_ms"] / med["ours_ms"], 3)
    return med, speed


def parse_extras(specs: list[str]) -> dict[str, Path]:
    """``--extra NAME=MODEL.onnx`` values as {name: path}; a bad one exits with one line."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --extra wants NAME=MODEL.onnx, got '{spec}'")
        if name in out or name in ("ours", "dense fp32 (onnxruntime)") or name.startswith("onnxruntime"):
            raise SystemExit(f"error: --extra name '{name}' is taken; choose another")
        if not Path(path).is_file():
            raise SystemExit(f"error: --extra {name}: no such file {path}")
        out[name] = Path(path)
    return out


def extra_points(model: str, extras: dict[str, Path], scores: dict, med: dict, max_drop) -> dict:
    """Each ``--extra`` model as a measured point: its real metrics, the headline metric's drop from the dense model
    (absolute, as optimize's budget), and its speedups from the medians of the same alternating rounds."""
    from edge_sparse import models
    from edge_sparse.models import data
    from edge_sparse.optimize import parse_drop
    from edge_sparse.util import sha256_file

    key = data.PRIMARY[models.recipes()[model].task]
    dense = scores["dense fp32 (onnxruntime)"][key]
    out = {}
    for name, path in extras.items():
        ms = med[f"extra:{name}_ms"]
        drop = dense - scores[name][key]
        out[name] = {"file": path.name, "sha256": sha256_file(path), "metric": key, "value": scores[name][key],
                     "dense": dense, "drop": round(drop, 6), "within_budget": drop <= parse_drop(max_drop) + 1e-12,
                     "real_metrics": scores[name], "median_ms": ms,
                     "vs_onnxruntime_fp32": round(med["ort_fp32_ms"] / ms, 3),
                     "vs_onnxruntime_int8": round(med["ort_int8_ms"] / ms, 3)}
    return out


def _short(summary: dict[str, int]) -> str:
    return ", ".join(f"{n} x {k}" for k, n in sorted(summary.items(), key=lambda kv: -kv[1]))


def headline_row(result: dict) -> str:
    """The README headline table's row for a result written by :func:`main` (markdown)."""
    from edge_sparse import models
    from edge_sparse.models import data

    model = result["model"].split()[0]
    key = data.PRIMARY[models.recipes()[model].task]          # the task's headline metric
    real = result["real_metrics"]
    ours = real["ours"]
    int8 = real.get("onnxruntime int8", {})
    med, sp = result["median_ms"], result["speedup"]
    chosen = _short(result["chosen"]["summary"])
    metric = (f"{key}, {result['data']['test']['samples']} held-out test samples: "
              f"{real['dense fp32 (onnxruntime)'][key]:.4g} / {int8.get(key, float('nan')):.4g} / **{ours[key]:.4g}**")
    if "spearman_human" in ours:
        metric += (f"; Spearman vs human scores: {real['dense fp32 (onnxruntime)']['spearman_human']:.4f} / "
                   f"{int8.get('spearman_human', float('nan')):.4f} / **{ours['spearman_human']:.4f}**")
    vs_int8 = f"**{sp['vs_onnxruntime_int8']:.2f}x** ({med['ort_int8_ms']:.3g} ms)"
    if "vs_onnxruntime_int8_per_channel" in sp:
        pc = real.get("onnxruntime int8 per channel", {})
        vs_int8 += (f", {sp['vs_onnxruntime_int8_per_channel']:.2f}x per channel ({med['ort_int8_pc_ms']:.3g} ms, "
                    f"{key} {pc.get(key, float('nan')):.4g})")
    if "vs_onnxruntime_int8_qdq" in sp:
        vs_int8 += f", {sp['vs_onnxruntime_int8_qdq']:.2f}x static QDQ ({med['ort_int8_qdq_ms']:.3g} ms)"
    own = result.get("raspberry_pi_choices") or {}
    pis = result.get("raspberry_pi_estimates", {})
    if own:             # each Pi's own choice: estimated whole-model time, and what it chose
        pi = " / ".join(f"{own[n]['whole_model_ms']:.3g} ms ({_short(own[n]['chosen'])})"
                        for n in ("rpi5", "rpi4") if n in own)
    else:               # the host's choice through the Pis' cost models
        pi = " / ".join(f"{pis[n]['ours_ms']:.3g} ms" for n in ("rpi5", "rpi4") if n in pis)
    return (f"| {model} ({result['metric']}) | {chosen} | {metric} | **{sp['vs_onnxruntime_fp32']:.2f}x** "
            f"({med['ours_ms']:.3g} vs {med['ort_fp32_ms']:.3g} ms) | {vs_int8} | {pi} |")


def _artifact_runner(art):
    from edge_sparse.runtime import load

    m = load(art)
    return lambda feeds: m.run(feeds)


def _ort_runner(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, feeds)))


def _outputs(run, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``run`` (batch-1 callable) over every sample of ``inputs``, outputs concatenated by name."""
    n = int(next(iter(inputs.values())).shape[0])
    got: dict[str, list] = {}
    for i in range(n):
        for k, v in run({k: v[i:i + 1] for k, v in inputs.items()}).items():
            got.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in got.items()}


def real_scores(model: str, runners: dict, test, pairs=None, charset=None) -> dict[str, dict]:
    """``data.score`` of every runtime in ``runners`` (the first is the dense reference) on ``test`` (and the Lee
    ``pairs`` for MiniLM), as the pruning report scores them (:func:`edge_sparse.evaluation.score_outputs`):
    ``{runtime: metrics}``."""
    from edge_sparse.evaluation import EvalSet, score_outputs
    from edge_sparse.models import data

    sets = {"eval": test, **({"pairs": pairs} if pairs is not None else {})}
    ev = EvalSet(data.stack(sets), "eval", test.describe(), sets=sets, charset=charset)
    scores = score_outputs(ev, {name: _outputs(run, ev.inputs) for name, run in runners.items()})
    scores.pop("outputs")                                     # per-output cosine detail: not part of this table
    return scores


def pi_estimates(src: Path, front: dict, ours_ms: float, input_shapes, presets=("rpi4", "rpi5")) -> dict:
    """Cost-model latency of the chosen configuration (and of our dense fp32 compile) on the Raspberry Pis."""
    import onnx

    from edge_sparse import targets
    from edge_sparse.optimize import _estimate, _find_layers

    config = front["chosen"]["config"]
    table = {la["name"]: la["latency_us"] for la in front["layers"]}
    host_layers = sum(table[n][k]["us"] for n, k in config.items())
    whole = ours_ms * 1e3 / max(host_layers, 1e-9)       # whole model / its table layers, measured here
    proto = onnx.load(str(src))
    out = {}
    for name in presets:
        preset = targets.get(name)
        _, layers = _find_layers(src, proto, preset, tuple(front["patterns"]), front["ladder"], True, input_shapes,
                                 None)
        layers = {la.name: la for la in layers if la.name in config}
        missing = sorted(set(config) - set(layers))
        fallback = [n for n, la in layers.items() if config[n] not in la.options]
        ours = sum(_estimate(la.kernel, config[n] if config[n] in la.options else "fp32", preset)
                   for n, la in layers.items())
        dense = sum(_estimate(la.kernel, "fp32", preset) for la in layers.values())
        out[name] = {"estimate": True, "threads": int(preset.device.get("cores", 1)),
                     "ours_ms": round(ours * whole / 1e3, 3), "ours_dense_fp32_ms": round(dense * whole / 1e3, 3),
                     "speedup_vs_ours_dense_fp32": round(dense / max(ours, 1e-9), 3),
                     "layers_ms": round(ours / 1e3, 3), "whole_model_factor": round(whole, 4),
                     "options_unavailable_on_target": len(fallback) + len(missing)}
    out["method"] = ("estimate, not a measurement: the chosen configuration's layers (and all-dense fp32 layers) "
                     "through optimize's cost model on the preset (all its cores), times whole_model_factor = the "
                     "whole model's time measured here / its layers' latency-table time measured here (the rest of "
                     "the model as a proportional overhead); the configuration is the one chosen for this host "
                     "(each Pi's own choice: raspberry_pi_choices); no onnxruntime figure on the Pi")
    return out


def pi_choices(src: Path, calib_npz: Path, select_npz: Path, test, pairs, charset, work: Path, *, model: str,
               metric: str, max_drop, samples: int, max_evals: int, ladder, shapes, cache=None,
               whole_model_factor: float | None = None, presets=("rpi4", "rpi5")) -> dict:
    """Each Raspberry Pi's own choice: ``optimize -t PRESET`` without the device (its cost model's latency table,
    accuracy measured here on the same selection samples), then the chosen ONNX's real metrics on the test samples
    in onnxruntime beside the dense model's."""
    from edge_sparse.optimize import optimize

    out: dict = {}
    runners = {"dense fp32 (onnxruntime)": _ort_runner(src)}
    for name in presets:
        front = optimize(src, work / f"opt-{name}", target=name, calib=calib_npz, eval_data=select_npz,
                         max_drop=max_drop, metric=metric, cache_dir=cache, quiet=False, sensitivity_samples=samples,
                         max_evals=max_evals, ladder=ladder, input_shapes=shapes)
        runners[name] = _ort_runner(work / f"opt-{name}" / "model.onnx")
        ch = front["chosen"]
        dense_ms = sum(la["latency_us"]["fp32"]["us"] for la in front["layers"]) / 1e3
        out[name] = {"latency_source": front["latency_source"], "threads": front["threads"],
                     "chosen": ch["summary"], "select_drop": ch["drop"], "layers_ms": ch["latency_ms"],
                     "dense_fp32_layers_ms": round(dense_ms, 5),
                     "speedup_vs_dense_fp32_layers": round(dense_ms / max(ch["latency_ms"], 1e-12), 3)}
        if whole_model_factor is not None:
            out[name]["whole_model_ms"] = round(ch["latency_ms"] * whole_model_factor, 3)
    print(f"real metrics of the Raspberry Pi choices on {len(test)} test samples (onnxruntime)", flush=True)
    scores = real_scores(model, runners, test, pairs, charset)
    for name in presets:
        out[name]["real_metrics"] = scores[name]
    out["dense_real_metrics"] = scores["dense fp32 (onnxruntime)"]
    out["method"] = ("estimate, not a measurement: optimize -t PRESET with no device (its cost model's latency table; "
                     "all its cores); layers_ms covers the prunable layers only, whole_model_ms scales it by the "
                     "whole-model / table-layers time ratio measured on this host; select_drop is the search metric on "
                     "the selection samples, real_metrics the chosen ONNX in onnxruntime on this host on the test "
                     "samples (the same numerics the search evaluated); no onnxruntime latency on the Pi")
    return out


def _reestimate(path: Path) -> int:
    """Recompute the Raspberry Pi estimates of a written result (the cost model changed; no re-timing)."""
    import json

    from edge_sparse import models
    from edge_sparse.util import atomic_write, json_text

    result = json.loads(path.read_text())
    model = result["model"].split()[0]
    rec = models.recipes()[model]
    result["raspberry_pi_estimates"] = pi_estimates(Path(models.get(model, quiet=True)), result["frontier"],
                                                    result["median_ms"]["ours_ms"],
                                                    {k: tuple(v) for k, v in rec.input_shapes.items()})
    atomic_write(path, json_text(result, indent=1) + "\n")
    print(f"{path}: {result['raspberry_pi_estimates']}")
    return 0


def _pi_only(path: Path, presets, cache) -> int:
    """Run the Raspberry Pi searches of a written result again (its settings, the same samples: their digests are
    checked) and write them into it; the host figures are kept as they are."""
    import json

    from edge_sparse import models
    from edge_sparse.models.zoo import ocr_charset
    from edge_sparse.util import atomic_write, json_text

    result = json.loads(path.read_text())
    model, st = result["model"].split()[0], result["settings"]
    rec = models.recipes()[model]
    src = Path(models.get(model, quiet=True))
    splits = split_data(model, st["calib"], st["select"], st["eval"])
    recorded = result["data"].get("sample_sha256_16")
    same = recorded == splits["digests"] if recorded is not None else \
        result["data"]["calib"]["source"] == splits["calib"].source and \
        result["data"]["test"]["source"] == splits["held_source"]      # older results: the sources, at least
    if not same:
        raise SystemExit(f"{path}: the data loaders now give other samples than the result used; rerun it whole")
    shapes = {k: tuple(v) for k, v in rec.input_shapes.items()}
    factor = result["raspberry_pi_estimates"]["rpi5"]["whole_model_factor"]
    with tempfile.TemporaryDirectory(prefix="frontier-pi-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", **splits["calib"].inputs)
        np.savez(tmp / "select.npz", **splits["select"])
        result["raspberry_pi_choices"] = pi_choices(
            src, tmp / "calib.npz", tmp / "select.npz", splits["test"], splits["pairs"],
            ocr_charset(src) if rec.task == "ocr-rec" else None, tmp, model=model, metric=result["metric"],
            max_drop=result["max_drop"], samples=st["sensitivity_samples"], max_evals=st["max_evals"],
            ladder=[float(x) for x in str(st["ladder"]).split(",")], shapes=shapes, cache=cache,
            whole_model_factor=factor, presets=presets)
    was, now = result["real_metrics"]["dense fp32 (onnxruntime)"], result["raspberry_pi_choices"]["dense_real_metrics"]
    if any(abs(was[k] - now[k]) > 1e-6 for k in set(was) & set(now)):
        raise SystemExit(f"{path}: the dense model scores {now} on the test samples now, {was} in the result: other "
                         f"samples; rerun it whole")
    if recorded is None:
        result["data"]["sample_sha256_16"] = splits["digests"]
    atomic_write(path, json_text(result, indent=1) + "\n")
    for name in presets:
        c = result["raspberry_pi_choices"][name]
        print(f"{name}: {c['chosen']}, drop {c['select_drop']}, layers {c['layers_ms']} ms (estimate)")
    return 0


def _quantize_static_qdq(src: Path, dst: Path, calib: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edge_sparse.quantization import _quiet_ort_logging

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = int(next(iter(calib.values())).shape[0])
            self.it = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.it, None)

    with _quiet_ort_logging():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", choices=sorted(METRIC))
    p.add_argument("--max-drop", default="1%")
    p.add_argument("--metric", default=None, help="optimize's search metric (default: per model, see above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib", type=int, default=64, help="calibration samples")
    p.add_argument("--select", type=int, default=64, help="held-out samples optimize selects the configuration on")
    p.add_argument("--eval", type=int, default=200, help="further held-out samples for the reported real metrics")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0, help="timing per runtime and round (after warm-up)")
    p.add_argument("--samples", type=int, default=16, help="calibration samples per sensitivity run")
    p.add_argument("--ladder", default="0.5,0.6,0.7,0.8,0.9", help="sparsities tried per layer")
    p.add_argument("--max-evals", type=int, default=12, help="configurations measured on the held-out data")
    p.add_argument("--cache", default=None, help="latency cache directory (default: the user cache)")
    p.add_argument("--no-measure", action="store_true",
                   help="host latency table from the cost model, kernels not timed (quick runs; the chosen model and "
                        "onnxruntime are still timed side by side)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/frontier-MODEL-tTHREADS)")
    p.add_argument("--reestimate", metavar="JSON", help="only recompute the Raspberry Pi estimates of a result file")
    p.add_argument("--pi-targets", default="rpi4,rpi5",
                   help="presets searched without the device (optimize -t PRESET, cost model); '' for none")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL.onnx",
                   help="also compile this ONNX of the same model (e.g. a pruned model distilled with 'edge-sparse "
                        "recover' on a GPU) for the host, score it on the test samples and time it in the same rounds "
                        "(repeatable): a measured point beside optimize's choice")
    p.add_argument("--pi-only", metavar="JSON",
                   help="only (re)run the --pi-targets searches of a result file, on its settings and samples")
    args = p.parse_args(argv)
    extras = parse_extras(args.extra)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    pi_targets = tuple(t.strip() for t in args.pi_targets.split(",") if t.strip())
    if args.reestimate:
        return _reestimate(Path(args.reestimate))
    if args.pi_only:
        return _pi_only(Path(args.pi_only), pi_targets, args.cache)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_sparse import models
    from edge_sparse.benchmark import bench, run_ort
    from edge_sparse.compiler import compile as compile_model
    from edge_sparse.models.zoo import ocr_charset
    from edge_sparse.optimize import optimize
    from edge_sparse.quantization import DYNAMIC_OPS, _quiet_ort_logging
    from edge_sparse.util import atomic_write, json_text, latency_stats

    model = args.model
    metric = args.metric or METRIC[model]
    rec = models.recipes()[model]
    src = Path(models.get(model, quiet=True))
    out = Path(args.out or f"benchmarks/results/frontier-{model}-t{args.threads}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_data = time.perf_counter()
    splits = split_data(model, args.calib, args.select, args.eval)
    calib, select, test, pairs = splits["calib"], splits["select"], splits["test"], splits["pairs"]
    charset = ocr_charset(src) if rec.task == "ocr-rec" else None
    print(f"data: {args.calib} calib ({calib.source}), {args.select} select + {args.eval} test held out "
          f"({splits['held_source']}) in {time.perf_counter() - t_data:.1f} s", flush=True)
    shapes = {k: tuple(v) for k, v in rec.input_shapes.items()}
    ladder = [float(x) for x in args.ladder.split(",")]
    with tempfile.TemporaryDirectory(prefix="frontier-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", **calib.inputs)
        np.savez(tmp / "select.npz", **select)
        t0 = time.perf_counter()
        front = optimize(src, tmp / "opt", calib=tmp / "calib.npz", eval_data=tmp / "select.npz",
                         max_drop=args.max_drop, metric=metric, threads=args.threads, cache_dir=args.cache,
                         quiet=False, sensitivity_samples=args.samples, max_evals=args.max_evals,
                         ladder=ladder, input_shapes=shapes, measure=False if args.no_measure else None)
        seconds = time.perf_counter() - t0
        art = tmp / "opt" / "artifact"
        int8 = {"onnxruntime int8": tmp / "int8.onnx"}
        with _quiet_ort_logging():
            quantize_dynamic(str(src), str(int8["onnxruntime int8"]), op_types_to_quantize=DYNAMIC_OPS,
                             weight_type=QuantType.QInt8)
            # the same with one weight scale per output channel: onnxruntime's most accurate dynamic int8 (what
            # optimize's int8 layers use), so the int8 baseline is also shown where its accuracy fits a 1% budget
            int8["onnxruntime int8 per channel"] = tmp / "int8pc.onnx"
            quantize_dynamic(str(src), str(int8["onnxruntime int8 per channel"]), op_types_to_quantize=DYNAMIC_OPS,
                             weight_type=QuantType.QInt8, per_channel=True)
        if model in CNN:
            int8["onnxruntime int8 QDQ"] = tmp / "qdq.onnx"
            _quantize_static_qdq(src, int8["onnxruntime int8 QDQ"], calib.inputs)

        print(f"real metrics on {args.eval} test samples (dense, onnxruntime int8, ours)", flush=True)
        runners = {"dense fp32 (onnxruntime)": _ort_runner(src)}
        runners.update({name: _ort_runner(path) for name, path in int8.items()})
        runners["ours"] = _artifact_runner(art)
        extra_arts = {}
        for name, path in extras.items():
            extra_arts[name] = tmp / f"extra-{len(extra_arts)}"
            compile_model(str(path), "host", extra_arts[name], input_shapes=shapes, threads=args.threads, quiet=True)
            runners[name] = _artifact_runner(extra_arts[name])
        scores = real_scores(model, runners, test, pairs, charset)
        for name, s in scores.items():
            print(f"  {name}: {s}", flush=True)

        x = {k: v[:1] for k, v in test.inputs.items()}
        rounds = []
        loads = [os.getloadavg()[0]]                 # 1-minute load average around the timing rounds
        for r in range(args.rounds):                 # alternate the runtimes; medians per round
            b = bench(art, threads=args.threads, compare=str(src), energy="none", inputs=x, quiet=True,
                      min_seconds=args.min_seconds)
            row = {"ours_ms": b["runs"][0]["latency"]["median_ms"], "ort_fp32_ms": b["runs"][1]["latency"]["median_ms"]}
            for name, a in extra_arts.items():
                e = bench(a, threads=args.threads, energy="none", inputs=x, quiet=True, min_seconds=args.min_seconds)
                row[f"extra:{name}_ms"] = e["runs"][0]["latency"]["median_ms"]
            for name, path in int8.items():
                q = run_ort(str(path), x, args.threads, 10, 50, args.min_seconds, None, None)
                row[INT8_ROW[name]] = latency_stats(q["samples_s"])["median_ms"]
            rounds.append(row)
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: " + ", ".join(f"{k[:-3]} {v:.3f} ms" for k, v in row.items()), flush=True)
        med, speed = summarize_rounds(rounds)
        pis = pi_estimates(src, front, med["ours_ms"], shapes)
        choices = pi_choices(src, tmp / "calib.npz", tmp / "select.npz", test, pairs, charset, tmp, model=model,
                             metric=metric, max_drop=args.max_drop, samples=args.samples, max_evals=args.max_evals,
                             ladder=ladder, shapes=shapes, cache=args.cache,
                             whole_model_factor=pis["rpi5"]["whole_model_factor"],
                             presets=pi_targets) if pi_targets else {}
        result = {
            "model": f"{model} ({src.name}, input {shapes})", "threads": args.threads,
            **host_load(loads, args.threads),
            "data": {"calib": calib.describe(),
                     "select": {"samples": args.select, "source": splits["held_source"], "split": "eval[:select]"},
                     "test": {"samples": args.eval, "source": splits["held_source"], "split": "eval[select:]"},
                     **({"pairs": pairs.describe()} if pairs is not None else {}),
                     "sample_sha256_16": splits["digests"]},
            "max_drop": args.max_drop, "metric": metric, "optimize_seconds": round(seconds, 1),
            "settings": {"sensitivity_samples": args.samples, "ladder": args.ladder, "max_evals": args.max_evals,
                         "rounds": args.rounds, "min_seconds": args.min_seconds, "measure_kernels": not args.no_measure,
                         "pi_targets": list(pi_targets), "calib": args.calib,
                         "select": args.select, "eval": args.eval},
            "chosen": {k: front["chosen"][k] for k in ("summary", "drop", "latency_ms", "predicted_ms")},
            "select_drops": {"ours": front["chosen"]["drop"],
                             **{k: v.get("drop") for k, v in front["baselines"].items()}},
            "real_metrics": scores, "rounds": rounds, "median_ms": med, "speedup": speed,
            "raspberry_pi_estimates": pis, "raspberry_pi_choices": choices, "frontier": front,
        }
        if extras:
            result["extra_points"] = extra_points(model, extras, scores, med, args.max_drop)
        atomic_write(out.with_suffix(".json"), json_text(result, indent=1) + "\n")
        if (tmp / "opt" / "frontier.png").is_file():
            shutil.copyfile(tmp / "opt" / "frontier.png", out.with_suffix(".png"))
    print(f"chosen {result['chosen']['summary']}: {metric} drop {100 * result['chosen']['drop']:.3f}% on the "
          f"selection samples; {med['ours_ms']:.3f} ms vs onnxruntime fp32 {med['ort_fp32_ms']:.3f} ms "
          f"({speed['vs_onnxruntime_fp32']:.2f}x) and int8 {med['ort_int8_ms']:.3f} ms "
          f"({speed['vs_onnxruntime_int8']:.2f}x), {args.threads} thread(s), {result['note']}")
    for name in ("rpi4", "rpi5"):
        e = pis[name]
        print(f"{name} (estimate, {e['threads']} threads): ours {e['ours_ms']} ms, our dense fp32 "
              f"{e['ours_dense_fp32_ms']} ms")
    for name in pi_targets:
        c = choices[name]
        print(f"{name} own choice (optimize -t {name}, cost-model estimate): {c['chosen']}, {metric} drop "
              f"{100 * c['select_drop']:.3f}%, layers {c['layers_ms']} ms vs their dense fp32 "
              f"{c['dense_fp32_layers_ms']} ms")
    for name, e in result.get("extra_points", {}).items():
        print(f"extra {name}: {e['metric']} {e['value']:.4g} (dense {e['dense']:.4g}, drop {100 * e['drop']:.2f} "
              f"points, {'within' if e['within_budget'] else 'outside'} the {args.max_drop} budget); "
              f"{e['median_ms']:.3f} ms: {e['vs_onnxruntime_fp32']:.2f}x onnxruntime fp32, "
              f"{e['vs_onnxruntime_int8']:.2f}x int8")
    print(f"README headline row:\n{headline_row(result)}")
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
