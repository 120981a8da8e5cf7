"""Pruning passes on onnx-ir models: find the prunable weights, zero them in a pattern, record what was done.

- :func:`find_prunable_layers`: MatMul / Gemm / Conv nodes whose weight is a constant float (an initializer or a
  Constant node) used by that node alone (grouped convs and weights in the A slot are not prunable: the kernels
  do not take them).
- :func:`default_skips`: the first Conv (it sees raw pixels and has few weights) and classifier heads (a layer whose
  output reaches a graph output only through bias adds, softmax and reshapes).
- :class:`PruneWeights`: prunes each planned layer's weight in its pattern with a pruning method
  (:mod:`edge_sparse.passes.methods`).
- :class:`AnnotateSparsity`: writes the sparsity facts into ``metadata_props`` (key ``edge_sparse.pruning``).

The graph is never changed: only initializer values (zeros in place, and kept values for methods that update
weights) and model metadata, so the result runs in onnxruntime unchanged and the compiler finds the zeros.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from edge_sparse.passes import methods as M
from edge_sparse.passes.prune_masks import Pattern, from_canonical, to_canonical

__all__ = ["PrunableLayer", "LayerPlan", "find_prunable_layers", "default_skips", "PruneWeights", "AssignConstants",
           "AnnotateSparsity",
           "prune_weight", "get_weight", "set_weight",
           "METADATA_KEY", "HEAD_OPS"]

METADATA_KEY = "edge_sparse.pruning"

# Ops allowed between a classifier head's matmul and a graph output (Add/Mul only with a constant operand).
HEAD_OPS = {"Add", "Mul", "Softmax", "LogSoftmax", "Sigmoid", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Identity", "Cast", "ArgMax", "TopK", "Transpose"}


@dataclasses.dataclass
class PrunableLayer:
    """One prunable weight. ``name`` is the initializer's name (what recipes and reports use), ``node`` its consumer.

    ``activation`` is the node's data input; its reduction features lie on ``feature_axis``, and for convs each
    input channel covers ``repeat`` = kh*kw columns of the canonical ``[N_out, K_in]`` matrix.
    """

    name: str
    node: str
    op: str
    weight_shape: tuple[int, ...]
    trans_b: bool
    activation: str
    feature_axis: int
    repeat: int = 1
    conv: dict | None = None           # Conv only: strides, pads, dilations (reconstruction unfolds the input)

    @property
    def size(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def n_out(self) -> int:
        if self.op == "Conv" or (self.op == "Gemm" and self.trans_b):
            return self.weight_shape[0]
        return self.weight_shape[1]

    def to_dict(self) -> dict:
        return {"name": self.name, "node": self.node, "op": self.op, "weight_shape": list(self.weight_shape)}


@dataclasses.dataclass
class LayerPlan:
    """What to do to one layer: a pattern and a target sparsity (ignored for N:M, which fixes it)."""

    pattern: Pattern
    sparsity: float


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.value) if a is not None else default


def _const_initializer(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and value.name in graph.initializers and value.const_value is not None


def _constant_node(value: ir.Value | None) -> ir.Node | None:
    """The ``Constant`` node (with a ``value`` tensor attribute) producing ``value``, if any (old Paddle exports)."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx") \
            and "value" in producer.attributes:
        return producer
    return None


def _weight_tensor(graph: ir.Graph, value: ir.Value | None):
    if _const_initializer(graph, value):
        return value.const_value
    node = _constant_node(value)
    return node.attributes["value"].value if node is not None else None


def get_weight(model: ir.Model, layer: PrunableLayer) -> np.ndarray:
    """The layer's weight as a numpy array (from its initializer or its Constant node)."""
    value = model.graph.initializers.get(layer.name)
    if value is not None and value.const_value is not None:
        return value.const_value.numpy()
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].name == layer.name:
            return node.attributes["value"].value.numpy()
    raise KeyError(layer.name)


def set_weight(model: ir.Model, layer: PrunableLayer, array: np.ndarray) -> None:
    value = model.graph.initializers.get(layer.name)
    if value is not None and value.const_value is not None:
        value.const_value = ir.tensor(array, name=layer.name)
        return
    for node in model.graph:
        if node.op_type == "Constant" and node.outputs[0].name == layer.name:
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=layer.name))
            return
    raise KeyError(layer.name)


def _node_name(node: ir.Node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def find_prunable_layers(model: ir.Model) -> tuple[list[PrunableLayer], list[dict]]:
    """(prunable layers in graph order, ``[{node, op, reason}]`` for MatMul/Gemm/Conv nodes that are not)."""
    graph = model.graph
    layers, rejected = [], []
    for index, node in enumerate(graph):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        name = _node_name(node, index)

        def reject(reason, node=node, name=name):
            rejected.append({"node": name, "op": node.op_type, "reason": reason})

        if len(node.inputs) < 2 or node.inputs[0] is None:
            reject("missing inputs")
            continue
        weight = node.inputs[1]
        tensor = _weight_tensor(graph, weight)
        if tensor is None:
            reject("weight is not a constant (initializer or Constant node)")
            continue
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            reject(f"weight dtype {tensor.dtype.name} is not floating point")
            continue
        shape = tuple(int(d) for d in tensor.shape)
        users = {id(u.node) for u in weight.uses()}
        if len(users) > 1:
            reject(f"weight {weight.name} is shared by {len(users)} nodes")
            continue
        trans_b, axis, repeat = False, -1, 1
        if node.op_type == "MatMul":
            if len(shape) != 2:
                reject(f"weight has rank {len(shape)}; only 2-D MatMul weights are prunable")
                continue
        elif node.op_type == "Gemm":
            trans_b = bool(_attr_int(node, "transB", 0))
            axis = 0 if _attr_int(node, "transA", 0) else -1
            if len(shape) != 2:
                reject(f"weight has rank {len(shape)}")
                continue
        else:
            if _attr_int(node, "group", 1) != 1:
                reject("grouped/depthwise conv (no sparse kernel)")
                continue
            if len(shape) < 3:
                reject(f"conv weight has rank {len(shape)}")
                continue
            axis, repeat = 1, int(np.prod(shape[2:]))
        conv = None
        if node.op_type == "Conv":
            conv = {k: list(node.attributes[k].value) for k in ("strides", "pads", "dilations") if k in node.attributes}
            auto = node.attributes.get("auto_pad")
            if auto is not None and auto.value not in ("NOTSET", b"NOTSET"):
                conv["auto_pad"] = str(auto.value)
        layers.append(PrunableLayer(weight.name, name, node.op_type, shape, trans_b, node.inputs[0].name, axis, repeat,
                                    conv))
    return layers, rejected


def _is_constant(graph: ir.Graph, value: ir.Value | None) -> bool:
    if value is None:
        return True
    if _const_initializer(graph, value):
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _reaches_output_as_head(graph: ir.Graph, node: ir.Node) -> bool:
    outputs = {v.name for v in graph.outputs}
    frontier, seen, reached = list(node.outputs), set(), False
    while frontier:
        value = frontier.pop()
        if value.name in seen:
            continue
        seen.add(value.name)
        if value.name in outputs:
            reached = True
        for use in value.uses():
            consumer = use.node
            if consumer.op_type not in HEAD_OPS:
                return False
            if consumer.op_type in ("Add", "Mul"):
                others = [v for i, v in enumerate(consumer.inputs) if i != use.idx]
                if not all(_is_constant(graph, v) for v in others):
                    return False
            frontier.extend(consumer.outputs)
    return reached


def default_skips(model: ir.Model, layers: list[PrunableLayer]) -> dict[str, str]:
    """``{layer name: reason}`` for the first conv and the classifier head(s)."""
    graph = model.graph
    by_node = {layer.node: layer for layer in layers}
    skips: dict[str, str] = {}
    for index, node in enumerate(graph):
        if node.op_type == "Conv":
            layer = by_node.get(_node_name(node, index))
            if layer is not None:
                skips[layer.name] = "first conv (default skip)"
            break
    for index, node in enumerate(graph):
        layer = by_node.get(_node_name(node, index))
        if layer is not None and node.op_type in ("MatMul", "Gemm", "Conv") and _reaches_output_as_head(graph, node):
            skips[layer.name] = "classifier head (default skip)"
    return skips


def prune_weight(layer: PrunableLayer, weight: np.ndarray, step: LayerPlan, method: str | M.PruningMethod,
                 statistics: dict[str, object] | None = None) -> np.ndarray:
    """``weight`` (in its own layout) pruned by ``method`` per ``step``; the input is not modified.

    ``statistics``: ``{activation tensor name: Statistic.result()}`` from calibration, for methods that need it.
    """
    method = M.get(method)
    canon = to_canonical(weight, layer.op, layer.trans_b)
    stat = (statistics or {}).get(layer.activation)
    pruned = method.prune(layer, canon, step.pattern, step.sparsity, stat)
    return from_canonical(np.asarray(pruned, dtype=weight.dtype), weight.shape, layer.op, layer.trans_b)


class PruneWeights(InPlacePass):
    """Prune the weights of the planned layers; ``self.reached`` then maps layer name -> fraction of zeros.

    ``method``: a name or :class:`~edge_sparse.passes.methods.PruningMethod`; ``statistics`` maps an activation
    tensor name to the method's calibration statistic for it (see :func:`edge_sparse.passes.calibrate.collect_statistics`).
    """

    def __init__(self, layers: list[PrunableLayer], plan: dict[str, LayerPlan], method: str | M.PruningMethod = "magnitude",
                 statistics: dict[str, object] | None = None):
        super().__init__()
        self.layers = {layer.name: layer for layer in layers}
        self.plan = plan
        self.method = M.get(method)
        self.statistics = statistics
        self.reached: dict[str, float] = {}

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for name, step in self.plan.items():
            layer = self.layers[name]
            weight = get_weight(model, layer)
            pruned = prune_weight(layer, weight, step, self.method, self.statistics)
            if not np.array_equal(pruned, weight):
                set_weight(model, layer, pruned)
                modified = True
            self.reached[name] = float(np.count_nonzero(pruned == 0) / pruned.size)
        return PassResult(model, modified)


class AssignConstants(InPlacePass):
    """Set constant tensors (initializers or Constant nodes) to new values by name: the weights and biases a
    reconstructing method computed (:func:`edge_sparse.passes.reconstruct.reconstruct`)."""

    def __init__(self, values: dict[str, np.ndarray]):
        super().__init__()
        self.values = values

    def call(self, model: ir.Model) -> PassResult:
        todo = dict(self.values)
        for name in list(todo):
            value = model.graph.initializers.get(name)
            if value is not None and value.const_value is not None:
                value.const_value = ir.tensor(todo.pop(name), name=name)
        for node in model.graph:
            if node.op_type == "Constant" and node.outputs[0].name in todo:
                name = node.outputs[0].name
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(todo.pop(name), name=name))
        if todo:
            raise KeyError(f"no constant named {next(iter(todo))}")
        return PassResult(model, bool(self.values))


class AnnotateSparsity(InPlacePass):
    """Record the sparsity facts in ``model.metadata_props[METADATA_KEY]`` as compact JSON:
    ``{"method", "pattern", "target", "overall", "layers": {name: {"sparsity", "pattern"}}}``;
    ``overall`` is zeros / weights over all prunable layers (skipped ones included)."""

    def __init__(self, layers: list[PrunableLayer], patterns: dict[str, str], method: str, pattern: str,
                 target: float):
        super().__init__()
        self.layers, self.patterns = layers, patterns
        self.method, self.pattern, self.target = method, pattern, target

    def call(self, model: ir.Model) -> PassResult:
        facts, zeros, total = {}, 0, 0
        for layer in self.layers:
            w = get_weight(model, layer)
            z = int(np.count_nonzero(w == 0))
            zeros, total = zeros + z, total + w.size
            if layer.name in self.patterns:
                facts[layer.name] = {"sparsity": round(z / w.size, 6), "pattern": self.patterns[layer.name]}
        record = {"method": self.method, "pattern": self.pattern, "target": self.target,
                  "overall": round(zeros / total, 6) if total else 0.0, "layers": facts}
        model.metadata_props[METADATA_KEY] = json.dumps(record, separators=(",", ":"))
        return PassResult(model, True)
