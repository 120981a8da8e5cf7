"""Python API for int8 quantization: :func:`quantize`, built on ``onnxruntime.quantization`` (no calibrator of ours).

Schemes:
- ``static``: ``quantize_static`` in QDQ format. Activations uint8 per tensor (MinMax ranges from the calibration
  part of ``--calib``), weights int8 symmetric (zero point 0), per output channel with ``per_channel``. Only
  MatMul / Gemm / Conv are quantized: those are the ops our int8 kernels take over; everything else stays float.
- ``dynamic``: ``quantize_dynamic`` (onnxruntime's own int8 path: DynamicQuantizeLinear + MatMulInteger, uint8
  activations with per-call ranges, int8 symmetric weights) for MatMul / Gemm. Calibration data only feeds the
  accuracy report.

Symmetric int8 weights keep pruned zeros exactly zero, so ``prune`` then ``quantize`` keeps the sparsity the kernels
exploit (checked and reported). Facts go into ``metadata_props["edge_sparse.quantization"]``; the JSON report holds
accuracy against the float input model on the calibration and held-out parts of the data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from edge_sparse.errors import UserError
from edge_sparse.progress import Progress

__all__ = ["quantize", "QuantizeResult", "SCHEMES", "METADATA_KEY", "quantized_weights", "float_weight_view"]

SCHEMES = ("dynamic", "static")
METADATA_KEY = "edge_sparse.quantization"
STATIC_OPS = ["MatMul", "Gemm", "Conv"]
DYNAMIC_OPS = ["MatMul", "Gemm"]


@dataclasses.dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: dict

    @property
    def warnings(self) -> list[str]:
        return self.report.get("warnings", [])


class _Reader:
    """``CalibrationDataReader`` over the calibration part, one batch of the model's batch size per call."""

    def __init__(self, data: dict[str, np.ndarray], unit: int, partial: bool = False):
        n = len(next(iter(data.values())))
        last = n if partial else n - unit + 1          # a dynamic batch dim takes a short last batch too
        self._feeds = [{k: v[i:i + unit] for k, v in data.items()} for i in range(0, last, unit)]
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


@contextlib.contextmanager
def _quiet_ort_logging():
    """onnxruntime.quantization logs 'consider pre-processing' through the root logger; keep the CLI output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """int8 weight initializers of a quantized model (DequantizeLinear / MatMulInteger / ConvInteger inputs)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        cand = []
        if node.op_type == "DequantizeLinear":
            cand = [node.input[0]]
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            cand = [node.input[1]]
        for name in cand:
            t = inits.get(name)
            if t is not None and t.data_type == onnx.TensorProto.INT8:
                out[name] = numpy_helper.to_array(t)
    return out


def float_weight_view(proto: onnx.ModelProto, name: str = "model"):
    """``(model, restore)``: a QDQ model with each weight ``DequantizeLinear(int8, scale, 0)`` feeding a MatMul /
    Gemm / Conv replaced by its float value (exact: q * scale), so that ``prune`` works on it as on any float model;
    ``restore(pruned)`` quantizes the pruned weights back with the same scales (zeros stay zero, kept weights get
    their int8 value back exactly) and re-inserts the DequantizeLinear nodes. ``restore`` is None for a float model.
    A dynamic-quantized model (MatMulInteger) is refused: its weight scales live in the graph after the op.
    """
    from onnx import numpy_helper

    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY in meta and json.loads(meta[METADATA_KEY]).get("scheme") == "dynamic" or \
            any(n.op_type in ("MatMulInteger", "ConvInteger") for n in proto.graph.node):
        raise UserError(f"{name} is quantized with --scheme dynamic (MatMulInteger); prune the float model first, "
                        f"then quantize (or quantize with --scheme static, which prune accepts)")
    inits = {t.name: t for t in proto.graph.initializer}
    users: dict[str, list] = {}
    for node in proto.graph.node:
        for i, v in enumerate(node.input):
            users.setdefault(v, []).append((node, i))
    found = []
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        u = users.get(node.output[0], [])
        if q.dtype != np.int8 or (zp is not None and np.any(zp)) or node.input[1] not in inits or not u or \
                any(n.op_type not in ("MatMul", "Gemm", "Conv") or i != 1 for n, i in u) or \
                len(users.get(node.input[0], [])) != 1:
            continue
        found.append(node)
    if not found:
        return proto, None
    view = onnx.ModelProto()
    view.CopyFrom(proto)
    records = []
    for node in found:
        q = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis % q.ndim] = scale.size
        w = (q.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
        records.append((onnx.helper.make_node("DequantizeLinear", list(node.input), list(node.output),
                                              name=node.name, axis=axis), node.input[0], scale.reshape(shape)))
        view.graph.initializer.append(numpy_helper.from_array(w, node.output[0]))
    keep = [n for n in view.graph.node if not any(n.output[:] == r[0].output[:] and n.op_type == "DequantizeLinear"
                                                   for r in records)]
    drop = {r[1] for r in records}
    del view.graph.node[:]
    view.graph.node.extend(keep)
    kept_inits = [t for t in view.graph.initializer if t.name not in drop]
    del view.graph.initializer[:]
    view.graph.initializer.extend(kept_inits)

    def restore(pruned: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
        floats = {t.name: t for t in out.graph.initializer}
        new_inits = []
        for dq, qname, scale in records:
            w = numpy_helper.to_array(floats[dq.output[0]])
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            new_inits.append(numpy_helper.from_array(q, qname))
        dq_out = {r[0].output[0] for r in records}
        inits_ = [t for t in out.graph.initializer if t.name not in dq_out] + new_inits
        del out.graph.initializer[:]
        out.graph.initializer.extend(inits_)
        nodes = [r[0] for r in records] + list(out.graph.node)      # weight DQs read initializers only: first
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        return out

    return view, restore


def _float_zeros(model: onnx.ModelProto, nodes=None) -> tuple[int, int]:
    """(zeros, elements) over the float weights of MatMul / Gemm / Conv in ``model`` (only ``nodes`` when given)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    z = n = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in inits \
                and (nodes is None or node.name in nodes):
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.dtype.kind == "f":
                z, n = z + int(np.count_nonzero(w == 0)), n + w.size
    return z, n



def _prepare_float(proto, scheme: str, per_channel: bool):
    """``proto`` as onnxruntime.quantization can take it: tensors held in Constant nodes (paddle2onnx and old
    exporters put every weight there) become initializers (only initializer weights are quantized), and a static
    per-channel model below opset 13 is converted to 13 (per-axis DequantizeLinear needs it)."""
    if any(n.op_type == "Constant" for n in proto.graph.node):
        import onnx_ir as ir
        from onnx_ir.passes.common import LiftConstantsToInitializersPass

        model = ir.serde.deserialize_model(proto)
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
        proto = ir.serde.serialize_model(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if scheme == "static" and per_channel and opset < 13:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, 13)
    return proto


def quantize(model, output=None, *, calib=None, eval_data=None, scheme: str = "static", per_channel: bool = False,
             holdout: float | None = None, report_path=None, force: bool = False, batch: int | None = None,
             nodes=None, quiet: bool | None = None) -> QuantizeResult:
    """Quantize ``model`` (path or ModelProto) to int8 with onnxruntime and report the accuracy cost.

    calib: ``.npz`` path or ``{input: array}`` (samples on the first axis); required (static ranges come from it, and
    accuracy is always measured). The last ``holdout`` fraction is kept out of calibration and reported separately
    (default 0.25 without ``eval_data``, 0 with it).
    eval_data: held-out samples for ``accuracy.eval`` (:func:`edge_sparse.evaluation.load_eval`: a zoo
    ``.eval.npz`` gives the real metrics); without it the held-out part of ``calib``, label-free.
    nodes: names of the nodes to quantize (default: every MatMul/Gemm[/Conv]); the others stay float.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from edge_sparse.passes import calibrate
    from edge_sparse.pruning import _load
    from edge_sparse.util import atomic_write, check_output, json_text

    t0 = time.perf_counter()
    progress = Progress(quiet)
    if scheme not in SCHEMES:
        raise UserError(f"unknown --scheme '{scheme}': use {' or '.join(SCHEMES)}")
    if calib is None:
        raise UserError("quantize needs calibration data: pass --calib FILE.npz with real input samples "
                        "(static ranges come from it; accuracy is measured on its held-out part)")
    proto, name, sha, path = _load(model)
    if METADATA_KEY in {p.key for p in proto.metadata_props}:
        raise UserError(f"{name} is already quantized (metadata '{METADATA_KEY}'); quantize the float model")
    ins = [x for x in (path, calib, eval_data) if isinstance(x, (str, os.PathLike))]
    out_path = check_output(output, force=force, inputs=ins)
    rep_path = check_output(report_path, force=force, inputs=ins, what="report")
    if out_path is not None and rep_path is not None and out_path.resolve() == rep_path.resolve():
        raise UserError("the report path equals the output model path; choose different files")
    specs = calibrate.input_specs(proto)
    if isinstance(calib, dict):
        data, calib_desc = calibrate.check_calibration(calib, specs, "calibration data"), "arrays"
    else:
        data, calib_desc = calibrate.load_calibration(calib, specs), str(calib)
    from edge_sparse import evaluation

    warnings = []
    holdout = evaluation.holdout_share(holdout, eval_data)
    calib_part, held_part = calibrate.split_holdout(data, specs, holdout)
    if eval_data is not None:                 # read and checked before quantizing
        eval_set = evaluation.load_eval(eval_data, proto, calib=calib)
        warnings += evaluation.overlap_warnings(eval_set, data)
    else:
        eval_set, more = evaluation.fallback(calib_part, held_part, calib_desc)
        warnings += more

    with tempfile.TemporaryDirectory(prefix="edge-sparse-quant-") as tmp:
        src = Path(tmp) / "float.onnx"
        dst = Path(tmp) / "int8.onnx"
        onnx.save(_prepare_float(proto, scheme, per_channel), str(src))
        with progress.step(f"quantizing ({scheme}, {'per channel' if per_channel else 'per tensor'})"), \
                _quiet_ort_logging():
            try:
                if scheme == "static":
                    unit = calibrate._batch_size(specs, batch)
                    dyn_batch = all(not sp.dims or sp.dims[0] is None for sp in specs)
                    quantize_static(str(src), str(dst), _Reader(calib_part, unit, partial=dyn_batch),
                                    quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=STATIC_OPS, per_channel=per_channel,
                                    nodes_to_quantize=list(nodes) if nodes is not None else None,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod.MinMax,
                                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
                else:
                    quantize_dynamic(str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel,
                                     nodes_to_quantize=list(nodes) if nodes is not None else None,
                                     weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})
            except UserError:
                raise
            except Exception as e:  # onnxruntime rejects the model: a model problem the user must fix
                msg = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                raise UserError(f"onnxruntime.quantization failed on {name}: {msg}") from None
        qmodel = onnx.load(str(dst))

    weights = quantized_weights(qmodel)
    if not weights:
        raise UserError(f"{name} has no MatMul/Gemm{'/Conv' if scheme == 'static' else ''} with a constant float "
                        f"weight: nothing to quantize")
    qz = sum(int(np.count_nonzero(w == 0)) for w in weights.values())
    qn = sum(w.size for w in weights.values())
    fz, fn = _float_zeros(proto, set(nodes) if nodes is not None else None)
    record = {"scheme": scheme, "format": "QDQ" if scheme == "static" else "QOperator",
              "per_channel": per_channel, "weights": "int8 symmetric",
              "activations": "uint8 asymmetric per tensor" + (", dynamic range" if scheme == "dynamic" else ""),
              "layers": len(weights), "weight_zeros": round(qz / qn, 6) if qn else 0.0}
    # keep what the input recorded (pruning facts travel with the model), add ours
    kept = {p.key: p.value for p in proto.metadata_props}
    del qmodel.metadata_props[:]
    for k, v in {**kept, METADATA_KEY: json.dumps(record, separators=(",", ":"))}.items():
        qmodel.metadata_props.add(key=k, value=v)
    if fz and qz < fz:
        raise RuntimeError(f"quantization lost pruned zeros ({qz} < {fz}); weights must be symmetric")

    with progress.step(f"accuracy versus the float model on {eval_set.info['samples']} samples "
                       f"({eval_set.info['origin']})"):
        section = evaluation.evaluate(proto, {"int8": qmodel}, eval_set, batch, reference_name="float")
        accuracy = {"eval": section, **evaluation.compare_parts(
            proto, qmodel, {"calibration": calib_part, "holdout": held_part}, batch, section, eval_set, "int8")}

    from edge_sparse import __version__

    report = {
        "tool": {"name": "edge-sparse", "version": __version__},
        "source_model": {"name": name, "sha256": sha},
        "output_model": str(out_path) if out_path else None,
        "quantization": record,
        "calibration": {"source": calib_desc, "samples": calibrate.sample_count(calib_part),
                        "holdout_samples": calibrate.sample_count(held_part) if held_part else 0,
                        "used_for": "ranges and accuracy" if scheme == "static" else "accuracy only"},
        "sparsity": {"float_zeros": fz, "float_weights": fn, "int8_zeros": qz, "int8_weights": qn},
        "accuracy": accuracy,
        "reference": "the input model run by onnxruntime in float32",
        "metadata_key": METADATA_KEY,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_path is not None:
        atomic_write(out_path, lambda f: onnx.save(qmodel, f), replace=force)
    if rep_path is not None:
        atomic_write(rep_path, json_text(report) + "\n", replace=force)
    return QuantizeResult(qmodel, report)
