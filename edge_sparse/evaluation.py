"""Accuracy of pruned / recovered / quantized models beside the reference model's on held-out data: the one code
path behind the ``accuracy`` sections of ``edge-sparse prune`` (``--eval``), ``prune --recover-steps``,
``edge-sparse recover --eval``, ``edge-sparse quantize --eval`` and ``optimize``'s ``frontier.json``, and behind the
benchmarks' real-metric tables (``benchmarks/frontier.py``; ``e2e.py`` and ``recovery.py`` through
:func:`edge_sparse.models.data.score_splits`).

Held-out data, by what the user passes:

- ``--eval DIR/<stem>.eval.npz`` written by ``edge-sparse models get NAME --eval N -o DIR``: its labels, texts and
  source are in ``<stem>.data.json`` beside it (and, for minilm-l6, the Lee pairs in ``<stem>.pairs.npz``). The real
  metrics of :func:`edge_sparse.models.data.score`: minilm-l6: cosine of the sentence embedding to the dense model's
  (and Spearman against the human scores and against the dense model on the 1,225 pairs); ppocr-rec: line accuracy
  and character error rate against the ground truth; ppocr-cls: accuracy on the 0/180 labels; each with agreement
  with the dense model's reading.
- ``--eval FILE.npz``, any other file of model inputs (no labels): label-free metrics against the dense model on
  those samples (the worst output's mean cosine, and top-1 agreement on class-score outputs).
- no ``--eval``: the same label-free metrics on the held-out part of ``--calib`` (``--holdout``), said so in the
  report; on the calibration part when nothing could be held out, on random inputs without calibration data.

The dense model is scored by the same function on the same samples, so its column is the reference the candidates'
numbers are read against (label-free metrics are 1 for it by definition).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx

from edge_sparse.errors import UserError

__all__ = ["EvalSet", "load_eval", "from_arrays", "fallback", "evaluate", "compare_parts", "score_outputs", "summary_text",
           "ORIGINS"]

# where the samples came from (the report's ``data.origin``)
ORIGINS = {"eval": "--eval", "holdout": "held-out part of --calib (--holdout)",
           "calibration": "calibration samples (nothing held out)", "random": "random inputs (no calibration data)"}
LABEL_FREE = ("cosine", "cosine_min", "top1_agreement")
DEFAULT_HOLDOUT = 0.25                # share of --calib held out for the report when there is no --eval


@dataclasses.dataclass
class EvalSet:
    """Samples to compare models on, and what is needed to score them."""

    inputs: dict[str, np.ndarray]              # every sample the models run on (labelled: eval, then the pairs')
    origin: str                                # a key of ORIGINS
    info: dict                                 # source, samples, file (the report's ``data``)
    sets: dict | None = None                   # labelled zoo splits {"eval": Dataset, "pairs": Dataset}, in order
    charset: list[str] | None = None           # ocr-rec's CTC classes (from the dense model)

    @property
    def labelled(self) -> bool:
        return self.sets is not None

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def _check_zoo_model(proto: onnx.ModelProto, model: str, path: Path) -> None:
    """The data's model must be the one being evaluated: its input names and shapes, and the outputs scored."""
    from edge_sparse.models import recipes
    from edge_sparse.passes import calibrate

    recipe = recipes()[model]
    specs = {s.name: s for s in calibrate.input_specs(proto)}
    outs = {o.name for o in proto.graph.output}
    same_inputs = set(specs) == set(recipe.input_shapes) and all(
        len(specs[k].dims) == len(v) and all(a in (None, b) for a, b in zip(specs[k].dims[1:], v[1:]))
        for k, v in recipe.input_shapes.items())
    if not same_inputs or not set(recipe.output_names) <= outs:
        shown = ", ".join(f"{s.name}{s.shown()}" for s in specs.values())
        raise UserError(f"--eval {path.name} holds {model}'s held-out data, but the model is not {model} (its inputs: "
                        f"{shown}; outputs: {', '.join(sorted(outs))}); pass the eval data written for this model")


def from_arrays(inputs: dict[str, np.ndarray], origin: str, source: str) -> EvalSet:
    """Unlabelled samples (label-free metrics): the held-out or calibration part, random inputs, or arrays."""
    from edge_sparse.passes import calibrate

    return EvalSet(inputs, origin, {"origin": ORIGINS[origin], "source": source,
                                    "samples": calibrate.sample_count(inputs)})


def holdout_share(holdout: float | None, eval_data) -> float:
    """The ``--holdout`` share of the calibration data to keep out: as given, else :data:`DEFAULT_HOLDOUT` without
    ``eval_data`` (the report falls back to those samples) and 0 with it (every calibration sample feeds the
    statistics)."""
    if holdout is not None:
        return holdout
    return 0.0 if eval_data is not None else DEFAULT_HOLDOUT


def fallback(calib_part: dict, held_part: dict, source: str, random: bool = False) -> tuple[EvalSet, list[str]]:
    """Without ``--eval``: the ``--holdout`` part of the calibration data (label-free), else the calibration part
    itself with a warning; ``random``: the calibration data are random inputs. Returns (samples, warnings)."""
    origin = "random" if random else ("holdout" if held_part else "calibration")
    warnings = [] if held_part else [
        "no held-out split (too few samples, --holdout 0, or every held-out sample repeats a calibration sample): "
        "accuracy is on calibration data only; pass --eval FILE.npz"]
    return from_arrays(held_part or calib_part, origin, source), warnings


def load_eval(data, proto: onnx.ModelProto, *, calib=None, calib_flag: str = "--calib") -> EvalSet:
    """The ``--eval`` samples for the dense model ``proto``: a path (labelled zoo data with its side file, or a plain
    ``.npz`` of model inputs), ``{input: array}``, or an :class:`EvalSet` (returned as is).

    ``calib`` (the calibration or training data, ``calib_flag`` names its option): refused when it is the same file;
    samples occurring in both are counted by :func:`overlap_warnings`."""
    from edge_sparse.models import data as zoo_data
    from edge_sparse.passes import calibrate

    if isinstance(data, EvalSet):
        return data
    specs = calibrate.input_specs(proto)
    if isinstance(data, dict):
        return from_arrays(calibrate.check_calibration(data, specs, "evaluation data"), "eval", "arrays")
    path = Path(data)
    if isinstance(calib, (str, os.PathLike)) and Path(calib).exists() and path.exists() and \
            path.resolve() == Path(calib).resolve():
        raise UserError(f"--eval and {calib_flag} are the same file ({path.name}); the evaluation samples must be held "
                        f"out: pass a disjoint file (e.g. 'edge-sparse models get NAME --calib N --train N --eval N')")
    sets = zoo_data.read_eval(path)
    if sets is None:
        ev = from_arrays(calibrate.load_calibration(path, specs), "eval", str(path))
        ev.info["file"] = str(path)
        return ev
    model = sets["eval"].model
    _check_zoo_model(proto, model, path)
    for ds in sets.values():
        ds.inputs = calibrate.check_calibration(ds.inputs, specs, f"{path.name} ({ds.split} split)")
    charset = None
    if zoo_data.recipes()[model].task == "ocr-rec":
        from edge_sparse.models.zoo import ocr_charset

        charset = ocr_charset(proto)
    ev = sets["eval"]
    info = {"origin": ORIGINS["eval"], "file": str(path), **ev.describe()}
    if "pairs" in sets:
        info["pairs"] = {"documents": len(sets["pairs"]), "pairs": int(len(sets["pairs"].pairs)),
                         "source": sets["pairs"].source}
    return EvalSet(zoo_data.stack(sets), "eval", info, sets=sets, charset=charset)


def overlap_warnings(ev: EvalSet, calib: dict[str, np.ndarray] | None, what: str = "calibration data") -> list[str]:
    """A warning when evaluation samples also occur (byte for byte) among the calibration (or training) samples."""
    from edge_sparse.passes import calibrate

    if calib is None or set(calib) != set(ev.inputs):
        return []
    seen = set(calibrate.sample_hashes(calib))
    n = len(ev.sets["eval"]) if ev.labelled else ev.samples
    shared = sum(h in seen for h in calibrate.sample_hashes({k: v[:n] for k, v in ev.inputs.items()}))
    return [f"{shared} of the {n} --eval samples also occur in the {what}: the accuracy is not on held-out data "
            f"only"] if shared else []


def _label_free(dense: dict, out: dict, classifiers) -> tuple[dict, dict]:
    """(summary, per-output detail) of ``out`` against ``dense``: worst output's mean / min cosine, top-1 agreement
    on class scores (worst output), from :func:`edge_sparse.passes.calibrate.compare`."""
    from edge_sparse.passes import calibrate

    per = calibrate.compare(dense, out, classifiers)
    floats = [m for m in per.values() if "cosine_mean" in m]
    res = {}
    if floats:
        worst = min(floats, key=lambda m: m["cosine_mean"])
        res.update(cosine=worst["cosine_mean"], cosine_min=min(m["cosine_min"] for m in floats))
    top1 = [m["top1_agreement"] for m in per.values() if "top1_agreement" in m]
    if top1:
        res["top1_agreement"] = float(min(top1))
    exact = [m["exact_match"] for m in per.values() if "exact_match" in m]
    if exact:
        res["exact_match"] = float(min(exact))
    return res, per


def score_outputs(ev: EvalSet, outputs: dict[str, dict[str, np.ndarray]], classifiers=frozenset()) -> dict:
    """Metrics of each model's ``outputs`` (``{name: {output: array}}`` over ``ev.inputs``; the first is the dense
    reference) on ``ev``: ``{name: metrics}``, plus per-output label-free detail under ``"outputs"``."""
    from edge_sparse.models import data as zoo_data

    names = list(outputs)
    ref = outputs[names[0]]
    res: dict = {}
    detail = {}
    for name in names:
        if ev.labelled:
            model = ev.sets["eval"].model
            keep = list(zoo_data.recipes()[model].output_names)
            scored = zoo_data.score_splits(ev.sets, {k: outputs[name][k] for k in keep},
                                           {k: ref[k] for k in keep}, ev.charset)
            metrics = dict(scored["eval"])
            pairs = scored.get("pairs", {})
            metrics.update({k: pairs[k] for k in ("spearman_human", "spearman_dense") if k in pairs})
            res[name] = {k: round(float(v), 6) for k, v in metrics.items()}
            if name != names[0]:
                n = len(ev.sets["eval"])
                _, detail[name] = _label_free({k: v[:n] for k, v in ref.items()},
                                              {k: v[:n] for k, v in outputs[name].items()}, classifiers)
        else:
            metrics, per = _label_free(ref, outputs[name], classifiers)
            res[name] = {k: round(float(v), 6) for k, v in metrics.items()}
            if name != names[0]:
                detail[name] = per
    return {**res, "outputs": detail}


def primary_metric(ev: EvalSet, metrics: dict) -> str:
    """The headline metric: the task's (:data:`edge_sparse.models.data.PRIMARY`) on labelled data, else top-1
    agreement for classifiers, else cosine."""
    if ev.labelled:
        from edge_sparse.models import data as zoo_data

        return zoo_data.PRIMARY[zoo_data.recipes()[ev.sets["eval"].model].task]
    return next((k for k in ("top1_agreement", "cosine", "exact_match") if k in metrics), "cosine")


def evaluate(reference: onnx.ModelProto, candidates: dict[str, onnx.ModelProto], ev: EvalSet,
             batch: int | None = None, reference_outputs: dict[str, np.ndarray] | None = None,
             reference_name: str = "dense") -> dict:
    """The report section ``accuracy.eval``: the reference model (the dense one; the float one for ``quantize``) and
    each candidate (``{"pruned": proto}``, ...) run in onnxruntime on ``ev`` and scored side by side by
    :func:`score_outputs`.

    ``{"data": {origin, source, samples, ...}, "labelled": bool, "metric": headline metric, "reference": name,
    "<reference>": {...}, "<candidate>": {...}, "outputs": {"<candidate>": per-output label-free detail}}``."""
    from edge_sparse.passes import calibrate

    outs = {reference_name: reference_outputs if reference_outputs is not None else
            calibrate.run_model(reference, ev.inputs, batch)}
    for name, proto in candidates.items():
        outs[name] = calibrate.run_model(proto, ev.inputs, batch)
    scored = score_outputs(ev, outs, calibrate.classifier_outputs(reference))
    return {"data": ev.info, "labelled": ev.labelled, "metric": primary_metric(ev, scored[reference_name]),
            "reference": reference_name, **scored}


def compare_parts(reference: onnx.ModelProto, candidate: onnx.ModelProto, parts: dict[str, dict], batch=None,
                  section: dict | None = None, ev: EvalSet | None = None, name: str = "pruned") -> dict:
    """``{split: {"samples", "outputs": per-output label-free metrics}}`` of ``candidate`` against ``reference`` on
    each non-empty part (the calibration and ``--holdout`` parts). A part that is ``ev``'s samples takes the per-output
    detail ``section`` (:func:`evaluate`'s result on ``ev``) already holds for ``name`` instead of running again."""
    from edge_sparse.passes import calibrate

    classifiers = calibrate.classifier_outputs(reference)
    res = {}
    for split, part in parts.items():
        if not part:                              # e.g. no held-out split: the key is absent
            continue
        if ev is not None and section is not None and part is ev.inputs:
            outputs = section["outputs"][name]
        else:
            outputs = calibrate.compare(calibrate.run_model(reference, part, batch),
                                        calibrate.run_model(candidate, part, batch), classifiers)
        res[split] = {"samples": calibrate.sample_count(part), "outputs": outputs}
    return res


def summary_text(section: dict, names: tuple[str, ...]) -> str:
    """``line_accuracy: pruned 0.812, dense 0.875 on 500 samples (--eval X.eval.npz)``: the headline metric of
    ``names`` and of the reference model, for the CLI's summary line."""
    metric = section["metric"]
    shown = (*names, section.get("reference", "dense"))
    vals = ", ".join(f"{n} {section[n].get(metric, float('nan')):.4g}" for n in shown if n in section)
    d = section["data"]
    where = d["origin"] if d["origin"] != ORIGINS["eval"] else f"--eval {Path(d.get('file') or 'arrays').name}"
    return f"{metric}: {vals} on {d['samples']} samples ({where})"
