"""Output-channel permutation before block pruning: reorder channels so each block of R rows keeps more saliency.

An ``Rx1`` block mask (:mod:`.prune_masks`) shares one keep/drop decision among R consecutive output channels at
each input feature. Which channels sit in the same block is an accident of training; reordering them (Pool & Yu 2021,
"Channel permutations for N:M sparsity", for the block case) lets channels with similar saliency profiles share
blocks. The dense model's function is unchanged when every reader of those channels is reordered with them:

- FFN: a prunable MatMul/Gemm/Conv whose output reaches only channel-wise ops (bias Add, GELU in any form, Relu,
  Clip, Mul/Div by constants, BatchNormalization) and then the reduction axis of prunable layers (the second
  MatMul's rows, a Conv's input channels). Per-channel constants on the way (biases) are permuted too. Gated FFNs
  (``act(x W_gate) * (x W_up)``) link the two producers: one permutation for both.
- Attention: the walk follows Reshape (``[.., H*D] -> [.., H, D]`` and back) and Transpose. Q and K meet in the
  ``Q K^T`` MatMul, which contracts the head dimension: they are linked and get one permutation, applied within each
  head. V's channels run through ``softmax V`` (not contracted) to the head merge and O's rows: V and O's input are
  permuted together, within each head.

:func:`find_channel_groups` finds the groups on an onnx-ir model (layers from :func:`.prune.find_prunable_layers`;
tensor shapes observed by running the model once, so reshapes with computed shapes are understood);
:func:`choose_permutation` picks a permutation per group by alternating between the block masks of the current order
and an optimal reassignment of channels to block slots under those masks (a linear assignment per segment; the
retained saliency never decreases, and the identity is kept unless it strictly increases);
:class:`PermuteChannels` applies the chosen permutations to the weights and biases.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from edge_sparse.passes.prune import AssignConstants, PrunableLayer, _node_name, _weight_tensor
from edge_sparse.passes.prune_masks import Pattern, mask

__all__ = ["ChannelGroup", "find_channel_groups", "choose_permutation", "retained_saliency", "PermuteChannels",
           "permutable", "observed_shapes", "record", "apply_record", "METADATA_KEY",
           "MAX_ROUNDS"]

MAX_ROUNDS = 8             # alternations of mask choice and reassignment (each strictly improves, or it stops)

# ops that act on each channel alone (one input read per output element)
_UNARY = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Identity", "Cast", "Sqrt", "Exp",
          "Neg", "Abs", "Softplus", "Softsign", "Elu", "Selu", "LeakyRelu", "Celu", "Mish", "Log", "Reciprocal",
          "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Dropout", "ThresholdedRelu"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}


@dataclasses.dataclass
class ChannelGroup:
    """Output channels that can be reordered together without changing the dense model's outputs.

    ``producers``: layers whose output channels (canonical rows) are reordered; ``consumers``: layers whose input
    features (reduction axis) follow; ``edits``: ``{tensor name: axis}`` of every constant that is reordered
    (producer weights and biases, per-channel constants on the way, consumer weights). A permutation acts within
    each run of ``segment`` consecutive channels (a head's dimensions for attention; all ``channels`` otherwise).
    """

    producers: list[str]
    consumers: list[str]
    channels: int
    segment: int
    edits: dict[str, int]

    def to_dict(self) -> dict:
        return {"producers": self.producers, "consumers": self.consumers, "channels": self.channels,
                "segment": self.segment}


@dataclasses.dataclass
class _Walk:
    edits: dict[str, int] = dataclasses.field(default_factory=dict)
    consumers: list[str] = dataclasses.field(default_factory=list)
    reached: dict[tuple, tuple] = dataclasses.field(default_factory=dict)   # (node id, input) -> tag
    needs: list[tuple] = dataclasses.field(default_factory=list)            # (node id, input, tag): a partner walk
    segment: int = 0
    channels: int = 0


class _NotPermutable(Exception):
    pass


def _producer_axis(layer: PrunableLayer) -> int:
    """The weight axis holding the layer's output channels (its canonical rows)."""
    return 0 if layer.op == "Conv" or (layer.op == "Gemm" and layer.trans_b) else 1


def _consumer_axis(layer: PrunableLayer) -> int:
    """The weight axis holding the layer's input features (its canonical columns, before a conv's kernel)."""
    if layer.op == "Conv":
        return 1
    return 1 if layer.op == "Gemm" and layer.trans_b else 0


def _shape(shapes: dict, value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.name in shapes:
        return shapes[value.name]
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(int(d) for d in value.shape)
    return None


def _axes(tag: tuple) -> tuple[int, ...]:
    return (tag[1],) if tag[0] == "flat" else (tag[1], tag[2])


def _shift(tag: tuple, by: int) -> tuple:
    return (tag[0], *(a + by for a in _axes(tag)))


class _Walker:
    """Follows one producer's output channels through the graph (tags: ``("flat", axis)`` or ``("split", head axis,
    dim axis)``, absolute axes of the tensor they describe)."""

    def __init__(self, graph: ir.Graph, layers_by_node: dict[str, PrunableLayer], shapes: dict, names: dict):
        self.graph, self.layers_by_node, self.shapes, self.names = graph, layers_by_node, shapes, names
        self.outputs = {v.name for v in graph.outputs}

    def fail(self, why: str):
        raise _NotPermutable(why)

    def shape(self, value) -> tuple[int, ...]:
        s = _shape(self.shapes, value)
        if s is None:
            self.fail(f"shape of {value.name} unknown")
        return s

    def const(self, value) -> np.ndarray | None:
        t = _weight_tensor(self.graph, value)
        return None if t is None else t.numpy()

    def walk(self, layer: PrunableLayer, node: ir.Node) -> _Walk:
        w = _Walk()
        out = node.outputs[0]
        rank = len(self.shape(out))
        n = self.shape(out)[1 if layer.op == "Conv" else rank - 1]
        self.n = n
        w.segment = w.channels = n
        w.edits[layer.name] = _producer_axis(layer)
        bias = node.inputs[2] if layer.op in ("Conv", "Gemm") and len(node.inputs) > 2 else None
        if bias is not None:
            if self.const(bias) is None:
                self.fail(f"bias {bias.name} is not a constant")
            # a Conv's bias is [Cout]; a Gemm's C broadcasts against the [M, N] output
            self.constant_operand(w, bias, ("flat", 0) if layer.op == "Conv" else ("flat", rank - 1),
                                  bias if layer.op == "Conv" else out, node)
        seen: dict[str, tuple] = {}
        todo = [(out, ("flat", 1 if layer.op == "Conv" else rank - 1))]
        while todo:
            value, tag = todo.pop()
            if value.name in seen:
                if seen[value.name] != tag:
                    self.fail(f"{value.name} is reached with its channels on two different axes")
                continue
            seen[value.name] = tag
            if value.name in self.outputs:
                self.fail(f"its channels reach the graph output {value.name}")
            for use in list(value.uses()):
                todo.extend(self.step(w, use.node, use.idx, value, tag))
        return w

    def constant_operand(self, w: _Walk, other: ir.Value, tag: tuple, out: ir.Value, node: ir.Node):
        """A constant combined elementwise with the channels (tag in ``out``'s frame): broadcast, or reordered."""
        arr = self.const(other)
        ro, rc = len(self.shape(out)), arr.ndim
        for i, a in enumerate(_axes(tag)):
            ac = a - (ro - rc)
            if ac < 0 or arr.shape[ac] == 1:
                continue
            if tag[0] == "split" and i == 0:
                continue                        # one value per head: unchanged by a permutation within heads
            if tag[0] == "flat" and arr.shape[ac] == self.n:
                users = {id(u.node) for u in other.uses()}
                if len(users) > 1:
                    self.fail(f"per-channel constant {other.name} is shared by {len(users)} nodes")
                if w.edits.get(other.name, ac) != ac:
                    self.fail(f"constant {other.name} is reordered on two axes")
                w.edits[other.name] = ac
                continue
            self.fail(f"constant {other.name} of shape {list(arr.shape)} varies along the channels inside a head"
                      if tag[0] == "split" else f"constant {other.name} of shape {list(arr.shape)} does not "
                                                f"broadcast over the {self.n} channels")

    def step(self, w: _Walk, node: ir.Node, idx: int, value: ir.Value, tag: tuple) -> list:
        op = node.op_type
        name = self.names[id(node)]
        if node.domain not in ("", "ai.onnx"):
            self.fail(f"{op} node {name} (domain {node.domain}) reads the channels")
        out = node.outputs[0] if node.outputs else None
        if op in _UNARY or (op == "Clip" and idx == 0):
            if op == "Clip" and not all(x is None or self.const(x) is not None for x in node.inputs[1:]):
                self.fail(f"Clip node {name} has non-constant bounds")
            if any(o.uses() or o.name in self.outputs for o in node.outputs[1:]):
                self.fail(f"{op} node {name} has a second output in use")
            return [(out, tag)]
        if op in _BINARY:
            if op in ("Pow", "PRelu") and idx != 0:
                self.fail(f"{op} node {name} takes the channels as its exponent/slope")
            ro = len(self.shape(out))
            otag = _shift(tag, ro - len(self.shape(value)))
            w.reached[(id(node), idx)] = otag
            other = node.inputs[1 - idx]
            if self.const(other) is not None:
                self.constant_operand(w, other, otag, out, node)
            else:
                oshape = self.shape(other)
                spans = [a - (ro - len(oshape)) for a in _axes(otag)]
                if any(s >= 0 and oshape[s] != 1 for s in spans):
                    w.needs.append((id(node), 1 - idx, otag, name))
            return [(out, otag)]
        if op == "BatchNormalization":
            if idx != 0 or tag != ("flat", 1):
                self.fail(f"BatchNormalization node {name} normalizes another axis")
            for x in node.inputs[1:5]:
                if self.const(x) is None:
                    self.fail(f"BatchNormalization node {name} has non-constant parameters")
                self.constant_operand(w, x, ("flat", 0), x, node)
            return [(out, tag)]
        if op == "Transpose":
            rank = len(self.shape(value))
            perm = list(node.attributes["perm"].value) if "perm" in node.attributes else list(range(rank))[::-1]
            return [(out, (tag[0], *(perm.index(a) for a in _axes(tag))))]
        if op == "Reshape" and idx == 0:
            return [(out, self.reshape(w, tag, self.shape(value), self.shape(out), name))]
        layer = self.layers_by_node.get(name)
        if op == "MatMul":
            ra = len(self.shape(node.inputs[0]))
            rb = len(self.shape(node.inputs[1]))
            ro = len(self.shape(out))
            if idx == 0 and layer is not None and tag == ("flat", ra - 1):
                w.consumers.append(layer.name)
                w.edits[layer.name] = _consumer_axis(layer)
                return []
            if idx == 0 and _axes(tag)[-1] == ra - 1 and rb >= 2:          # contracted against the other operand
                sig = ("contract", self.n, *(ra - a for a in _axes(tag)[:-1]))
                w.reached[(id(node), 0)] = sig
                w.needs.append((id(node), 1, sig, name))
                return []
            if idx == 1 and rb >= 2 and _axes(tag)[-1] == rb - 2:
                w.reached[(id(node), 1)] = ("contract", self.n, *(rb - a for a in _axes(tag)[:-1]))
                return []
            if idx == 1 and rb >= 2 and _axes(tag)[-1] == rb - 1 and all(a < rb - 2 for a in _axes(tag)[:-1]):
                return [(out, (tag[0], *(ro - (rb - a) for a in _axes(tag))))]       # softmax(QK) V: carried through
            self.fail(f"MatMul node {name} mixes the channels with another axis")
        if op == "Gemm" and idx == 0 and layer is not None and tag == ("flat", 1) \
                and not (node.attributes.get("transA") is not None and node.attributes["transA"].value):
            w.consumers.append(layer.name)
            w.edits[layer.name] = _consumer_axis(layer)
            return []
        if op == "Conv" and idx == 0 and layer is not None and tag == ("flat", 1):
            w.consumers.append(layer.name)
            w.edits[layer.name] = _consumer_axis(layer)
            return []
        self.fail(f"{op} node {name} reads the channels" + (" (not a prunable layer)" if op in ("MatMul", "Gemm", "Conv")
                                                             else ""))

    def reshape(self, w: _Walk, tag: tuple, src: tuple, dst: tuple, name: str) -> tuple:
        if tag[0] == "flat" and tag[1] == len(src) - 1:
            if dst[-1] == src[-1] and int(np.prod(dst)) == int(np.prod(src)):
                return ("flat", len(dst) - 1)                                   # leading axes regrouped
            if len(dst) >= 2 and dst[-2] * dst[-1] == src[-1] and tuple(dst[:-2]) == tuple(src[:-1]):
                if w.segment % dst[-1]:
                    self.fail(f"Reshape node {name} splits the channels into heads of {dst[-1]} that do not divide "
                              f"earlier segments of {w.segment}")
                w.segment = dst[-1]
                return ("split", len(dst) - 2, len(dst) - 1)
        if tag[0] == "split" and tag[2] == len(src) - 1 and tag[1] == len(src) - 2:
            if tuple(dst[:-1]) == tuple(src[:-2]) and dst[-1] == src[-2] * src[-1]:
                return ("flat", len(dst) - 1)
        self.fail(f"Reshape node {name} moves the channels ({list(src)} -> {list(dst)})")


def find_channel_groups(model: ir.Model, layers: list[PrunableLayer], shapes: dict[str, tuple[int, ...]]
                        ) -> tuple[list[ChannelGroup], dict[str, str]]:
    """(groups, ``{layer: reason}`` for layers whose output channels cannot be reordered).

    ``shapes``: the observed shape of every intermediate tensor (:func:`observed_shapes`)."""
    graph = model.graph
    names = {id(node): _node_name(node, i) for i, node in enumerate(graph)}
    by_node = {layer.node: layer for layer in layers}
    nodes = {names[id(node)]: node for node in graph}
    walker = _Walker(graph, by_node, shapes, names)
    walks: dict[str, _Walk] = {}
    rejected: dict[str, str] = {}
    for layer in layers:
        node = nodes.get(layer.node)
        try:
            walks[layer.name] = walker.walk(layer, node)
        except _NotPermutable as e:
            rejected[layer.name] = str(e)
    parent = {name: name for name in walks}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    reached = {}
    for name, w in walks.items():
        for key, tag in w.reached.items():
            reached.setdefault(key, []).append((name, tag))
    for name, w in walks.items():
        for node_id, slot, tag, node_name in w.needs:
            partners = [p for p, t in reached.get((node_id, slot), []) if t == tag
                        and walks[p].channels == w.channels]
            if not partners:
                rejected[name] = f"node {node_name} combines its channels with a tensor that is not reordered with them"
                continue
            for p in partners:
                parent[root(p)] = root(name)
    members: dict[str, list[str]] = {}
    for name in walks:
        members.setdefault(root(name), []).append(name)
    groups, owners = [], {}
    for names_ in members.values():
        bad = next((rejected[n] for n in names_ if n in rejected), None)
        if bad is not None:
            for n in names_:
                rejected.setdefault(n, f"linked to a layer that cannot be reordered ({bad})")
            continue
        edits: dict[str, int] = {}
        consumers: list[str] = []
        segment = min(walks[n].segment for n in names_)
        ok = True
        for n in names_:
            consumers += [c for c in walks[n].consumers if c not in consumers]
            for t, axis in walks[n].edits.items():
                if edits.get(t, axis) != axis:
                    ok = False
                edits[t] = axis
            if walks[n].segment % segment:
                ok = False
        if not ok:
            for n in names_:
                rejected[n] = "its group reorders one tensor on two axes"
            continue
        groups.append(ChannelGroup(names_, consumers, walks[names_[0]].channels, segment, edits))
    for g in groups:                       # a tensor reordered by two groups on one axis cannot take both orders
        for t, axis in g.edits.items():
            owners.setdefault((t, axis), []).append(g)
    clash = {id(g) for gs in owners.values() if len(gs) > 1 for g in gs}
    for g in groups:
        if id(g) in clash:
            for n in g.producers:
                rejected[n] = "a tensor it reorders is also reordered by another group"
    return [g for g in groups if id(g) not in clash], rejected


def observed_shapes(model, data: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """``{tensor: shape}`` of every tensor the top-level graph of ``model`` (an ``onnx.ModelProto``) computes, from
    one onnxruntime run on the first sample of ``data`` (computed reshape targets become concrete)."""
    import onnx

    from edge_sparse.passes import calibrate

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in present)
    specs = calibrate.input_specs(model)
    unit = max([s.dims[0] for s in specs if s.dims and s.dims[0]] or [1])
    outs = calibrate.run_model(probe, {k: v[:unit] for k, v in data.items()}, batch=unit)
    shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in outs.items()}
    shapes.update({k: tuple(int(d) for d in np.shape(v[:unit])) for k, v in data.items()})
    return shapes


def permutable(pattern: Pattern) -> bool:
    """Patterns whose mask depends on the order of the output channels (and not on the order of the inputs)."""
    return pattern.kind == "block" and pattern.rows > 1 and pattern.cols == 1


def _column_order_free(pattern: Pattern) -> bool:
    return pattern.kind == "unstructured" or (pattern.kind == "block" and pattern.cols == 1)


def retained_saliency(scores: list[np.ndarray], patterns: list[Pattern], sparsities: list[float], per_row: bool,
                      perm: np.ndarray) -> float:
    """Fraction of the total saliency that the block masks keep with the rows of every score matrix in ``perm``
    order."""
    kept = total = 0.0
    for s, p, sp in zip(scores, patterns, sparsities):
        sp_ = s[perm]
        kept += float((sp_ * mask(sp_, p, sp, per_row)).sum())
        total += float(s.sum())
    return kept / total if total > 0 else 0.0


def _alternate(scores, patterns, sparsities, per_row, segment, order, rounds):
    from scipy.optimize import linear_sum_assignment

    n = len(order)
    best = retained_saliency(scores, patterns, sparsities, per_row, order)
    for _ in range(rounds):
        gain = np.zeros((n, n))                          # gain[channel, slot]: saliency kept if channel sits in slot
        for s, p, sp in zip(scores, patterns, sparsities):
            gain += s @ mask(s[order], p, sp, per_row).T.astype(s.dtype)
        new = np.empty(n, dtype=np.int64)
        for lo in range(0, n, segment):
            seg = slice(lo, min(n, lo + segment))
            rows, cols = linear_sum_assignment(gain[seg, seg], maximize=True)
            new[lo + cols] = lo + rows
        value = retained_saliency(scores, patterns, sparsities, per_row, new)
        if value <= best * (1 + 1e-9):
            break
        order, best = new, value
    return order, best


def _spectral_order(scores, segment: int) -> np.ndarray:
    """Channels sorted within each segment by their position along the main direction of their (normalized)
    saliency profiles: channels whose saliency falls on the same inputs end up next to each other."""
    profile = np.hstack([s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-30) for s in scores])
    n = profile.shape[0]
    order = np.empty(n, dtype=np.int64)
    for lo in range(0, n, segment):
        seg = profile[lo:lo + segment]
        centred = seg - seg.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        order[lo:lo + len(seg)] = lo + np.argsort(centred @ vt[0], kind="stable")
    return order


def choose_permutation(scores: list[np.ndarray], patterns: list[Pattern], sparsities: list[float], per_row: bool,
                       segment: int, rounds: int = MAX_ROUNDS) -> tuple[np.ndarray, float, float]:
    """(permutation, retained saliency of the identity, retained with the permutation) for rows that share one
    order: ``scores`` are the ``[channels, K]`` saliencies of each layer whose rows are reordered.

    From two starts (the identity and a spectral order, :func:`_spectral_order`), alternates: block masks for the
    current order, then the order that keeps the most saliency under those masks (an assignment of channels to row
    slots, solved exactly per segment with scipy's ``linear_sum_assignment``); stops when the retained saliency stops
    rising. The identity is returned unless the best order keeps strictly more."""
    n = scores[0].shape[0]
    identity = np.arange(n)
    start = retained_saliency(scores, patterns, sparsities, per_row, identity)
    best_order, best = identity, start
    for init in (identity, _spectral_order(scores, segment)):
        order, value = _alternate(scores, patterns, sparsities, per_row, segment, init, rounds)
        if value > best * (1 + 1e-9):
            best_order, best = order, value
    return best_order, start, best


class PermuteChannels(InPlacePass):
    """Reorder the channels of each group: ``perms`` pairs a :class:`ChannelGroup` with its permutation (new
    position i holds old channel ``perm[i]``). The dense model computes the same outputs afterwards."""

    def __init__(self, perms: list[tuple[ChannelGroup, np.ndarray]]):
        super().__init__()
        self.perms = perms

    def call(self, model: ir.Model) -> PassResult:
        values: dict[str, np.ndarray] = {}
        graph = model.graph
        consts = {v.name: v for v in graph.initializers.values()}
        for node in graph:
            if node.op_type == "Constant" and node.outputs:
                consts.setdefault(node.outputs[0].name, node.outputs[0])
        for group, perm in self.perms:
            for name, axis in group.edits.items():
                arr = values[name] if name in values else _weight_tensor(graph, consts[name]).numpy()
                values[name] = np.take(arr, perm, axis=axis)
        if not values:
            return PassResult(model, False)
        return AssignConstants(values).call(model)


METADATA_KEY = "edge_sparse.permutation"


def record(perms: list[tuple[ChannelGroup, np.ndarray]], previous: str | None = None) -> str:
    """The applied permutations as compact JSON for ``metadata_props[METADATA_KEY]``: ``[{"edits": {tensor: axis},
    "perm": [...]}]``, so that a tool comparing the pruned model's intermediate tensors with the dense model's (e.g.
    distillation matching layer outputs) can reorder the dense model the same way (:func:`apply_record`)."""
    import json

    return json.dumps([{"edits": g.edits, "perm": [int(i) for i in p]} for g, p in perms], separators=(",", ":"))


def apply_record(model: ir.Model, text: str) -> ir.Model:
    """Reorder ``model``'s constants as recorded by :func:`record` (the dense model the record's model came from)."""
    import json

    perms = [(ChannelGroup([], [], len(r["perm"]), len(r["perm"]), {k: int(v) for k, v in r["edits"].items()}),
              np.asarray(r["perm"], dtype=np.int64)) for r in json.loads(text)]
    return PermuteChannels(perms)(model).model


def align(teacher, student):
    """``teacher`` (an ``onnx.ModelProto``, the dense model ``student`` was pruned from) with ``student``'s recorded
    channel permutations applied, so that intermediate tensors of the two line up; unchanged when ``student`` records
    none beyond the teacher's own. Raises ValueError when the records disagree."""
    import json

    meta = {m.key: m.value for m in student.metadata_props}
    mine = json.loads(meta.get(METADATA_KEY) or "[]")
    theirs = json.loads({m.key: m.value for m in teacher.metadata_props}.get(METADATA_KEY) or "[]")
    if mine[:len(theirs)] != theirs:
        raise ValueError("the teacher's channel order is not an earlier state of the student's")
    if len(mine) == len(theirs):
        return teacher
    model = ir.serde.deserialize_model(teacher)
    apply_record(model, json.dumps(mine[len(theirs):]))
    model.metadata_props[METADATA_KEY] = json.dumps(mine, separators=(",", ":"))
    return ir.serde.serialize_model(model)
