"""Calibration data and onnxruntime measurements for pruning: input-feature norms, output comparisons.

- :func:`input_specs`, :func:`load_calibration`, :func:`random_calibration`: calibration inputs as
  ``{input name: array}`` with the samples stacked on the first (batch) axis, checked against the model.
- :func:`collect_statistics`: a pruning method's statistics of the activations that feed the prunable layers (e.g.
  per-feature L2 norms), collected by exposing those tensors as extra graph outputs on a copy of the model.
- :func:`token_mask_input`, :func:`token_rows`: padding. A model fed padded sequences (a transformer's
  ``attention_mask``) computes states at padded positions that nothing downstream reads; statistics count only the
  rows of real tokens, or padding (90% of the positions of short sentences at sequence length 128) would decide the
  masks and the reconstruction.
- :class:`Evaluator`: one onnxruntime session with the prunable weights turned into graph inputs, so a layer pruned
  at several sparsities can be evaluated without rebuilding the session (sensitivity analysis).
- :func:`compare`: cosine similarity, relative L2, max abs error and top-1 agreement against dense outputs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edge_sparse.errors import UserError

__all__ = ["InputSpec", "input_specs", "load_calibration", "check_calibration", "random_calibration", "split_holdout",
           "sample_hashes", "sample_warnings",
           "sample_count",
           "collect_statistics", "token_mask_input", "token_rows", "run_model", "Evaluator", "compare", "classifier_outputs", "DEFAULT_BATCH"]

MAX_RANDOM_SAMPLES = 100_000
MAX_RANDOM_BYTES = 4 << 30
DEFAULT_BATCH = 8          # samples per onnxruntime call when the model's batch dimension is dynamic

# Ops that may sit between a Softmax and a graph output while the output still counts as class scores.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple[int | None, ...]        # None: dynamic
    dtype: np.dtype

    def shown(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def sample_count(data: dict[str, np.ndarray]) -> int:
    return int(next(iter(data.values())).shape[0]) if data else 0


def check_calibration(data: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data]
    unknown = [n for n in data if n not in names]
    if unknown:
        raise UserError(f"{source} has array(s) {', '.join(map(repr, unknown))} that are not model inputs; "
                        f"name the arrays after the model's inputs: {', '.join(names)}")
    if missing:
        raise UserError(f"{source} lacks input(s) {', '.join(map(repr, missing))}; the model's inputs are: "
                        f"{', '.join(names)}")
    checked, counts = {}, set()
    for spec in specs:
        arr = np.asarray(data[spec.name])
        want = "[samples, " + ", ".join("?" if d is None else str(d) for d in spec.dims[1:]) + "]"
        if arr.ndim != len(spec.dims) or any(d is not None and d != a for d, a in zip(spec.dims[1:], arr.shape[1:])):
            raise UserError(f"{source}: '{spec.name}' has shape {list(arr.shape)}, expected {want} (samples stacked "
                            f"on the first axis of the model's input shape {spec.shown()})")
        if arr.ndim == 0 or arr.shape[0] < 1:
            raise UserError(f"{source}: '{spec.name}' holds no samples")
        if (arr.dtype.kind in "fc") != (spec.dtype.kind in "fc"):
            raise UserError(f"{source}: '{spec.name}' has dtype {arr.dtype}, the model wants {spec.dtype}")
        batch = spec.dims[0] if spec.dims else None
        if batch is not None and arr.shape[0] % batch:
            raise UserError(f"{source}: '{spec.name}' has {arr.shape[0]} samples, not a multiple of the model's fixed "
                            f"batch size {batch}")
        checked[spec.name] = arr.astype(spec.dtype, copy=False)
        counts.add(arr.shape[0])
    if len(counts) > 1:
        raise UserError(f"{source}: inputs hold different numbers of samples ({sorted(counts)}); stack the same "
                        f"samples for every input")
    return checked


def load_calibration(path: str | Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` of inputs by name (samples on the first axis) and check names, ranks, shapes and dtypes."""
    from edge_sparse.runtime import read_arrays

    path = Path(path)
    return check_calibration(read_arrays(path, "calibration data"), specs, path.name)


def random_calibration(specs: list[InputSpec], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal floats; integer inputs are all ones (ids, masks: the only value safe for every vocabulary)."""
    if not 1 <= samples <= MAX_RANDOM_SAMPLES:
        raise UserError(f"--calib-random must be between 1 and {MAX_RANDOM_SAMPLES} samples, got {samples}")
    rng = np.random.default_rng(seed)
    total = sum(samples * int(np.prod([d or 1 for d in spec.dims], dtype=object)) * spec.dtype.itemsize for spec in specs)
    if total > MAX_RANDOM_BYTES:
        raise UserError(f"--calib-random {samples} would need {total / 2**30:.1f} GiB of inputs (limit "
                        f"{MAX_RANDOM_BYTES / 2**30:g} GiB); use fewer samples")
    data = {}
    for spec in specs:
        if any(d is None for d in spec.dims[1:]):
            raise UserError(f"input '{spec.name}' has dynamic dimensions {spec.shown()}; random calibration needs "
                            f"static shapes, pass --calib FILE.npz instead")
        batch = spec.dims[0] if spec.dims and spec.dims[0] is not None else 1
        shape = (samples * batch, *spec.dims[1:])
        if spec.dtype.kind == "f":
            data[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            data[spec.name] = np.ones(shape, dtype=spec.dtype)
    return data


def _batch_size(specs: list[InputSpec], batch: int | None) -> int:
    fixed = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
    if fixed:
        return min(fixed)
    return batch or DEFAULT_BATCH


def sample_hashes(data: dict[str, np.ndarray], unit: int = 1) -> list[str]:
    """A content hash per sample (``unit`` rows of every input, inputs in name order): equal samples, equal hashes."""
    import hashlib

    n = sample_count(data) // unit
    out = []
    for i in range(n):
        h = hashlib.sha256()
        for name in sorted(data):
            part = np.ascontiguousarray(data[name][i * unit:(i + 1) * unit])
            h.update(name.encode() + str(part.dtype).encode() + str(part.shape).encode() + part.tobytes())
        out.append(h.hexdigest())
    return out


MIN_DISTINCT_SAMPLES = 8   # below this, per-channel statistics and error estimates are mostly noise


def sample_warnings(data: dict[str, np.ndarray], specs: list[InputSpec]) -> list[str]:
    """Warnings for calibration data with repeated samples or too few distinct ones."""
    hashes = sample_hashes(data, _batch_size(specs, 1))
    distinct = len(set(hashes))
    out = []
    if distinct < len(hashes):
        out.append(f"calibration data holds {len(hashes)} samples but only {distinct} distinct ones (the rest are "
                   f"repeats): repeats add no information and make held-out figures optimistic")
    if distinct < MIN_DISTINCT_SAMPLES:
        out.append(f"only {distinct} distinct calibration sample{'s' if distinct != 1 else ''}: statistics and error "
                   f"estimates from so few are noisy; use at least {MIN_DISTINCT_SAMPLES}, better 64+ "
                   f"('edge-sparse models get NAME --calib N' for zoo models)")
    return out


def split_holdout(data: dict[str, np.ndarray], specs: list[InputSpec], fraction: float
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, held-out): the last ``fraction`` of the samples (whole batches, at least one left to calibrate).
    A held-out sample whose content equals a calibration sample (by hash) is dropped from the held-out part: the two
    never share a sample."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--holdout must be in [0, 1), got {fraction}")
    unit = _batch_size(specs, 1)
    units = sample_count(data) // unit
    held = min(int(round(units * fraction)), units - 1)
    cut = (units - held) * unit
    calib = {k: v[:cut] for k, v in data.items()}
    if not held:
        return calib, {}
    seen = set(sample_hashes(calib, unit))
    keep = [i for i, h in enumerate(sample_hashes({k: v[cut:] for k, v in data.items()}, unit)) if h not in seen]
    if not keep:
        return calib, {}
    rows = np.concatenate([np.arange(cut + i * unit, cut + (i + 1) * unit) for i in keep])
    return calib, {k: v[rows] for k, v in data.items()}


def _batches(data: dict[str, np.ndarray], size: int):
    n = sample_count(data)
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in data.items()}


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"onnxruntime cannot load the model: {msg}") from None


def _run(session, data: dict[str, np.ndarray], specs: list[InputSpec], batch: int | None,
         extra_feeds: dict[str, np.ndarray] | None = None, names: list[str] | None = None, reduce=None):
    size = _batch_size(specs, batch)
    names = names or [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in _batches(data, size):
        if extra_feeds:
            feeds = {**feeds, **extra_feeds}
        try:
            results = session.run(names, feeds)
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(f"onnxruntime failed on the calibration inputs: {msg}") from None
        if reduce is not None:
            reduce(dict(zip(names, results)), feeds)
            continue
        for n, r in zip(names, results):
            collected[n].append(r)
    if reduce is not None:
        return None
    return {n: np.concatenate(v, axis=0) if v and v[0].ndim else np.stack(v) for n, v in collected.items()}


def run_model(model: onnx.ModelProto, data: dict[str, np.ndarray], batch: int | None = None) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``data`` (concatenated over batches)."""
    return _run(_session(model), data, input_specs(model), batch)


def token_mask_input(specs: list[InputSpec], data: dict[str, np.ndarray]) -> str | None:
    """The input that marks real tokens in padded sequences, or None.

    An integer/bool input of rank 2 (``[batch, positions]``) named like a mask (``attention_mask``, ``input_mask``,
    ``mask``: "mask" in the name, so ``token_type_ids``, also 0/1, is not taken), holding only 0 and 1 in ``data``,
    with at least one 1 per sample and at least one 0 somewhere (without padding there is nothing to leave out)."""
    for spec in specs:
        if "mask" not in spec.name.lower() or len(spec.dims) != 2 or spec.dtype.kind not in "iub":
            continue
        arr = data.get(spec.name)
        if arr is None or arr.ndim != 2 or not arr.size:
            continue
        if np.isin(arr, (0, 1)).all() and (arr != 0).any(axis=1).all() and (arr == 0).any():
            return spec.name
    return None


def token_rows(tokens: np.ndarray | None, activation: np.ndarray, feature_axis: int) -> np.ndarray | None:
    """Which rows of the activation's ``[rows, features]`` view (features moved last, the other axes flattened in
    order) are real tokens: a bool vector, or None (count every row) when there is no mask or the activation's
    positions do not line up with it. Lining up: the activation's leading non-feature axes are the mask's
    ``[batch, positions]`` (e.g. ``[B, S, K]``, or ``[B, S, heads, K]``), or one flattened ``[B*S]`` axis."""
    if tokens is None:
        return None
    axis = feature_axis % activation.ndim
    lead = [activation.shape[i] for i in range(activation.ndim) if i != axis]
    real = np.asarray(tokens) != 0
    if tuple(lead[:real.ndim]) == real.shape:
        return np.broadcast_to(real.reshape(real.shape + (1,) * (len(lead) - real.ndim)), lead).reshape(-1)
    if len(lead) == 1 and lead[0] == real.size:
        return real.reshape(-1)
    return None


def collect_statistics(model: onnx.ModelProto, statistics: dict, data: dict[str, np.ndarray],
                       batch: int | None = None) -> dict:
    """Feed every batch of each tensor in ``{tensor name: Statistic}`` (see :mod:`edge_sparse.passes.methods`) over
    ``data`` to its statistic, in one onnxruntime pass; returns ``{tensor name: statistic.result()}``. With a token
    mask among the inputs (:func:`token_mask_input`), each batch's mask goes along, so padded positions are left out."""
    specs = input_specs(model)
    mask_name = token_mask_input(specs, data)
    graph_inputs = {s.name for s in specs}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in statistics:
        if name not in present and name not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))

    def accumulate(outputs, feeds):
        for name, stat in statistics.items():
            act = feeds[name] if name in graph_inputs else outputs[name]
            if mask_name:                      # only then: a statistic written without a token mask still works
                stat.update(act, feeds[mask_name])
            else:
                stat.update(act)

    names = [o.name for o in probe.graph.output if o.name in statistics] or [probe.graph.output[0].name]
    _run(_session(probe), data, specs, batch, names=names, reduce=accumulate)
    return {name: stat.result() for name, stat in statistics.items()}


class Evaluator:
    """Runs ``model`` with the initializers in ``weight_names`` fed as inputs, so they can be swapped per run."""

    def __init__(self, model: onnx.ModelProto, weight_names: list[str], batch: int | None = None):
        self.specs = input_specs(model)
        self.batch = batch
        lifted = onnx.ModelProto()
        lifted.CopyFrom(model)
        wanted = set(weight_names)
        keep, self.weights = [], {}
        existing = {i.name for i in lifted.graph.input}
        for init in lifted.graph.initializer:
            if init.name in wanted:
                self.weights[init.name] = onnx.numpy_helper.to_array(init)
                if init.name not in existing:
                    lifted.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            else:
                keep.append(init)
        del lifted.graph.initializer[:]
        lifted.graph.initializer.extend(keep)
        nodes = []
        for node in lifted.graph.node:        # weights held in Constant nodes (old exporters) become inputs too
            if node.op_type == "Constant" and node.output[0] in wanted and node.output[0] not in self.weights:
                value = next(a for a in node.attribute if a.name == "value").t
                self.weights[node.output[0]] = onnx.numpy_helper.to_array(value)
                lifted.graph.input.append(helper.make_tensor_value_info(node.output[0], value.data_type,
                                                                        list(value.dims)))
            else:
                nodes.append(node)
        del lifted.graph.node[:]
        lifted.graph.node.extend(nodes)
        self.session = _session(lifted)

    def run(self, data: dict[str, np.ndarray], overrides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feeds = {**self.weights, **(overrides or {})}
        return _run(self.session, data, self.specs, self.batch, extra_feeds=feeds)


def classifier_outputs(model: onnx.ModelProto) -> set[str]:
    """Outputs that are class scores: produced by Softmax/LogSoftmax (through reshapes/identities only)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    found = set()
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            found.add(out.name)
    return found


def compare(dense: dict[str, np.ndarray], pruned: dict[str, np.ndarray], classifiers: set[str] = frozenset()
            ) -> dict[str, dict]:
    """Per output: ``cosine_mean``/``cosine_min`` (per sample, flattened), ``rel_l2``, ``max_abs`` and, for class
    scores, ``top1_agreement`` (fraction of argmax over the last axis that match)."""
    metrics = {}
    for name, d in dense.items():
        p = pruned[name]
        if d.dtype.kind not in "fc":
            metrics[name] = {"exact_match": float(np.mean(d == p))}
            continue
        d64, p64 = d.astype(np.float64), p.astype(np.float64)
        rows_d = d64.reshape(d64.shape[0], -1) if d64.ndim > 1 else d64.reshape(1, -1)
        rows_p = p64.reshape(rows_d.shape)
        nd, np_ = np.linalg.norm(rows_d, axis=1), np.linalg.norm(rows_p, axis=1)
        dot = np.sum(rows_d * rows_p, axis=1)
        both_zero = (nd == 0) & (np_ == 0)
        cos = np.where(both_zero, 1.0, dot / np.maximum(nd * np_, 1e-30))
        diff = np.linalg.norm(d64 - p64)
        base = np.linalg.norm(d64)
        m = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
             "rel_l2": float(diff / base) if base > 0 else float(diff),
             "max_abs": float(np.max(np.abs(d64 - p64))) if d64.size else 0.0}
        if name in classifiers and d.ndim >= 1 and d.shape[-1] > 1:
            m["top1_agreement"] = float(np.mean(np.argmax(d, axis=-1) == np.argmax(p, axis=-1)))
        metrics[name] = m
    return metrics
