"""ONNX intake: load and check a model, fix its input shapes, fold constants, and report what TVM cannot import.

Real exports reach TVM's importer with Shape->Slice->Concat chains feeding Reshape, ConstantOfShape and dynamic Pad,
which it rejects. With static input shapes, onnxruntime's basic graph optimisation (constant folding and redundant-node
elimination, no contrib ops) folds those chains away; onnx-ir passes then clean the graph and infer shapes.

Inputs frozen with ``--input-value NAME=V`` (a sample rate, a mode flag) become initializers first; onnxscript's
optimizer (on onnx-ir) then folds what depends on them, inlining the taken branch of every ``If`` whose condition is
now constant, before onnxruntime folds the rest.

Shapes: ``NAME=1,3,224,224`` (or ``1x3x224x224``); a scalar (rank 0) is ``NAME=()`` (``NAME=`` is accepted too).
Zoo models (recognised by their sha256) take the recipe's shapes and values as defaults.
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

__all__ = ["TensorInfo", "Intake", "load_model", "parse_input_shape", "parse_input_value", "unsupported_ops",
           "index_ranges"]

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
    frozen: dict[str, list] = dataclasses.field(default_factory=dict)   # inputs frozen to constants (values)

    @property
    def shape_dict(self) -> dict[str, list[int]]:
        return {t.name: list(t.shape) for t in self.inputs}


MAX_DIM = 2**31 - 1            # TVM indexes with int32 by default
MAX_ELEMENTS = 2**34           # 64 GiB of float32: beyond any device this targets
_SHAPE_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+(?:\s*[,x]\s*\d+)*)\s*$")
_SCALAR_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(?:\(\s*\))?\s*$")
_VALUE_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(.+?)\s*$")
_MAX_VALUE_ELEMENTS = 4096        # --input-value is for scalars and small tensors, not data


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` (or ``1x3x224x224``) -> ``("x", (1, 3, 224, 224))``; ``"sr=()"`` / ``"sr="`` -> ``("sr", ())``."""
    m = _SCALAR_RE.match(spec or "")
    if m:
        return m.group(1), ()
    m = _SHAPE_RE.match(spec or "")
    if not m:
        raise UserError(f"malformed --input-shape '{spec}': expected NAME=D1,D2,... with positive integers, "
                        f"e.g. x=1,3,224,224 (a scalar: NAME=())")
    dims = tuple(int(d) for d in re.split(r"\s*[,x]\s*", m.group(2)))
    if any(d <= 0 for d in dims):
        raise UserError(f"malformed --input-shape '{spec}': dimensions must be positive integers")
    if any(d > MAX_DIM for d in dims) or len(dims) > 32 or int(np.prod(dims, dtype=object)) > MAX_ELEMENTS:
        raise UserError(f"--input-shape '{spec[:80]}' is too large: at most {MAX_DIM} per dimension and "
                        f"{MAX_ELEMENTS:.0e} elements in all")
    return m.group(1), dims


def parse_input_value(spec: str) -> tuple[str, np.ndarray]:
    """``"sr=16000"`` -> ``("sr", array(16000.))``; ``"k=1,2,3"`` or ``"k=[1,2,3]"`` -> a 1-D array.

    Values are parsed as float64 and cast to the input's dtype by :func:`load_model` (which also reshapes a flat list
    to the input's shape); integers up to 2**53 are exact."""
    m = _VALUE_RE.match(spec or "")
    body = m.group(2).strip() if m else ""
    is_list = "," in body or (body.startswith("[") and body.endswith("]"))
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1].strip()
    if body.endswith(","):                      # "k=7," : a one-element tensor
        body = body[:-1]
    try:
        items = [float(v) for v in re.split(r"\s*,\s*", body.strip())] if body.strip() else []
    except ValueError:
        items = []
    if not m or not items:
        raise UserError(f"malformed --input-value '{spec}': expected NAME=V (a number, e.g. sr=16000) or "
                        f"NAME=V1,V2,... (a small tensor, filled in row-major order)")
    if len(items) > _MAX_VALUE_ELEMENTS:
        raise UserError(f"--input-value {m.group(1)}: {len(items)} values; freezing is for scalars and small tensors "
                        f"(at most {_MAX_VALUE_ELEMENTS}); feed data as an input instead")
    arr = np.asarray(items, dtype=np.float64)
    return m.group(1), (arr if is_list else arr.reshape(()))


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
    if all(n.domain in ("", "ai.onnx") for n in model.graph.node):   # strict mode knows only the standard ops
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except onnx.shape_inference.InferenceError as e:
            # Strict inference also fails inside the function bodies of some standard ops (ONNX's own
            # test_mvn: MeanVarianceNormalization's Constant); onnxruntime, our reference, is the judge there.
            if not _onnxruntime_accepts(model):
                first = " ".join(str(e).split())[:300]
                raise UserError(f"{path} fails ONNX shape inference: {first}; fix the model's export") from None
    problem = _weight_problem(model)
    if problem:
        raise UserError(f"{path}: {problem}; onnxruntime refuses this model too: fix the export")
    return model


def _onnxruntime_accepts(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime can build a session for ``model`` (no graph optimisation: only its own checks)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:  # any refusal (invalid graph, shape mismatch, unknown op) counts as "does not accept"
        return False
    return True


_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


def _weight_problem(model: onnx.ModelProto) -> str | None:
    """Inconsistent constant weights that the checker and shape inference let through: a Conv whose kernel_shape
    disagrees with its weight, an empty (zero-size) weight."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        pos = _WEIGHT_INPUT.get(node.op_type)
        if pos is None or node.domain not in ("", "ai.onnx") or len(node.input) <= pos:
            continue
        w = dims.get(node.input[pos])
        if w is None:
            continue
        where = f"{node.op_type} '{node.name or f'#{i}'}'"
        if 0 in w:
            return f"{where} has a zero-size weight '{node.input[pos]}' {w}"
        ks = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
        if node.op_type in ("Conv", "ConvTranspose") and ks is not None and ks != w[2:]:
            return f"{where}: kernel_shape {ks} disagrees with its weight '{node.input[pos]}' {w} (spatial {w[2:]})"
    return None


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _has_rank(vi: onnx.ValueInfoProto) -> bool:
    """False when the model does not say the input's rank (no shape at all); a rank-0 shape is a scalar."""
    return vi.type.tensor_type.HasField("shape")


def _fix_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]],
                      frozen: frozenset[str] = frozenset()) -> list[TensorInfo]:
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    for name in overrides:
        if name not in names:
            raise UserError(f"--input-shape names '{name}', but the model's inputs are: {', '.join(names)}")
    infos = []
    for vi in inputs:
        dims = _dims(vi)
        known_rank = _has_rank(vi)
        if vi.name in overrides:
            new = overrides[vi.name]
            if known_rank and len(new) != len(dims):
                raise UserError(f"--input-shape {vi.name}: model input has rank {len(dims)} ({dims}), got {len(new)} dims")
            for d_old, d_new in zip(dims, new):
                if isinstance(d_old, int) and d_old > 0 and d_old != d_new:
                    raise UserError(f"--input-shape {vi.name}={','.join(map(str, new))} conflicts with the model's static shape {dims}")
            dims, known_rank = list(new), True
        bad = [d for d in dims if not isinstance(d, int) or d <= 0]
        if bad or not known_rank:
            shown = ",".join(str(d) for d in dims) if known_rank else "unknown rank"
            how = f"--input-shape {vi.name}=D1,D2,... (a scalar: {vi.name}=())"
            if vi.name not in frozen:
                how += f", or freeze it with --input-value {vi.name}=V"
            raise UserError(f"input '{vi.name}' has a dynamic shape [{shown}]; fix it with {how}")
        shape_proto = vi.type.tensor_type.shape
        del shape_proto.dim[:]
        for d in dims:
            shape_proto.dim.add().dim_value = int(d)
        dtype = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise UserError(f"input '{vi.name}' has an unsupported element type {vi.type.tensor_type.elem_type}")
        infos.append(TensorInfo(vi.name, tuple(int(d) for d in dims), dtype))
    return infos


def _freeze_inputs(model: onnx.ModelProto, values: dict[str, np.ndarray],
                   shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Turn the inputs named in ``values`` into initializers and fold what depends on them (``If`` on a constant
    condition is replaced by its taken branch). Returns the model and the frozen arrays (input dtype and shape)."""
    import onnx_ir as ir
    import onnxscript.optimizer as optimizer

    inputs = {vi.name: vi for vi in _graph_inputs(model)}
    for name in values:
        if name not in inputs:
            raise UserError(f"--input-value names '{name}', but the model's inputs are: {', '.join(inputs)}")
    frozen: dict[str, np.ndarray] = {}
    for name, value in values.items():
        vi = inputs[name]
        dtype = _ONNX_DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None or dtype == "float16":
            raise UserError(f"--input-value {name}: input element type {vi.type.tensor_type.elem_type} cannot be frozen")
        shape = shapes.get(name)
        if shape is None and _has_rank(vi) and all(isinstance(d, int) and d > 0 for d in _dims(vi)):
            shape = tuple(_dims(vi))
        if shape is None:
            shape = value.shape
        if int(np.prod(shape, dtype=np.int64)) != value.size:
            raise UserError(f"--input-value {name}: {value.size} value(s) for an input of shape {list(shape)} "
                            f"({int(np.prod(shape, dtype=np.int64))} elements); give exactly that many, or fix the "
                            f"shape with --input-shape {name}=...")
        cast = value.astype(dtype)
        if dtype != "bool" and not np.array_equal(cast.astype(np.float64), value):
            raise UserError(f"--input-value {name}: {value.tolist()} is not exactly representable as {dtype}")
        frozen[name] = cast.reshape(shape)

    irm = ir.serde.deserialize_model(model)
    graph = irm.graph
    for value in list(graph.inputs):
        if value.name in frozen:
            graph.inputs.remove(value)
            value.const_value = ir.tensor(frozen[value.name], name=value.name)
            value.shape = ir.Shape(frozen[value.name].shape)
            graph.register_initializer(value)
    optimizer.fold_constants(irm)
    return ir.serde.serialize_model(irm), frozen


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

    import logging

    irm = ir.serde.deserialize_model(model)
    passes = ir.passes.Sequential(IdentityEliminationPass(), RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(),
                                  ShapeInferencePass())
    # ShapeInferencePass logs a traceback when ONNX's inference fails inside a standard op's function body (ONNX's
    # test_mvn) and leaves the model unchanged, which is all we need: the user gets no traceback for it.
    log = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        irm = passes(irm).model
    finally:
        log.setLevel(level)
    return ir.serde.serialize_model(irm)


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op_type, node name) of every node TVM's ONNX importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    # the importer converts If and Constant itself, outside its converter map (its _check_for_unsupported_ops)
    known = {**_get_convert_map(), "If": None, "Constant": None}
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


def zoo_defaults(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Input shapes and frozen values of the zoo recipe whose ONNX file ``path`` is (by sha256), else empty."""
    from edge_sparse.models.zoo import recipe_for_file

    recipe = recipe_for_file(path)
    if recipe is None:
        return {}, {}
    return dict(recipe.input_shapes), {k: np.asarray(v, dtype=np.float64) for k, v in recipe.input_values.items()}


def load_model(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
               check_tvm: bool = True, input_values: dict[str, np.ndarray] | None = None) -> Intake:
    """Load ``path``, freeze ``input_values``, fix input shapes, fold constants; raise UserError for anything the
    user must fix. A zoo model's recipe supplies the shapes and values the caller leaves out."""
    path = Path(path)
    model = read_model(path)
    shapes, values = dict(input_shapes or {}), dict(input_values or {})
    zoo_shapes, zoo_values = zoo_defaults(path)
    for name, shape in zoo_shapes.items():
        if name not in values:
            shapes.setdefault(name, shape)
    for name, value in zoo_values.items():
        if name not in shapes:
            values.setdefault(name, value)
    frozen: dict[str, np.ndarray] = {}
    if values:
        model, frozen = _freeze_inputs(model, values, shapes)
        shapes = {k: v for k, v in shapes.items() if k not in frozen}
    inputs = _fix_input_shapes(model, shapes, frozenset(frozen))
    folded = _clean(_ort_fold(model))
    if check_tvm:
        missing = unsupported_ops(folded)
        if missing:
            shown = ", ".join(f"{op} ({name})" for op, name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            how = "replace them before export (e.g. export LSTM unrolled)"
            if any(op == "If" for op, _ in missing):
                how = ("an If that branches on an input folds away when that input is frozen with --input-value "
                       "NAME=V; otherwise " + how)
            raise UserError(f"TVM cannot import these ops: {shown}{more}; {how}")
    ranges = index_ranges(folded)
    return Intake(
        model=folded,
        inputs=[dataclasses.replace(t, range=ranges.get(t.name)) for t in inputs],
        outputs=_outputs(folded),
        source_sha256=sha256_file(path),
        source_name=path.name,
        weight_names=_weight_names(folded),
        frozen={k: v.tolist() for k, v in frozen.items()},
    )
