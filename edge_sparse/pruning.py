"""Python API for pruning: :func:`prune` (one-shot, with a registered pruning method, in the kernels' patterns, with
an accuracy report) and :func:`analyze` (per-layer sensitivity and the allocation a global target would get).

Flow of :func:`prune`: load the ONNX file as is (no folding: the output keeps the same graph) -> find the prunable
MatMul/Gemm/Conv weights -> apply default skips, the recipe and ``--skip`` -> split calibration samples into a
calibration part and a held-out part -> (``permute``: reorder output channels of the dense model where Rx1 blocks
then keep more saliency) -> the method's statistics on the calibration part -> per-layer sparsity
(uniform, or by measured sensitivity) -> zero weights, record facts in ``metadata_props`` -> onnx.checker ->
compare against the dense model on held-out data (``--eval``: real metrics on labelled zoo data, label-free ones on
other samples; else the held-out part, :mod:`edge_sparse.evaluation`) and on the calibration part -> write the model
and the JSON report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx

from edge_sparse import evaluation
from edge_sparse.errors import UserError, check_number
from edge_sparse.intake import read_model
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_write, check_output, json_text, sha256_bytes, sha256_file

__all__ = ["prune", "analyze", "allocate", "layer_errors", "method_statistics", "PruneResult", "SENSITIVITY_LEVELS", "ALLOCATIONS"]

SENSITIVITY_LEVELS = (0.5, 0.7, 0.8, 0.9)
ALLOCATIONS = ("uniform", "sensitivity")
RANDOM_SAMPLES = 8                    # random samples used for the accuracy report when no calibration is given
RANDOM_WARNING = "calibration on random inputs: a poor proxy for real data; pass --calib FILE.npz with real samples"


@dataclasses.dataclass
class PruneResult:
    model: onnx.ModelProto            # the pruned model (also written to ``output`` when given)
    report: dict                      # what was pruned and what it cost; also written to ``report_path``
    eval_set: object = None           # the samples the accuracy report used (edge_sparse.evaluation.EvalSet)
    calib_part: dict | None = None    # the calibration samples the statistics used (None: random inputs)

    @property
    def warnings(self) -> list[str]:
        return self.report.get("warnings", [])


# ----------------------------------------------------------------------------------------------------- loading
def _load(model) -> tuple[onnx.ModelProto, str, str, Path | None]:
    """(proto, display name, sha256, path or None) for a path or an in-memory ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model", sha256_bytes(model.SerializeToString()), None
    path = Path(model)
    proto = read_model(path)
    return proto, path.name, sha256_file(path), path


MAX_BATCH = 65536


def _calibration(proto, calib, calib_random, seed):
    """(data or None, description, warnings)."""
    from edge_sparse.passes import calibrate

    specs = calibrate.input_specs(proto)
    if calib is not None and calib_random is not None:
        raise UserError("pass either --calib FILE.npz or --calib-random N, not both")
    if calib is not None:
        if isinstance(calib, dict):
            return calibrate.check_calibration(calib, specs, "calibration data"), "arrays", []
        return calibrate.load_calibration(calib, specs), str(calib), []
    if calib_random is not None:
        data = calibrate.random_calibration(specs, int(calib_random), seed)
        return data, f"random ({calib_random})", [RANDOM_WARNING]
    return None, None, []


# ------------------------------------------------------------------------------------------------- allocation
def _curve_cost(curve: dict[float, float], s: float) -> float:
    """Squared output error (additive across layers to first order) at sparsity ``s``, interpolated from the
    measured levels with error 0 at sparsity 0 and the last slope extrapolated beyond the highest level."""
    xs = [0.0, *sorted(curve)]
    # measured errors are noisy on small layers; pruning more never helps, so use the running maximum
    ys = list(np.maximum.accumulate([0.0, *(curve[x] for x in sorted(curve))]))
    if s <= xs[-1]:
        e = float(np.interp(s, xs, ys))
    else:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        e = ys[-1] + max(slope, 0.0) * (s - xs[-1])
    return e * e


def allocate(sizes: dict[str, int], curves: dict[str, dict[float, float]], target: float,
             grids: dict[str, list[float]] | None = None, cap: float | None = None) -> dict[str, float]:
    """Per-layer sparsity whose size-weighted mean is ``target``, spending sparsity where it costs least.

    ``curves[name][level]``: output relative L2 error with only that layer pruned at ``level``. Greedy: repeatedly
    raise the layer with the least added squared error per pruned weight by one grid step; the last step is cut to
    land on the target exactly (N:M layers, whose grid is just ``[0, 1-N/M]``, move in one step).
    """
    cap = cap if cap is not None else max(0.95, target)
    default_grid = [round(x, 4) for x in np.arange(0.0, cap + 1e-9, 0.05)]
    grids = {n: (grids or {}).get(n) or default_grid for n in sizes}
    total = sum(sizes.values())
    need = target * total
    level = {n: 0 for n in sizes}
    alloc = {n: 0.0 for n in sizes}
    pruned = 0.0
    while pruned < need - 1e-9:
        best, best_rate = None, None
        for n in sizes:
            grid = grids[n]
            if level[n] + 1 >= len(grid) or sizes[n] == 0:
                continue
            cur, nxt = grid[level[n]], grid[level[n] + 1]
            rate = (_curve_cost(curves[n], nxt) - _curve_cost(curves[n], cur)) / (sizes[n] * (nxt - cur))
            if best_rate is None or rate < best_rate:
                best, best_rate = n, rate
        if best is None:
            break
        cur, nxt = grids[best][level[best]], grids[best][level[best] + 1]
        step = sizes[best] * (nxt - cur)
        if pruned + step > need + 1e-9 and len(grids[best]) > 2:      # cut the last step (not for N:M layers)
            alloc[best] = cur + (need - pruned) / sizes[best]
            pruned = need
            break
        level[best] += 1
        alloc[best] = nxt
        pruned += step
    return alloc


# ------------------------------------------------------------------------------------------------ sensitivity
def _summary(metrics: dict[str, dict]) -> dict[str, float]:
    floats = [m for m in metrics.values() if "rel_l2" in m]
    if not floats:
        return {"rel_l2": 0.0, "cosine": 1.0}
    return {"rel_l2": float(np.mean([m["rel_l2"] for m in floats])),
            "cosine": float(min(m["cosine_mean"] for m in floats))}


def _first_samples(data: dict[str, np.ndarray], specs, count: int) -> dict[str, np.ndarray]:
    unit = max([s.dims[0] for s in specs if s.dims and s.dims[0]] or [1])
    n = max(unit, (count // unit) * unit)
    return {k: v[:n] for k, v in data.items()}


def layer_errors(proto, variants: dict[str, dict], data, batch, progress, label: str = "sensitivity runs"
                 ) -> dict[str, dict]:
    """``{layer: {key: {"rel_l2", "cosine"}}}``: the model's outputs versus dense with only that layer's weight
    replaced by ``variants[layer][key](weight)`` (one weight transform per key: prune, quantize, both)."""
    from edge_sparse.passes import calibrate

    evaluator = calibrate.Evaluator(proto, list(variants), batch=batch)
    dense = evaluator.run(data)
    classifiers = calibrate.classifier_outputs(proto)
    result = {}
    runs = sum(len(v) for v in variants.values())
    done = 0
    for name, todo in variants.items():
        result[name] = {}
        for key, transform in todo.items():
            out = evaluator.run(data, {name: transform(evaluator.weights[name])})
            result[name][key] = _summary(calibrate.compare(dense, out, classifiers))
            done += 1
            progress.count(done, runs, label)
    return result


def _sensitivity(proto, layers, patterns, levels, method, stats, data, batch, progress) -> dict[str, dict]:
    """``{layer: {level: {"rel_l2", "cosine"}}}`` with only that layer pruned (outputs vs dense)."""
    from edge_sparse.passes.prune import LayerPlan, prune_weight

    variants = {}
    for layer in layers:
        pattern = patterns[layer.name]
        todo = levels if pattern.fixed_sparsity is None else [pattern.fixed_sparsity]
        variants[layer.name] = {float(s): (lambda w, layer=layer, plan=LayerPlan(pattern, s):
                                           prune_weight(layer, w, plan, method, stats)) for s in todo}
    return layer_errors(proto, variants, data, batch, progress)


# ------------------------------------------------------------------------------------------------------ shared
@dataclasses.dataclass
class _Setup:
    proto: onnx.ModelProto
    irm: object
    layers: list
    rejected: list
    settings: dict
    source_name: str
    sha256: str
    path: Path | None
    data: dict | None
    calib_desc: str | None
    warnings: list
    restore: object = None               # quantized input: puts the int8 weights back (quantization.float_weight_view)


def _non_finite_warnings(proto, data) -> list[str]:
    """NaN/Inf in float weights or calibration inputs make every error figure NaN (reported as null): say where."""
    from onnx import numpy_helper

    out = []
    bad = []
    for init in proto.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            n = int(np.size(w := numpy_helper.to_array(init)) - np.count_nonzero(np.isfinite(w)))
            if n:
                bad.append(f"'{init.name}' ({n})")
    if bad:
        out.append(f"NaN/Inf in weight(s) {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''}: the model "
                   f"itself is broken; error and accuracy figures that involve them are null")
    for name, arr in (data or {}).items():
        if np.asarray(arr).dtype.kind == "f":
            n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if n:
                out.append(f"calibration input '{name}' holds {n} NaN/Inf values: statistics and accuracy figures "
                           f"computed from them are null; clean the calibration data")
    return out


def _setup(model, recipe, default_skips, skip, calib, calib_random, seed, batch) -> _Setup:
    import onnx_ir as ir

    from edge_sparse.passes.prune import default_skips as find_default_skips
    from edge_sparse.passes.prune import find_prunable_layers
    from edge_sparse.passes.prune_recipe import Recipe, load_recipe, resolve

    check_number(batch, "--batch", 1, MAX_BATCH)
    check_number(seed, "--seed", 0, 2**63 - 1)
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    from edge_sparse.quantization import float_weight_view

    proto, name, sha, path = _load(model)
    proto, restore = float_weight_view(proto, name)       # a QDQ model is pruned on its exact float weights
    data, desc, warnings = _calibration(proto, calib, calib_random, seed)
    warnings = warnings + _non_finite_warnings(proto, data)
    if data is not None and calib_random is None:
        from edge_sparse.passes import calibrate

        warnings += calibrate.sample_warnings(data, calibrate.input_specs(proto))
    irm = ir.serde.deserialize_model(proto)
    layers, rejected = find_prunable_layers(irm)
    if not layers:
        raise UserError(f"{name} has no prunable layers (MatMul, Gemm or ungrouped Conv with a constant float weight)")
    settings = resolve(layers, recipe, find_default_skips(irm, layers), default_skips, list(skip or ()))
    return _Setup(proto, irm, layers, rejected, settings, name, sha, path, data, desc, warnings, restore)


def method_statistics(method, proto, layers, data, batch, progress) -> dict | None:
    """``{activation: statistic result}`` of ``method`` over ``data`` (None when it needs none)."""
    from edge_sparse.passes import calibrate

    wanted = {}
    for layer in layers:
        if layer.activation not in wanted:
            stat = method.statistic(layer)
            if stat is not None:
                wanted[layer.activation] = stat
    if not wanted:
        return None
    with progress.step(f"{method.name} statistics over {calibrate.sample_count(data)} calibration samples"):
        return calibrate.collect_statistics(proto, wanted, data, batch)


# ------------------------------------------------------------------------------------------------- permutation
def _permute(setup: _Setup, method, patterns: dict, sparsity: float, calib_part: dict, batch, progress,
             warnings: list) -> dict:
    # calib_part: the calibration samples (the held-out ones when a mask-only method runs without calibration: they
    # serve only to observe shapes and check the reordered model)
    """Reorder output channels of the dense model in ``setup`` (its proto and onnx-ir model) where a block mask keeps
    more saliency that way; the dense function is checked unchanged on calibration samples. Returns the report
    section: every permutable group with the retained saliency before and after, and why other block-pruned layers
    could not be reordered."""
    import onnx_ir as ir

    from edge_sparse.passes import calibrate
    from edge_sparse.passes import permute as PM
    from edge_sparse.passes.methods import InputNorm
    from edge_sparse.passes.prune import get_weight
    from edge_sparse.passes.prune_masks import to_canonical

    section = {"enabled": True, "groups": [], "not_permutable": {}, "applied": 0}
    if setup.restore is not None:
        section.update(enabled=False, note="quantized input: channels are not reordered (the quantization "
                                           "parameters would have to follow)")
        return section
    blocked = {n for n, p in patterns.items() if PM.permutable(p)}
    if not blocked:
        return section
    by_name = {layer.name: layer for layer in setup.layers}
    with progress.step("choosing output-channel permutations"):
        shapes = PM.observed_shapes(setup.proto, calib_part)
        groups, rejected = PM.find_channel_groups(setup.irm, setup.layers, shapes)
        section["not_permutable"] = {n: why for n, why in rejected.items() if n in blocked}
        todo = [g for g in groups if any(n in blocked for n in g.producers)]
        acts = {by_name[n].activation: InputNorm(by_name[n].feature_axis) for g in todo for n in g.producers
                if n in blocked and method.statistic(by_name[n]) is not None}
        norms = calibrate.collect_statistics(setup.proto, acts, calib_part, batch) if acts else {}
        chosen = []
        for g in todo:
            order_bound = [c for c in g.consumers if c in patterns and patterns[c].kind == "nm"
                           or c in patterns and patterns[c].kind == "block" and patterns[c].cols > 1]
            row = {**g.to_dict(), "applied": False}
            if order_bound:
                row["reason"] = f"consumer {order_bound[0]} is pruned in {patterns[order_bound[0]]}, whose mask " \
                                f"depends on the order of its inputs"
                section["groups"].append(row)
                continue
            members = [by_name[n] for n in g.producers if n in blocked]
            targets = [setup.settings[m.name].sparsity if setup.settings[m.name].sparsity is not None else sparsity
                       for m in members]
            scores = [method.saliency(m, to_canonical(get_weight(setup.irm, m), m.op, m.trans_b),
                                      norms.get(m.activation)) for m in members]
            perm, before, after = PM.choose_permutation(scores, [patterns[m.name] for m in members], targets,
                                                        method.per_row, g.segment)
            row.update(retained_before=round(before, 6), retained_after=round(after, 6))
            if after > before * (1 + 1e-9):
                row["applied"] = True
                chosen.append((g, perm))
            section["groups"].append(row)
        if not chosen:
            return section
        PM.PermuteChannels(chosen)(setup.irm)
        setup.irm.metadata_props[PM.METADATA_KEY] = PM.record(chosen, setup.irm.metadata_props.get(PM.METADATA_KEY))
        permuted = ir.serde.serialize_model(setup.irm)
        sample = _first_samples(calib_part, calibrate.input_specs(setup.proto), 2)
        dense, new = calibrate.run_model(setup.proto, sample, batch), calibrate.run_model(permuted, sample, batch)
        worst = max((float(np.max(np.abs(dense[k].astype(np.float64) - new[k])) / max(1e-30, float(np.max(np.abs(
            dense[k]))))) for k in dense if dense[k].dtype.kind == "f" and dense[k].size), default=0.0)
        if not worst <= 1e-4:
            setup.irm = ir.serde.deserialize_model(setup.proto)
            warnings.append(f"channel permutation changed the dense model's outputs (relative max difference "
                            f"{worst:.3g}); pruned without it (please report this model)")
            for row in section["groups"]:
                row["applied"] = False
            return section
        setup.proto = permuted
        section["applied"] = len(chosen)
        section["dense_max_rel_diff"] = worst
    return section


# ------------------------------------------------------------------------------------------------------- prune
def prune(model, output=None, *, sparsity: float | None = None, pattern: str | None = None,
          method: str | None = None, recipe=None, calib=None, calib_random: int | None = None,
          eval_data=None, holdout: float | None = None, allocate_by: str | None = None, default_skips: bool = True,
          skip=(), report_path=None, force: bool = False, seed: int = 0, batch: int | None = None,
          sensitivity_samples: int = 16, permute: bool = False, quiet: bool | None = None) -> PruneResult:
    """Prune ``model`` (path or ModelProto) one-shot and report the accuracy cost.

    sparsity: global target in [0, 1) for layers without a recipe value (N:M patterns fix it at 1 - N/M).
    pattern: ``unstructured`` | ``Rx1`` (e.g. ``16x1``) | ``N:M`` (``2:4``); default unstructured.
    method: a registered pruning method (:func:`edge_sparse.passes.methods.names`) or a ``PruningMethod`` object;
    default :func:`edge_sparse.passes.methods.default` (the preferred method the calibration data allows).
    calib: ``.npz`` path or ``{input: array}`` with samples on the first axis; calib_random: N random samples.
    eval_data: held-out samples for the accuracy report (:func:`edge_sparse.evaluation.load_eval`): the
    ``<stem>.eval.npz`` of ``edge-sparse models get NAME --eval N`` (real metrics against its labels), another
    ``.npz`` or ``{input: array}`` (label-free metrics against the dense model), or an ``EvalSet``.
    holdout: fraction of the calibration samples kept out of the statistics and reported separately; without
    ``eval_data`` the accuracy report falls back to them. Default 0.25 without ``eval_data``, 0 with it.
    allocate_by: ``uniform`` (every layer at the target) or ``sensitivity`` (measured; needs calibration).
    permute: reorder output channels before pruning where that keeps more ``Rx1`` block saliency
    (:mod:`edge_sparse.passes.permute`; the dense function is unchanged; off by default: of four MiniLM settings
    it raised the held-out scores only with sparsegpt at 80%, see docs/pruning.md).
    """
    import onnx_ir as ir

    from edge_sparse.passes import calibrate
    from edge_sparse.passes import methods as M
    from edge_sparse.passes.prune import AnnotateSparsity, AssignConstants, LayerPlan, PruneWeights
    from edge_sparse.passes.prune_masks import parse_pattern
    from edge_sparse.passes.prune_recipe import Recipe, check_sparsity, load_recipe

    t0 = time.perf_counter()
    progress = Progress(quiet)
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    rec = recipe or Recipe()
    pattern_obj = parse_pattern(pattern) if pattern is not None else (rec.pattern or parse_pattern("unstructured"))
    if sparsity is None:
        sparsity = rec.sparsity
    if sparsity is None:
        if pattern_obj.fixed_sparsity is None:
            raise UserError("--sparsity is required (a fraction in [0, 1), e.g. 0.5) unless the pattern is N:M or "
                            "the recipe sets it")
        sparsity = pattern_obj.fixed_sparsity
    sparsity = check_sparsity(sparsity, "--sparsity")
    if pattern_obj.fixed_sparsity is not None and sparsity > pattern_obj.fixed_sparsity + 1e-9:
        raise UserError(f"pattern {pattern_obj} prunes exactly {pattern_obj.fixed_sparsity:.0%} of a layer; "
                        f"--sparsity {sparsity:g} cannot be reached (omit it or use an Rx1/unstructured pattern)")
    allocate_by = allocate_by or rec.allocate or "uniform"
    if allocate_by not in ALLOCATIONS:
        raise UserError(f"unknown allocation '{allocate_by}': use {' or '.join(ALLOCATIONS)}")
    if pattern_obj.fixed_sparsity is not None and allocate_by == "uniform" \
            and abs(sparsity - pattern_obj.fixed_sparsity) > 1e-9:
        raise UserError(f"pattern {pattern_obj} prunes every layer to exactly {pattern_obj.fixed_sparsity:.0%}; "
                        f"for a lower global target use --allocate sensitivity (it leaves some layers dense)")
    holdout = evaluation.holdout_share(holdout, eval_data)
    if not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout must be in [0, 1), got {holdout}")

    src_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    ins = [x for x in (src_path, calib, recipe, eval_data) if isinstance(x, (str, os.PathLike))]
    out_path = check_output(output, force=force, inputs=ins)
    rep_path = check_output(report_path, force=force, inputs=ins, what="report")
    if out_path is not None and rep_path is not None and out_path.resolve() == rep_path.resolve():
        raise UserError("the report path equals the output model path; choose different files")

    setup = _setup(model, rec, default_skips, skip, calib, calib_random, seed, batch)
    method = M.get(method or rec.method or M.default(setup.data is not None, real=calib_random is None))
    warnings = list(setup.warnings)
    specs = calibrate.input_specs(setup.proto)
    eval_set = None
    if eval_data is not None:                 # read and checked before minutes of pruning
        eval_set = evaluation.load_eval(eval_data, setup.proto, calib=calib)
        warnings += evaluation.overlap_warnings(eval_set, setup.data)
    data = setup.data
    if data is None:
        if method.needs_calibration or allocate_by == "sensitivity":
            need = f"method {method.name}" if method.needs_calibration else "--allocate sensitivity"
            raise UserError(f"{need} needs calibration data: pass --calib FILE.npz (or --calib-random N, a poor proxy)")
    if data is None and eval_set is not None:      # nothing to calibrate, and the report has its held-out data
        calib_desc, calib_part, held_part = None, {}, {}
    else:
        if data is None:
            data = calibrate.random_calibration(specs, RANDOM_SAMPLES, seed)
            warnings.append("no calibration data: the accuracy report uses random inputs; pass --calib FILE.npz "
                            "and --eval FILE.npz")
            calib_desc = f"random ({RANDOM_SAMPLES})"
        else:
            calib_desc = setup.calib_desc
        calib_part, held_part = calibrate.split_holdout(data, specs, holdout)

    active = [layer for layer in setup.layers if setup.settings[layer.name].skip is None]
    if not active:
        raise UserError("every prunable layer is skipped; nothing to prune (check --skip / the recipe, or pass "
                        "--no-default-skips)")
    patterns = {layer.name: setup.settings[layer.name].pattern or pattern_obj for layer in active}
    for layer in active:
        fixed, wanted = patterns[layer.name].fixed_sparsity, setup.settings[layer.name].sparsity
        if fixed is not None and wanted is not None and wanted not in (0.0, fixed):
            raise UserError(f"recipe sets sparsity {wanted:g} for {layer.name}, but its pattern "
                            f"{patterns[layer.name]} prunes exactly {fixed:g}; drop the sparsity or use 0")
    permutation = None
    if permute:
        permutation = _permute(setup, method, patterns, sparsity, calib_part or eval_set.inputs, batch, progress,
                               warnings)
    sequential = getattr(method, "sequential", False)
    free_any = any(setup.settings[layer.name].sparsity is None for layer in active)
    # a sequential method collects its statistics layer by layer below; the dense ones only serve sensitivity
    stats = None if sequential and not (allocate_by == "sensitivity" and free_any) else \
        method_statistics(method, setup.proto, active, calib_part, batch, progress)

    free = [layer for layer in active if setup.settings[layer.name].sparsity is None]
    targets = {layer.name: setup.settings[layer.name].sparsity for layer in active if layer not in free}
    sensitivity = None
    if allocate_by == "sensitivity" and free:
        sample = _first_samples(calib_part, specs, sensitivity_samples)
        with progress.step(f"sensitivity of {len(free)} layers on {calibrate.sample_count(sample)} samples"):
            sensitivity = _sensitivity(setup.proto, free, patterns, SENSITIVITY_LEVELS, method, stats, sample,
                                       batch, progress)
        grids = {layer.name: [0.0, patterns[layer.name].fixed_sparsity] for layer in free
                 if patterns[layer.name].fixed_sparsity is not None}
        targets.update(allocate({layer.name: layer.size for layer in free},
                                {n: {lv: v["rel_l2"] for lv, v in c.items()} for n, c in sensitivity.items()},
                                sparsity, grids))
    else:
        targets.update({layer.name: sparsity for layer in free})
    for layer in active:
        fixed = patterns[layer.name].fixed_sparsity
        if fixed is not None and targets[layer.name] > 0:
            targets[layer.name] = fixed

    plan = {name: LayerPlan(patterns[name], s) for name, s in targets.items() if s > 0}
    recon_facts = None
    if sequential:
        from edge_sparse.passes.reconstruct import reconstruct

        with progress.step(f"{method.name}: reconstructing {len(plan)} layers in order on "
                           f"{calibrate.sample_count(calib_part)} calibration samples"):
            values, recon_facts = reconstruct(setup.proto, setup.layers, plan, method, calib_part, batch, progress)
        prune_pass = AssignConstants(values)
    else:
        prune_pass = PruneWeights(setup.layers, plan, method, stats)
    with progress.step(f"pruning {len(plan)} layers ({method.name}, {pattern_obj})"):
        irm = ir.passes.Sequential(
            prune_pass,
            AnnotateSparsity(setup.layers, {n: str(p.pattern) for n, p in plan.items()}, method.name,
                             str(pattern_obj), sparsity),
        )(setup.irm).model
        pruned = ir.serde.serialize_model(irm)
        if setup.restore is not None:
            pruned = setup.restore(pruned)
        try:
            onnx.checker.check_model(pruned)
        except onnx.checker.ValidationError as e:  # a bug, not user input: keep the traceback
            raise RuntimeError(f"pruned model fails onnx.checker: {e}") from e

    if eval_set is None:                      # the fallback: held-out calibration samples, label-free
        eval_set, more = evaluation.fallback(calib_part, held_part, calib_desc, random=setup.data is None)
        warnings += more
    with progress.step(f"accuracy versus the dense model on {eval_set.info['samples']} samples "
                       f"({eval_set.info['origin']})"):
        section = evaluation.evaluate(setup.proto, {"pruned": pruned}, eval_set, batch)
        accuracy = {"eval": section, **evaluation.compare_parts(
            setup.proto, pruned, {"calibration": calib_part, "holdout": held_part}, batch, section, eval_set)}

    from edge_sparse.passes.prune import get_weight

    zeros = total = 0
    layer_rows = []
    for layer in setup.layers:
        w = get_weight(irm, layer)
        z = int(np.count_nonzero(w == 0))
        zeros, total = zeros + z, total + w.size
        st = setup.settings[layer.name]
        row = {**layer.to_dict(), "params": layer.size, "sparsity": round(z / w.size, 6),
               "target": round(targets.get(layer.name, 0.0), 6),
               "pattern": str(plan[layer.name].pattern) if layer.name in plan else None,
               "skipped": st.skip}
        if sensitivity and layer.name in sensitivity:
            row["sensitivity"] = {f"{lv:g}": v for lv, v in sensitivity[layer.name].items()}
        if recon_facts and layer.name in recon_facts:
            row["reconstruction"] = recon_facts[layer.name]
        layer_rows.append(row)

    from edge_sparse import __version__

    report = {
        "tool": {"name": "edge-sparse", "version": __version__},
        "source_model": {"name": setup.source_name, "sha256": setup.sha256},
        "output_model": str(out_path) if out_path else None,
        "method": method.name, "pattern": str(pattern_obj), "target_sparsity": sparsity, "allocation": allocate_by,
        "recipe": rec.source if recipe is not None else None,
        "calibration": {"source": calib_desc, "samples": calibrate.sample_count(calib_part),
                        "holdout_samples": calibrate.sample_count(held_part) if held_part else 0,
                        # statistics count only the positions this input marks as real tokens (None: every row)
                        "token_mask": calibrate.token_mask_input(specs, calib_part)},
        "sparsity": {"prunable_params": total, "zero_params": zeros, "overall": round(zeros / total, 6) if total else 0,
                     "pruned_layers": len(plan), "skipped_layers": sum(1 for r in layer_rows if r["skipped"])},
        "layers": layer_rows,
        "not_prunable": setup.rejected,
        "permutation": permutation,
        "accuracy": accuracy,
        "metadata_key": "edge_sparse.pruning",
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_path is not None:
        atomic_write(out_path, lambda f: onnx.save(pruned, f), replace=force)
    if rep_path is not None:
        atomic_write(rep_path, json_text(report) + "\n", replace=force)
    return PruneResult(pruned, report, eval_set, calib_part if setup.data is not None else None)


# ----------------------------------------------------------------------------------------------------- analyze
def analyze(model, *, calib=None, calib_random: int | None = None, method: str | None = None,
            pattern: str = "unstructured", levels=SENSITIVITY_LEVELS, sparsity: float = 0.7, recipe=None,
            default_skips: bool = True, skip=(), samples: int = 16, seed: int = 0, batch: int | None = None,
            quiet: bool | None = None) -> dict:
    """Per-layer sensitivity (output relative L2 error and worst-output cosine with only that layer pruned at each
    level) and the per-layer sparsities :func:`prune` would choose for the global ``sparsity`` target."""
    from edge_sparse.passes import calibrate
    from edge_sparse.passes import methods as M
    from edge_sparse.passes.prune_masks import parse_pattern
    from edge_sparse.passes.prune_recipe import check_sparsity

    progress = Progress(quiet)
    pattern_obj = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, "--sparsity")
    levels = sorted({check_sparsity(lv, "--levels") for lv in levels} - {0.0})
    if not levels:
        raise UserError("--levels needs at least one sparsity in (0, 1)")
    t0 = time.perf_counter()
    setup = _setup(model, recipe, default_skips, skip, calib, calib_random, seed, batch)
    if setup.data is None:
        raise UserError("analyze needs calibration data: pass --calib FILE.npz (or --calib-random N, a poor proxy)")
    method = M.get(method or M.default(True))
    specs = calibrate.input_specs(setup.proto)
    data = _first_samples(setup.data, specs, samples)
    patterns = {layer.name: setup.settings[layer.name].pattern or pattern_obj for layer in setup.layers}
    stats = method_statistics(method, setup.proto, setup.layers, data, batch, progress)
    with progress.step(f"sensitivity of {len(setup.layers)} layers on {calibrate.sample_count(data)} samples"):
        sens = _sensitivity(setup.proto, setup.layers, patterns, levels, method, stats, data, batch, progress)
    active = [layer for layer in setup.layers if setup.settings[layer.name].skip is None]
    grids = {layer.name: [0.0, patterns[layer.name].fixed_sparsity] for layer in active
             if patterns[layer.name].fixed_sparsity is not None}
    alloc = allocate({layer.name: layer.size for layer in active},
                     {layer.name: {lv: v["rel_l2"] for lv, v in sens[layer.name].items()} for layer in active},
                     sparsity, grids) if active else {}
    rows = []
    for layer in setup.layers:
        rows.append({**layer.to_dict(), "params": layer.size, "pattern": str(patterns[layer.name]),
                     "skipped": setup.settings[layer.name].skip,
                     "sensitivity": {f"{lv:g}": v for lv, v in sens[layer.name].items()},
                     "allocation": round(alloc.get(layer.name, 0.0), 4)})
    return {
        "source_model": {"name": setup.source_name, "sha256": setup.sha256},
        "method": method.name, "pattern": str(pattern_obj), "levels": levels,
        "calibration": {"source": setup.calib_desc, "samples": calibrate.sample_count(data)},
        "metric": "rel_l2: ||y_pruned - y_dense|| / ||y_dense|| averaged over float outputs; cosine: worst output's "
                  "mean per-sample cosine similarity",
        "layers": rows,
        "not_prunable": setup.rejected,
        "allocation": {"target": sparsity, "layers": {n: round(s, 4) for n, s in alloc.items()}},
        "warnings": setup.warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
