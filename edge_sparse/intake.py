"""ONNX intake: load and check a model, fix its input shapes, fold constants, and report what TVM cannot import.

Real exports reach TVM's importer with Shape->Slice->Concat chains feeding Reshape, ConstantOfShape and dynamic Pad,
which it rejects. With static input shapes, onnxruntime's basic graph optimisation (constant folding and redundant-node
elimination, no contrib ops) folds those chains away; onnx-ir passes then clean the graph and infer shapes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edge_sparse.util import sha256_file
from edge_sparse.errors import UserError

__all__ = ["TensorInfo", "Intake", "load_model", "parse_input_shape", "unsupported_ops", "index_ranges"]

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    range: tuple[int, int] | None = None   # integer inputs used as indices: the valid [min, max]

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            d["range"] = [int(self.range[0]), int(self.range[1])]
        return d


@dataclasses.dataclass
class Intake:
    model: onnx.ModelProto                 # static shapes, constants folded
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    source_sha256: str
    source_name: str
    weight_names: dict[str, str]           # sha1(float32 C bytes) -> initializer name (2-D also keyed transposed)

    @property
    def shape_dict(self) -> dict[str, list[int]]:
        return {t.name: list(t.shape) for t in self.inputs}


_SHAPE_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+(?:\s*[,x]\s*\d+)*)\s*$")


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` (or ``1x3x224x224``) -> ``("x", (1, 3, 224, 224))``."""
    m = _SHAPE_RE.match(spec or "")
    if not m:
        raise UserError(f"malformed --input-shape '{spec}': expected NAME=D1,D2,... with positive integers, e.g. x=1,3,224,224")
    dims = tuple(int(d) for d in re.split(r"\s*[,x]\s*", m.group(2)))
    if any(d <= 0 for d in dims):
        raise UserError(f"malformed --input-shape '{spec}': dimensions must be positive integers")
    return m.group(1), dims


def read_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; every failure is one UserError line."""
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # DecodeError, truncated protobuf, missing external data
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}); is the file truncated or not ONNX?") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path} is not an ONNX model (no graph inside); pass a .onnx file exported from your framework")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise UserError(f"{path} fails the ONNX checker: {first}") from None
    return model


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _fix_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]]) -> list[TensorInfo]:
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    for name in overrides:
        if name not in names:
            raise UserError(f"--input-shape names '{name}', but the model's inputs are: {', '.join(names)}")
    infos = []
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in overrides:
            new = overrides[vi.name]
            if dims and len(new) != len(dims):
                raise UserError(f"--input-shape {vi.name}: model input has rank {len(dims)} ({dims}), got {len(new)} dims")
            for d_old, d_new in zip(dims, new):
                if isinstance(d_old, int) and d_old > 0 and d_old != d_new:
                    raise UserError(f"--input-shape {vi.name}={','.join(map(str, new))} conflicts with the model's static shape {dims}")
            dims = list(new)
        bad = [d for d in dims if not isinstance(d, int) or d <= 0]
        if bad or not vi.type.tensor_type.shape.dim and not dims:
            shown = ",".join(str(d) for d in dims) or "unknown"
            raise UserError(f"input '{vi.name}' has a dynamic shape [{shown}]; fix it with --input-shape {vi.name}=D1,D2,...")
        shape_proto = vi.type.tensor_type.shape
        del shape_proto.dim[:]
        for d in dims:
            shape_proto.dim.add().dim_value = int(d)
        dtype = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise UserError(f"input '{vi.name}' has an unsupported element type {vi.type.tensor_type.elem_type}")
        infos.append(TensorInfo(vi.name, tuple(int(d) for d in dims), dtype))
    return infos


def _ort_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding with onnxruntime's *basic* level (no contrib-op fusions), on static shapes."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edge-sparse-intake-") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "folded.onnx")
        onnx.save(model, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300]
            raise UserError(f"onnxruntime cannot load the model to fold constants: {msg}") from None
        return onnx.load(dst)


def _clean(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnx_ir.passes.common import (
        IdentityEliminationPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, ShapeInferencePass,
    )

    irm = ir.serde.deserialize_model(model)
    for p in (IdentityEliminationPass(), RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), ShapeInferencePass()):
        irm = p(irm).model
    return ir.serde.serialize_model(irm)


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TVM's ONNX importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known or node.domain not in ("", "ai.onnx"):
            out.append((node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}::{node.op_type}",
                        node.name or f"#{i}"))
    return out


def _weight_names(model: onnx.ModelProto) -> dict[str, str]:
    from onnx import numpy_helper

    names: dict[str, str] = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        w = numpy_helper.to_array(init)
        names[hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest()] = init.name
        if w.ndim == 2:
            names.setdefault(hashlib.sha1(np.ascontiguousarray(w.T).tobytes()).hexdigest(), init.name)
    return names


_VALUE_PRESERVING = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Valid [min, max] of each integer graph input that is only used as Gather indices (possibly through a Cast or
    reshape): ``[-n, n - 1]`` for a gathered axis of extent n, intersected over uses. The runtime checks inputs
    against these ranges, the way onnxruntime rejects out-of-bounds indices."""
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for vi in list(model.graph.value_info) + list(model.graph.input):
        dims = _dims(vi)
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            shapes.setdefault(vi.name, dims)
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for pos, name in enumerate(node.input):
            users.setdefault(name, []).append((node, pos))
    outputs = {o.name for o in model.graph.output}

    def bound(name: str, depth: int = 0) -> tuple[int, int] | None:
        uses = users.get(name, [])
        if not uses or name in outputs or depth > 8:
            return None
        lo, hi = -(1 << 63), (1 << 63) - 1
        for node, pos in uses:
            if node.op_type == "Gather" and pos == 1 and node.domain in ("", "ai.onnx"):
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                data = shapes.get(node.input[0])
                if not data or not -len(data) <= axis < len(data):
                    return None
                n = data[axis]
                lo, hi = max(lo, -n), min(hi, n - 1)
            elif node.op_type in _VALUE_PRESERVING and pos == 0:
                if node.op_type == "Cast" and next((a.i for a in node.attribute if a.name == "to"), None) not in (
                        onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                    return None
                inner = bound(node.output[0], depth + 1)
                if inner is None:
                    return None
                lo, hi = max(lo, inner[0]), min(hi, inner[1])
            else:
                return None
        return lo, hi

    ranges = {}
    for vi in _graph_inputs(model):
        if vi.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            r = bound(vi.name)
            if r is not None:
                ranges[vi.name] = r
    return ranges


def _outputs(model: onnx.ModelProto) -> list[TensorInfo]:
    infos = []
    for vi in model.graph.output:
        dims = _dims(vi)
        shape = tuple(d if isinstance(d, int) else -1 for d in dims)
        infos.append(TensorInfo(vi.name, shape, _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, "float32")))
    return infos


def load_model(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
               check_tvm: bool = True) -> Intake:
    """Load ``path``, fix input shapes, fold constants; raise UserError for anything the user must fix."""
    path = Path(path)
    model = read_model(path)
    inputs = _fix_input_shapes(model, dict(input_shapes or {}))
    folded = _clean(_ort_fold(model))
    if check_tvm:
        missing = unsupported_ops(folded)
        if missing:
            shown = ", ".join(f"{op} ({name})" for op, name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"TVM cannot import these ops: {shown}{more}; replace them before export (e.g. export LSTM unrolled)")
    ranges = index_ranges(folded)
    return Intake(
        model=folded,
        inputs=[dataclasses.replace(t, range=ranges.get(t.name)) for t in inputs],
        outputs=_outputs(folded),
        source_sha256=sha256_file(path),
        source_name=path.name,
        weight_names=_weight_names(folded),
    )
