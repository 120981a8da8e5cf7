"""``optimize``: the fastest configuration of a model within an accuracy budget on one target (SPDY-style search).

Phases, each reusing the project's own stages:

1. latency table: for every prunable layer that has a kernel, the time of each option -- dense fp32, dense int8,
   every sparse pattern at a ladder of sparsities in fp32 (BSR Rx1 kernels) and int8 (BSR 16x4) -- from the
   sparsify/QDQ cost models, refined by timing the kernels on the target (this machine when the target is native,
   or a TVM RPC device; a target that does not run here, with no device given: its cost model alone, and every
   latency of the run is labelled an estimate). Measurements are cached per target and layer shape (one JSON file, written after each
   measurement), so an interrupted run resumes where it stopped and later runs reuse it.
2. sensitivity table: the model's output error on calibration data with only one layer changed to each option
   (:func:`edge_sparse.pruning.layer_errors`, the code of ``analyze``); squared relative L2 errors add up across
   layers to first order.
3. search: an exact Pareto dynamic program over layers (latency, summed error), thinned only when a front grows
   past a few thousand points.
4. evaluation: candidates along that front are applied with the real passes (``prune`` with a per-layer recipe,
   ``quantize`` of the chosen nodes: per-channel weights, dynamic activation ranges by default) and the real metric is measured on held-out data (``--eval``);
   a bisection finds the fastest candidate within ``--max-drop`` (or the most accurate under ``--latency-ms``).
5. the chosen model is compiled (sparse and int8 kernels chosen by the compiler), measured (locally with
   onnxruntime fp32 and int8 side by side, or over RPC; cross-compiled only, when there is no device), and if a
   latency budget is missed the search repeats with the measured rest-of-model time.

``optimize(...)`` returns the frontier dict (also ``OUT/frontier.json``); budgets no configuration can meet raise
:class:`~edge_sparse.errors.UserError` naming the best reachable accuracy and latency.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge_sparse import evaluation
from edge_sparse.errors import UserError, check_number
from edge_sparse.progress import Progress
from edge_sparse.util import atomic_dir, atomic_write, check_output, json_text, sha256_bytes, sha256_file

__all__ = ["optimize", "pareto_search", "latency_table", "sensitivity_table", "parse_drop", "option_key",
           "parse_option", "LADDER", "METRICS", "ESTIMATE", "default_cache_dir"]

LADDER = (0.5, 0.6, 0.7, 0.8, 0.9)
FP32_PATTERNS = ("16x1",)
INT8_PATTERN = "16x4"
METRICS = ("cosine", "pooled-cosine", "top1", "line-agreement")
FRONT_CAP = 4000                 # points kept per Pareto front (exact below this)
MAX_EVALS = 12                   # configurations applied and measured on held-out data
CACHE_VERSION = 1
ESTIMATE = "estimate (cost model)"   # the label of every latency that was not measured on the target


# ---------------------------------------------------------------------------------------------------- options
def option_key(dtype: str, pattern: str | None = None, sparsity: float = 0.0) -> str:
    """``fp32`` | ``int8`` | ``fp32:16x1@0.7`` | ``int8:16x4@0.7``."""
    return dtype if not pattern or sparsity <= 0 else f"{dtype}:{pattern}@{sparsity:g}"


def parse_option(key: str) -> tuple[str, str | None, float]:
    dtype, _, rest = key.partition(":")
    if not rest:
        return dtype, None, 0.0
    pattern, _, s = rest.partition("@")
    return dtype, pattern, float(s)


def parse_drop(text) -> float:
    """``1%`` -> 0.01; ``0.01`` -> 0.01 (a fraction of the metric)."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"--max-drop must be a fraction (0.01) or a percentage (1%), got '{t[:40]}'") from None
    if not math.isfinite(v) or not 0 <= v < 1:
        raise UserError(f"--max-drop must be in [0, 100%), got '{t[:40]}'")
    return v


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-sparse" / "latency"


@dataclasses.dataclass
class _Layer:
    name: str                    # initializer name (what recipes use)
    node: str                    # consumer node name (what quantize uses)
    prunable: Any                # passes.prune.PrunableLayer
    kernel: Any                  # passes.sparsify.Layer (shapes, epilogue)
    options: list[str]


# --------------------------------------------------------------------------------------------- weights per option
def _block_prune(w_kn: np.ndarray, rows: int, cols: int, sparsity: float) -> np.ndarray:
    """Zero the ``sparsity`` fraction of (cols x rows) blocks -- ``cols`` inputs x ``rows`` outputs -- of W[K, N] with
    the smallest L2 norm (how a magnitude prune in that pattern leaves a weight)."""
    K, N = w_kn.shape
    b = w_kn.reshape(K // cols, cols, N // rows, rows)
    norms = np.sqrt((b.astype(np.float64) ** 2).sum(axis=(1, 3)))
    k = int(round(sparsity * norms.size))
    out = b.copy()
    if k:
        idx = np.argsort(norms, axis=None, kind="stable")[:k]
        kb, nb = np.unravel_index(idx, norms.shape)
        out[kb, :, nb, :] = 0
    return out.reshape(K, N)


def _quantize_sym(w: np.ndarray, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` and its scale: one scale for the tensor, or one per slice along ``axis`` (kept as a
    length-1 dimension so that ``q * scale`` broadcasts); an all-zero tensor or slice gets scale 1."""
    scale = np.max(np.abs(w), axis=axis, keepdims=axis is not None) / 127
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def _pattern_shape(pattern: str) -> tuple[int, int]:
    r, c = pattern.lower().split("x")
    return int(r), int(c)


def _layer_options(kl, preset, patterns, ladder, int8: bool) -> list[str]:
    """Option keys of one layer: its family's sparse kernels and, where the family has int8 kernels that fit the
    layer (the QDQ pass routes MatMul/Gemm only), int8 dense and 16x4 sparse."""
    from edge_sparse import targets

    family = targets.family_of(preset)
    opts = ["fp32"]
    if family.has_sparse_kernels:
        for p in patterns:
            r, c = _pattern_shape(p)
            if kl.N % r == 0 and kl.K % c == 0:
                opts += [option_key("fp32", p, s) for s in ladder]
    int8_set = family.int8_kernels(preset) if int8 and kl.op == "matmul" else None
    if int8_set is not None and int8_set.fits(kl.K, kl.N):
        opts.append("int8")
        opts += [option_key("int8", INT8_PATTERN, s) for s in ladder]
    return opts


# ------------------------------------------------------------------------------------------------ latency table
def _signature(kl, threads) -> str:
    return (f"{kl.op}|x{'x'.join(map(str, kl.x_shape))}|K{kl.K}|N{kl.N}|spatial{kl.spatial}|"
            f"bias{int(kl.bias is not None)}|{kl.activation}|t{threads}")


def _cache_path(cache_dir: Path, preset) -> Path:
    digest = sha256_bytes(json.dumps(preset.to_dict(), sort_keys=True, default=str).encode())[:12]
    return Path(cache_dir) / f"{preset.name}-{digest}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"version": CACHE_VERSION, "entries": {}}


def _estimate(kl, key: str, preset) -> float:
    from edge_sparse import formats as F
    from edge_sparse.passes.qdq import int8_estimate_us
    from edge_sparse.passes.sparsify import _rows, layer_estimate_us

    dtype, pattern, s = parse_option(key)
    if dtype == "int8":
        total = (kl.K // 4) * (kl.N // 16)
        blocks = max(1, total - int(round(s * total)))
        return int8_estimate_us(_rows(kl), kl.K, kl.N, blocks, pattern is not None, preset)
    if pattern is None:
        return layer_estimate_us(kl, "dense", None, preset)
    r, c = _pattern_shape(pattern)
    fmt = "csr" if r == 1 else f"bsr{r}x1"
    obj = F.convert(_block_prune(kl.weight, r, c, s), fmt)
    return layer_estimate_us(kl, fmt, obj, preset)


def _measure(kl, key: str, preset, session) -> float | None:
    from edge_sparse import formats as F
    from edge_sparse.passes.qdq import int8_layer_time_us
    from edge_sparse.passes.sparsify import _rows, layer_time_us

    dtype, pattern, s = parse_option(key)
    if dtype == "int8":
        wq, _ = _quantize_sym(kl.weight)
        if pattern is not None:
            wq = _block_prune(wq, 16, 4, s)
        return int8_layer_time_us(_rows(kl), kl.K, kl.N, wq, pattern is not None, preset, activation=kl.activation,
                                  bias=kl.bias is not None, session=session)
    if pattern is None:
        return layer_time_us(kl, "dense", None, preset, session=session)
    r, c = _pattern_shape(pattern)
    fmt = "csr" if r == 1 else f"bsr{r}x1"
    return layer_time_us(kl, fmt, F.convert(_block_prune(kl.weight, r, c, s), fmt), preset, session=session)


def latency_table(layers: list[_Layer], preset, *, measure: bool, session=None, where: str = "local",
                  threads: int = 1, cache_dir=None, progress: Progress | None = None) -> dict[str, dict[str, dict]]:
    """``{layer: {option: {"us", "source"}}}``; measured figures come from (and go to) the per-target cache."""
    progress = progress or Progress(True)
    cache_file = _cache_path(Path(cache_dir or default_cache_dir()), preset)
    cache = _load_cache(cache_file)
    if measure:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the latency cache directory {cache_file.parent}: {e.strerror}; pass "
                            f"--cache DIR") from None
    entries = cache["entries"]
    if measure and session is None and not preset.is_native:
        raise UserError(f"target '{preset.name}' does not run on this machine: measure its kernels over --rpc or "
                        f"--tracker/--key, or use the cost model alone (--no-measure)")
    if measure:
        import tvm

        cfg = session.get_function("runtime.config_threadpool") if session is not None else \
            tvm.get_global_func("runtime.config_threadpool")
        cfg(1, int(threads))
    todo = [(layer, key) for layer in layers for key in layer.options]
    table: dict[str, dict[str, dict]] = {}
    for i, (layer, key) in enumerate(todo, 1):
        sig = f"{_signature(layer.kernel, threads)}|{key}"
        est = _estimate(layer.kernel, key, preset)
        row = {"est_us": round(est, 3), "us": round(est, 3), "source": "cost model"}
        if measure:
            if sig not in entries:
                from edge_sparse.errors import raise_if_interrupted

                try:
                    us = _measure(layer.kernel, key, preset, session)
                except UserError:
                    raise
                except Exception as e:  # a kernel the target cannot build or run: keep the estimate, say why
                    raise_if_interrupted()
                    us, why = None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
                    entries[sig] = {"us": None, "where": where, "error": why}
                else:
                    entries[sig] = {"us": round(us, 3) if us is not None else None, "where": where}
                cache["target"] = preset.to_dict()
                atomic_write(cache_file, json.dumps(cache, indent=1, default=str) + "\n")
            hit = entries[sig]
            if hit.get("us") is not None:
                row.update(us=hit["us"], source=f"measured ({hit['where']})")
        table.setdefault(layer.name, {})[key] = row
        progress.count(i, len(todo), "latency table entries")
    return table


# -------------------------------------------------------------------------------------------- sensitivity table
def sensitivity_table(proto, layers: list[_Layer], data, *, method, batch=None, progress=None) -> dict:
    """``{layer: {option: {"rel_l2", "cosine"}}}``: output error with only that layer changed to the option."""
    from edge_sparse.passes import methods as M
    from edge_sparse.passes.prune import LayerPlan, from_canonical, prune_weight, to_canonical
    from edge_sparse.passes.prune_masks import parse_pattern
    from edge_sparse.pruning import layer_errors, method_statistics

    progress = progress or Progress(True)
    method = M.get(method)
    stats = method_statistics(method, proto, [la.prunable for la in layers], data, batch, progress)

    def transform(layer, key):
        dtype, pattern, s = parse_option(key)

        def f(w):
            if pattern is not None:
                w = prune_weight(layer.prunable, w, LayerPlan(parse_pattern(pattern), s), method, stats)
            if dtype == "int8":      # per output channel, as the applied configuration quantizes weights
                q, scale = _quantize_sym(to_canonical(w, layer.prunable.op, layer.prunable.trans_b), axis=1)
                w = from_canonical((q * scale).astype(np.float32), w.shape, layer.prunable.op, layer.prunable.trans_b)
            return w
        return f

    variants = {la.name: {k: transform(la, k) for k in la.options if k != "fp32"} for la in layers}
    errors = layer_errors(proto, variants, data, batch, progress, "sensitivity runs")
    for la in layers:
        errors[la.name]["fp32"] = {"rel_l2": 0.0, "cosine": 1.0}
    return errors


# ------------------------------------------------------------------------------------------------------ search
def pareto_search(costs: list[list[tuple[float, float]]], cap: int = FRONT_CAP) -> list[tuple[float, float, tuple]]:
    """Pareto front of (sum of latencies, sum of errors) over one option per layer.

    ``costs[layer][option] = (latency, error)``. Returns ``[(latency, error, choice)]`` sorted by error ascending
    (latency descending), ``choice[layer]`` the option index. Exact while fronts stay under ``cap`` points; above it
    the front is thinned to ``cap`` points spread evenly over its error range (endpoints kept)."""
    front: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for opts in costs:
        merged = [(lat + lo, err + eo, ch + (i,)) for lat, err, ch in front for i, (lo, eo) in enumerate(opts)]
        merged.sort(key=lambda p: (p[1], p[0]))
        front = []
        best = math.inf
        for p in merged:
            if p[0] < best - 1e-12:
                front.append(p)
                best = p[0]
        if len(front) > cap:
            keep = sorted({int(round(x)) for x in np.linspace(0, len(front) - 1, cap)})
            front = [front[i] for i in keep]
    return front


# ---------------------------------------------------------------------------------------------------- applying
def _glob_literal(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def _apply(proto, layers: list[_Layer], config: dict[str, str], calib, method, batch,
           recover_steps: int = 0, int8_scheme: str = "dynamic") -> onnx.ModelProto:
    """The model with ``config`` applied through ``prune`` (per-layer recipe), ``recover`` (label-free distillation
    against the dense model, ``recover_steps`` > 0, pruned layers only) then ``quantize`` (chosen nodes, weights per
    output channel, activations per call with ``int8_scheme`` "dynamic" or from calibrated ranges with "static")."""
    from edge_sparse.passes.prune_masks import parse_pattern
    from edge_sparse.passes.prune_recipe import LayerRule, Recipe
    from edge_sparse.pruning import prune
    from edge_sparse.quantization import quantize

    rules = []
    for la in layers:
        _, pattern, s = parse_option(config[la.name])
        if pattern is not None:
            rules.append(LayerRule(match=[_glob_literal(la.name)], sparsity=s, pattern=parse_pattern(pattern)))
    model = proto
    if rules:
        recipe = Recipe(rules=rules, default_skips=False, source="optimize")
        model = prune(proto, sparsity=0.0, method=method, recipe=recipe, calib=calib, holdout=0.0,
                      default_skips=False, batch=batch, quiet=True).model
        if recover_steps:
            from edge_sparse.recover import recover

            model = recover(model, proto, calib, steps=recover_steps, quiet=True).model
    nodes = [la.node for la in layers if parse_option(config[la.name])[0] == "int8"]
    if nodes:
        model = quantize(model, calib=calib, scheme=int8_scheme, per_channel=True, nodes=nodes, holdout=0.0,
                         batch=batch, quiet=True).model
    return model


def _pool(outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Float outputs of rank >= 3 averaged over axis 1 (the sequence), weighted by an ``attention_mask`` input of
    shape ``[samples, sequence]`` when there is one: a sentence embedding's mean pooling."""
    mask = (inputs or {}).get("attention_mask")
    out = {}
    for name, y in outputs.items():
        if y.dtype.kind != "f" or y.ndim < 3:
            out[name] = y
            continue
        if mask is not None and mask.shape == y.shape[:2]:
            w = mask.astype(np.float64).reshape(*mask.shape, *([1] * (y.ndim - 2)))
            out[name] = (y * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-9)
        else:
            out[name] = y.mean(axis=1)
    return out


def _score(dense_out, out, classifiers, metric: str, inputs=None) -> float:
    """The metric of ``out`` against the dense model's outputs (1.0 = identical)."""
    from edge_sparse.passes import calibrate

    if metric == "line-agreement":
        vals = [_line_agreement(dense_out[n], out[n]) for n in _sequence_outputs(dense_out, classifiers)]
        return float(min(vals)) if vals else 1.0
    if metric == "pooled-cosine":
        dense_out, out = _pool(dense_out, inputs), _pool(out, inputs)
    m = calibrate.compare(dense_out, out, classifiers)
    if metric == "top1":
        vals = [v["top1_agreement"] for v in m.values() if "top1_agreement" in v]
    else:
        vals = [v["cosine_mean"] for v in m.values() if "cosine_mean" in v]
    return float(min(vals)) if vals else 1.0


def _sequence_outputs(outputs: dict[str, np.ndarray], classifiers) -> list[str]:
    """Class-score outputs over a time axis ([samples, time, classes]): what a CTC recognizer emits."""
    return [n for n in outputs if n in classifiers and outputs[n].ndim == 3]


def _line_agreement(dense: np.ndarray, out: np.ndarray) -> float:
    """Fraction of samples whose greedy CTC decode (:func:`edge_sparse.models.zoo.ctc_greedy`) of ``out`` equals
    the dense model's: exact line agreement, label-free."""
    from edge_sparse.models.zoo import ctc_greedy

    return float(np.mean([a == b for a, b in zip(ctc_greedy(dense), ctc_greedy(out))]))


def _summary(config: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in config.values():
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------------ layers
def _find_layers(path: Path, proto, preset, patterns, ladder, int8: bool, input_shapes, input_values):
    """(working proto with every node named, [_Layer]) for the prunable layers that have kernels."""
    import onnx_ir as ir
    from tvm import relax

    from edge_sparse.compiler import import_relax
    from edge_sparse.intake import load_model
    from edge_sparse.passes.prune import default_skips, find_prunable_layers
    from edge_sparse.passes.sparsify import find_layers

    work = onnx.ModelProto()
    work.CopyFrom(proto)
    used = {n.name for n in work.graph.node if n.name}
    for i, n in enumerate(work.graph.node):           # quantize selects nodes by name: name them all
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)
    intake = load_model(path, input_shapes, input_values=input_values)
    mod = import_relax(intake)
    kernels = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for kl in find_layers(func):
                name = intake.weight_names.get(kl.weight_sha1)
                if name is not None:
                    kernels.setdefault(name, kl)
    irm = ir.serde.deserialize_model(work)
    prunable, _ = find_prunable_layers(irm)
    skips = default_skips(irm, prunable)
    out = []
    for p in prunable:
        kl = kernels.get(p.name)
        if kl is None or p.name in skips:
            continue
        out.append(_Layer(p.name, p.node, p, kl, _layer_options(kl, preset, patterns, ladder, int8)))
    return work, out


# ------------------------------------------------------------------------------------------------------- plot
def _plot(frontier: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pred = frontier["search_front"]
    if pred:
        ax.plot([p["predicted_ms"] for p in pred], [100 * (1 - p["predicted_drop"]) for p in pred], color="0.75",
                lw=1, label="search front (predicted)")
    pts = [p for p in frontier["points"] if p["drop"] is not None]
    ax.scatter([p["latency_ms"] for p in pts], [100 * (1 - p["drop"]) for p in pts], s=18, color="tab:blue",
               label="evaluated (held-out)")
    front = [pts[i] for i in range(len(pts)) if pts[i]["pareto"]]
    front.sort(key=lambda p: p["latency_ms"])
    if front:
        ax.step([p["latency_ms"] for p in front], [100 * (1 - p["drop"]) for p in front], where="post",
                color="tab:blue", lw=1.2, label="Pareto front")
    ch = frontier.get("chosen")
    if ch:
        ax.scatter([ch["latency_ms"]], [100 * (1 - ch["drop"])], marker="*", s=180, color="tab:red", zorder=5,
                   label=f"chosen ({ch['latency_ms']:.3g} ms"
                         f"{', estimate' if ch.get('latency_source') == ESTIMATE else ''})")
    for name, b in frontier["baselines"].items():
        if b.get("latency_ms") is not None:
            ax.scatter([b["latency_ms"]], [100 * (1 - b["drop"])], marker="s", s=50, zorder=4, label=name)
    if frontier.get("max_drop") is not None:
        ax.axhline(100 * (1 - frontier["max_drop"]), color="tab:red", ls=":", lw=1, label="budget")
    if frontier["latency_source"] == ESTIMATE:
        ax.set_xlabel(f"ESTIMATED latency of the prunable layers (ms, {frontier['target']} cost model, "
                      f"{frontier['threads']} cores; not measured)")
    else:
        ax.set_xlabel(f"latency (ms, {frontier['threads']} thread(s), {frontier['where']})")
    ax.set_ylabel(f"{frontier['metric']} vs dense model (%)")
    title = f"{frontier['model']['name']} on {frontier['target']}"
    if not frontier["baselines"] and frontier.get("baselines_note"):
        import textwrap

        title += "\n" + "\n".join(textwrap.wrap(f"onnxruntime fp32/int8: {frontier['baselines_note']}", 90))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- optimize
def optimize(model, out_dir, *, target: str = "host", calib, eval_data, max_drop=None, latency_ms: float | None = None,
             metric: str = "cosine", rpc: str | None = None, tracker: str | None = None, key: str | None = None,
             threads: int | None = None, measure: bool | None = None, ladder=LADDER, patterns=FP32_PATTERNS,
             int8: bool = True, method: str | None = None, sensitivity_samples: int = 16,
             max_evals: int = MAX_EVALS, cache_dir=None, bundle: bool = False, target_file=None,
             input_shapes=None, input_values=None, batch: int | None = None, baselines: bool = True,
             repeat: int | None = None, min_seconds: float | None = None, recover_steps: int = 0, force: bool = False,
             quiet: bool | None = None, int8_scheme: str = "dynamic") -> dict[str, Any]:
    """Search, apply, compile and measure the fastest configuration of ``model`` within the budget (see module doc).

    calib / eval_data: ``.npz`` paths or ``{input: array}``, disjoint samples (calibration for the tables, pruning
    statistics and int8 ranges; evaluation held out for the real metric). max_drop: fraction or ``"1%"`` of
    ``metric`` (``cosine``: worst output's mean cosine vs the dense model; ``top1``: top-1 agreement with the dense
    model on classifier outputs). latency_ms: a latency budget (alone: best accuracy under it).
    measure: time the kernels on the target (here when it is native, else over RPC); False: the cost model alone;
    None: measure, except for a target that does not run here with no ``rpc``/``tracker`` (its cost model; the
    chosen model is cross-compiled, not benchmarked, and no onnxruntime point is made).
    recover_steps: distil every evaluated pruned configuration this many steps on the calibration samples
    (:func:`edge_sparse.recover.recover`, needs the recover extra) before it is quantized and measured.
    repeat / min_seconds: the model benchmarks' settings (:func:`edge_sparse.benchmark.bench`'s defaults when None).
    int8_scheme: how the int8 layers are quantized (weights always symmetric per output channel): "dynamic"
    (activation ranges per call, MatMulInteger; all-MiniLM-L6-v2 with every linear int8: held-out cosine 0.993) or
    "static" (calibrated QDQ ranges; the same model 0.923: outliers in the FFN activations).
    """
    from edge_sparse import targets
    from edge_sparse.benchmark import bench, run_ort
    from edge_sparse.compiler import compile as compile_model
    from edge_sparse.errors import check_threads
    from edge_sparse.intake import read_model
    from edge_sparse.passes import calibrate
    from edge_sparse.passes import methods as M
    from edge_sparse.passes.prune_masks import parse_pattern
    from edge_sparse.pruning import _first_samples

    t0 = time.perf_counter()
    progress = Progress(quiet)
    if metric not in METRICS:
        raise UserError(f"unknown --metric '{metric}': use {', '.join(METRICS)}")
    if int8_scheme not in ("dynamic", "static"):
        raise UserError(f"unknown --int8-scheme '{int8_scheme}': use dynamic or static")
    if max_drop is None and latency_ms is None:
        raise UserError("give an accuracy budget (--max-drop 1%), a latency budget (--latency-ms X) or both")
    drop_budget = parse_drop(max_drop) if max_drop is not None else None
    check_number(latency_ms, "--latency-ms", 0, 1e7, lo_open=True)
    check_number(max_evals, "--max-evals", 1, 1000)
    check_number(recover_steps, "--recover-steps", 0, 10**7)
    ladder = sorted({float(s) for s in ladder})
    if not ladder or any(not 0 < s < 1 for s in ladder):
        raise UserError("--ladder needs sparsities in (0, 1), e.g. 0.5,0.7,0.9")
    for p in patterns:
        pat = parse_pattern(p)
        if pat.kind != "block" or pat.cols != 1:
            raise UserError(f"--patterns takes Rx1 block patterns of the float BSR kernels (16x1, 8x1, 4x1), got {p}")
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    preset = targets.get(target, target_file)
    remote = rpc is not None or tracker is not None
    check_threads(threads, preset.cores, where=f"the target {preset.name}")
    # a target that does not run here, and no device to measure on: the cost model's estimates (all its cores)
    estimate = not remote and not preset.is_native
    if estimate:
        if measure:
            raise UserError(f"target '{preset.name}' does not run on this machine: its kernels can be timed only on "
                            f"the device (--rpc HOST:PORT or --tracker HOST:PORT --key KEY); without one, leave "
                            f"measurement out and optimize uses {preset.name}'s cost model")
        if latency_ms is not None:
            raise UserError(f"--latency-ms needs the model measured on '{preset.name}' (--rpc HOST:PORT or --tracker "
                            f"HOST:PORT --key KEY): without the device optimize only estimates its prunable layers "
                            f"from the cost model; use --max-drop")
        if threads is not None and threads != preset.cores:
            raise UserError(f"--threads {threads}: {preset.name}'s cost model estimates all its {preset.cores} "
                            f"cores; leave --threads out, or measure on the device (--rpc HOST:PORT)")
        measure = False
    threads = int(threads or (preset.cores if estimate else 1))
    out = check_output(out_dir, force=force, kind="dir", what="output directory",
                       inputs=tuple(x for x in (model, calib, eval_data, target_file) if isinstance(x, (str, os.PathLike))),
                       replaceable=lambda p: (p / "frontier.json").is_file())
    if bundle:
        from edge_sparse.bundle import check_bundle_target

        check_bundle_target(preset)
    if measure is None:
        measure = True
    proto = read_model(path)
    specs = calibrate.input_specs(proto)

    if calib is None:
        raise UserError("optimize needs calibration data: pass --calib FILE.npz")
    calib_data = calibrate.check_calibration(calib, specs, "calibration data") if isinstance(calib, dict) else \
        calibrate.load_calibration(calib, specs)
    if eval_data is None:
        raise UserError("optimize needs evaluation data: pass --eval FILE.npz")
    # the held-out samples (labelled zoo data: the real metrics of the chosen model are reported too)
    held = evaluation.load_eval(eval_data, proto, calib=calib)
    eval_set = held.sets["eval"].inputs if held.labelled else held.inputs
    method_obj = M.get(method or M.default(True, many=True))   # --method sparsegpt to reconstruct
    session = where = None
    if remote:
        from edge_sparse.rpc import connect

        session, where = connect(rpc, tracker=tracker, key=key)
    where = where or ("cost model" if estimate else "local")
    if estimate:
        progress.info(f"target '{preset.name}' does not run on this machine and no --rpc/--tracker device was given: "
                      f"latencies are estimates from its cost model ({preset.cores} cores); accuracy is measured "
                      f"here on the held-out samples; the chosen model is cross-compiled for it")

    with progress.step("finding layers and their kernel options"):
        work, layers = _find_layers(path, proto, preset, patterns, ladder, int8, input_shapes, input_values)
    if not layers:
        raise UserError(f"{path.name} has no layer with a sparse or int8 kernel on {preset.name} (MatMul, Gemm or "
                        f"1x1 Conv with a constant float weight): nothing to optimize")
    with progress.step(f"latency table: {sum(len(la.options) for la in layers)} entries for {len(layers)} layers "
                       f"({'measured ' + where if measure else 'cost model'})"):
        lat = latency_table(layers, preset, measure=measure, session=session, where=where, threads=threads,
                            cache_dir=cache_dir, progress=progress)
    if session is not None:                # an RPC server serves one session at a time: free it for the benchmark
        import gc

        del session
        gc.collect()
    sample = {k: v[:max(1, sensitivity_samples)] for k, v in calib_data.items()}
    with progress.step(f"sensitivity table on {calibrate.sample_count(sample)} calibration samples"):
        sens = sensitivity_table(work, layers, sample, method=method_obj, batch=batch, progress=progress)

    classifiers = calibrate.classifier_outputs(work)
    if metric == "top1" and not classifiers:
        raise UserError("--metric top1 needs a classifier output (class scores on the last axis); use --metric cosine")
    dense_eval = calibrate.run_model(work, eval_set, batch)
    if metric == "line-agreement" and not _sequence_outputs(dense_eval, classifiers):
        raise UserError("--metric line-agreement needs a CTC recognizer's output (softmax class scores of shape "
                        "[samples, time, classes]); use --metric top1 for classifiers or cosine otherwise")
    evaluated: dict[tuple, dict] = {}

    def evaluate(choice: tuple) -> dict:
        if choice not in evaluated:
            config = {la.name: la.options[i] for la, i in zip(layers, choice)}
            m = _apply(work, layers, config, calib_data, method_obj, batch, recover_steps, int8_scheme)
            score = _score(dense_eval, calibrate.run_model(m, eval_set, batch), classifiers, metric, eval_set)
            evaluated[choice] = {"config": config, "model": m, "drop": max(0.0, 1.0 - score)}
            progress.info(f"evaluated {_summary(config)}: {metric} drop {100 * (1 - score):.3f}%")
        return evaluated[choice]

    costs = [[(lat[la.name][k]["us"], sens[la.name][k]["rel_l2"] ** 2) for k in la.options] for la in layers]
    with progress.step("searching (Pareto dynamic program over layers)"):
        front = pareto_search(costs)
    dense_choice = tuple(0 for _ in layers)
    rest_us = 0.0
    measured: dict[tuple, dict] = {}

    def layers_us(choice):
        return sum(costs[i][c][0] for i, c in enumerate(choice))

    def pick() -> int:
        """Index into ``front`` of the choice meeting the budgets (raises when none can)."""
        fits_lat = [i for i, p in enumerate(front) if latency_ms is None or (rest_us + p[0]) / 1e3 <= latency_ms]
        if drop_budget is None:
            if not fits_lat:
                fastest = front[-1]
                raise UserError(f"no configuration meets --latency-ms {latency_ms:g}: the fastest reachable is "
                                f"{(rest_us + fastest[0]) / 1e3:.4g} ms (predicted) at {metric} drop "
                                f"{100 * evaluate(fastest[2])['drop']:.2f}%")
            return fits_lat[0]                     # the lowest predicted error within the latency budget
        # bisection along the front (error ascending): the fastest candidate whose real drop fits the budget
        lo, hi = 0, len(front) - 1
        if evaluate(front[hi][2])["drop"] <= drop_budget:
            lo = hi
        evals = 1
        while hi - lo > 1 and evals < max_evals:
            mid = (lo + hi) // 2
            evals += 1
            if evaluate(front[mid][2])["drop"] <= drop_budget:
                lo = mid
            else:
                hi = mid
        if evaluate(front[lo][2])["drop"] > drop_budget:
            lo = 0
        if latency_ms is not None and (rest_us + front[lo][0]) / 1e3 > latency_ms:
            best_lat = front[fits_lat[0]] if fits_lat else front[-1]
            raise UserError(
                f"no configuration meets --max-drop {100 * drop_budget:g}% and --latency-ms {latency_ms:g}: the "
                f"fastest within the accuracy budget is {(rest_us + front[lo][0]) / 1e3:.4g} ms (predicted) at "
                f"{metric} drop {100 * evaluate(front[lo][2])['drop']:.2f}%; the best accuracy at "
                f"{(rest_us + best_lat[0]) / 1e3:.4g} ms is a {metric} drop of "
                f"{100 * evaluate(best_lat[2])['drop']:.2f}%")
        return lo

    def compile_and_measure(choice, stage: Path, name: str) -> dict:
        ev = evaluate(choice) if choice != dense_choice else {"model": work}
        onnx_path = stage / f"{name}.onnx"
        atomic_write(onnx_path, lambda f: onnx.save(ev["model"], f))
        art = stage / f"{name}-artifact"
        with progress.step(f"compiling {name} for {preset.name}"):
            manifest = compile_model(onnx_path, preset, art, bundle=bundle and name == "model", quiet=True,
                                     input_shapes=input_shapes, input_values=input_values,
                                     threads=threads)
        if estimate:                       # nothing to run it on: the cost model's figure stands
            return {"latency_ms": round(layers_us(choice) / 1e3, 5), "artifact": art, "manifest": manifest,
                    "onnx": onnx_path, "bench": None}
        first = _first_samples(eval_set, specs, 1)
        with progress.step(f"benchmarking {name} ({where}, {threads} thread(s))"):
            r = bench(art, rpc=rpc, tracker=tracker, key=key, threads=threads, energy="none", quiet=True,
                      inputs=first, repeat=repeat, min_seconds=min_seconds, compare=str(path) if baselines and not remote and name == "model" else None)
        res = {"latency_ms": r["runs"][0]["latency"]["median_ms"], "artifact": art, "manifest": manifest,
               "onnx": onnx_path, "bench": r}
        measured[choice] = res
        return res

    with atomic_dir(out) as stage:
        if latency_ms is not None:
            d = compile_and_measure(dense_choice, stage, "dense")
            rest_us = max(0.0, d["latency_ms"] * 1e3 - layers_us(dense_choice))
        for _ in range(3):
            with progress.step(f"evaluating candidates on {calibrate.sample_count(eval_set)} held-out samples"):
                idx = pick()
            choice = front[idx][2]
            res = compile_and_measure(choice, stage, "model")
            if latency_ms is None or res["latency_ms"] <= latency_ms:
                break
            rest_us = max(0.0, res["latency_ms"] * 1e3 - layers_us(choice))   # the model missed it: re-search
            progress.info(f"measured {res['latency_ms']:.4g} ms > --latency-ms {latency_ms:g}; searching again")
        else:
            raise UserError(f"no configuration meets --latency-ms {latency_ms:g}: the last one measured "
                            f"{res['latency_ms']:.4g} ms at {metric} drop {100 * evaluate(choice)['drop']:.2f}%")
        chosen_ev = evaluate(choice) if choice != dense_choice else {"config": {la.name: "fp32" for la in layers},
                                                                       "drop": 0.0, "model": work}
        with progress.step(f"accuracy of the chosen model on {held.info['samples']} held-out samples"):
            accuracy = evaluation.evaluate(work, {"chosen": chosen_ev["model"]}, held, batch,
                                           reference_outputs=None if held.labelled else dense_eval)
        base = {}
        if not baselines:
            base_note = "not run (baselines=False)"
        elif remote:
            base_note = ("not measured: onnxruntime runs on this machine, the model was measured on the RPC device "
                         f"({where})")
        elif estimate:
            base_note = (f"not measured and not estimated: no {preset.name} device here, and its cost model describes "
                         f"edge-sparse's kernels, not onnxruntime's")
        else:
            base_note = f"measured side by side with the chosen model on this machine, {threads} thread(s)"
        if baselines and not remote and not estimate:
            with progress.step("onnxruntime fp32 and int8 (quantize_dynamic) side by side"):
                base = _ort_baselines(path, proto, res["bench"], eval_set, dense_eval, classifiers, metric, threads,
                                      run_ort)
        # ------------------------------------------------------------------------- frontier
        scale = None if estimate else res["latency_ms"] * 1e3 / max(rest_us + layers_us(choice), 1e-9)
        predicted_source = ESTIMATE if estimate else \
            f"predicted (latency table: {'measured kernels' if measure else 'cost model'} + measured rest of model)"
        points = []
        for ch, ev in evaluated.items():
            pred = (rest_us + layers_us(ch)) / 1e3
            meas = measured[ch]["latency_ms"] if ch in measured else None
            points.append({"config": ev["config"], "summary": _summary(ev["config"]),
                           "proxy_error": round(sum(costs[i][c][1] for i, c in enumerate(ch)), 8),
                           "predicted_ms": round(pred, 5), "measured_ms": meas,
                           "latency_ms": round(meas if meas is not None else pred, 5),
                           "latency_source": f"measured ({where})" if meas is not None else predicted_source,
                           "drop": round(ev["drop"], 6), "chosen": ch == choice})
        for p in points:
            p["pareto"] = not any(q is not p and q["latency_ms"] <= p["latency_ms"] and q["drop"] <= p["drop"] and
                                  (q["latency_ms"] < p["latency_ms"] or q["drop"] < p["drop"]) for q in points)
        points.sort(key=lambda p: p["latency_ms"])
        frontier = {
            "tool": "edge-sparse optimize",
            "model": {"name": path.name, "sha256": sha256_file(path)},
            "target": preset.name, "where": where, "threads": threads,
            "metric": metric, "metric_definition": {
                "cosine": "worst float output's mean per-sample cosine similarity with the dense model",
                "pooled-cosine": "the same after mean pooling over axis 1 (weighted by the attention_mask input when "
                                 "there is one): a sentence embedding's cosine",
                "top1": "top-1 agreement with the dense model on classifier outputs",
                "line-agreement": "fraction of held-out lines whose greedy CTC decode (argmax, repeats merged, "
                                  "blanks dropped) equals the dense model's (CTC recognizers)"}[metric],
            "max_drop": drop_budget, "latency_ms_budget": latency_ms,
            "calibration_samples": calibrate.sample_count(calib_data),
            "eval_samples": calibrate.sample_count(eval_set),
            "method": method_obj.name, "recover_steps": recover_steps, "ladder": ladder, "patterns": list(patterns), "int8": int8,
            "int8_scheme": int8_scheme if int8 else None,
            "latency_source": ESTIMATE if estimate else "measured kernels" if measure else "cost model",
            "latency_note": (f"every latency is an estimate from {preset.name}'s cost model ({preset.cores} cores) of "
                             f"the prunable layers in the table only (the rest of the model is not in it); nothing "
                             f"was run on {preset.name}, no device here (measure with --rpc or --tracker/--key)"
                             if estimate else
                             "latency_ms is measured_ms for compiled points and otherwise the latency table's layer "
                             "times plus the measured rest of the model (predicted_ms)"),
            "rest_ms": round(rest_us / 1e3, 5), "prediction_scale": round(scale, 4) if scale is not None else None,
            "search_front": [{"predicted_ms": round((rest_us + p[0]) / 1e3, 5),
                              "predicted_drop": round(min(1.0, p[1] / 2), 8), "proxy_error": round(p[1], 8)}
                             for p in front],
            "points": points,
            "chosen": {"config": chosen_ev["config"], "summary": _summary(chosen_ev["config"]),
                       "latency_ms": res["latency_ms"], "predicted_ms": round((rest_us + layers_us(choice)) / 1e3, 5),
                       "latency_source": ESTIMATE if estimate else f"measured ({where})",
                       "drop": round(chosen_ev["drop"], 6), "layers": res["manifest"].get("layers", [])},
            "baselines": base, "baselines_note": base_note,
            "accuracy": accuracy,
            "layers": [{"name": la.name, "node": la.node, "K": la.kernel.K, "N": la.kernel.N,
                        "latency_us": lat[la.name], "sensitivity": sens[la.name]} for la in layers],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if base.get("onnxruntime int8") and base["onnxruntime int8"].get("latency_ms"):
            frontier["speedup"] = {
                "vs_onnxruntime_fp32": round(base["onnxruntime fp32"]["latency_ms"] / res["latency_ms"], 3),
                "vs_onnxruntime_int8": round(base["onnxruntime int8"]["latency_ms"] / res["latency_ms"], 3)}
        # lay out the output: model.onnx, artifact/, frontier.json/png
        os.replace(res["onnx"], stage / "model.onnx")
        os.replace(res["artifact"], stage / "artifact")
        for extra in ("dense.onnx", "dense-artifact"):
            p = stage / extra
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        (stage / "frontier.json").write_text(json_text(frontier, indent=1) + "\n")
        try:
            _plot(frontier, stage / "frontier.png")
        except ImportError:
            progress.info("matplotlib not installed: frontier.png skipped (pip install edge-sparse[plot])")
    ch = frontier["chosen"]
    progress.info(f"chosen {ch['summary']}: {ch['latency_ms']:.4g} ms, {metric} drop {100 * ch['drop']:.3f}% "
                  f"-> {out}")
    return frontier


def _ort_baselines(path, proto, bench_result, eval_set, dense_eval, classifiers, metric, threads, run_ort) -> dict:
    """onnxruntime fp32 (from the benchmark's side-by-side run) and int8 (``quantize_dynamic``) points."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_sparse.passes import calibrate
    from edge_sparse.pruning import _first_samples
    from edge_sparse.quantization import DYNAMIC_OPS, _quiet_ort_logging
    from edge_sparse.util import latency_stats

    out = {}
    fp32 = next((r for r in bench_result["runs"] if r.get("runtime") == "onnxruntime"), None)
    if fp32 is not None:
        out["onnxruntime fp32"] = {"latency_ms": fp32["latency"]["median_ms"], "drop": 0.0, "threads": threads}
    settings = bench_result["settings"]
    with tempfile.TemporaryDirectory(prefix="edge-sparse-ort-int8-") as tmp:
        q = Path(tmp) / "int8.onnx"
        with _quiet_ort_logging():
            quantize_dynamic(str(path), str(q), op_types_to_quantize=DYNAMIC_OPS, weight_type=QuantType.QInt8)
        qproto = onnx.load(str(q))
        drop = max(0.0, 1.0 - _score(dense_eval, calibrate.run_model(qproto, eval_set), classifiers, metric,
                                            eval_set))
        inputs = _first_samples(eval_set, calibrate.input_specs(proto), 1)
        r = run_ort(str(q), inputs, threads, settings["warmup"], settings["repeat"], settings["min_seconds"], None,
                    None)
        out["onnxruntime int8"] = {"latency_ms": latency_stats(r["samples_s"])["median_ms"], "drop": round(drop, 6),
                                   "threads": threads, "quantization": "quantize_dynamic (QInt8 weights)"}
    return out
