"""Sequential reconstruction: prune layer by layer in graph order, each against the inputs it sees in the already-pruned
graph, with the dense model's output of that layer as the target, and refit its bias.

Used by :func:`edge_sparse.pruning.prune` for methods with ``sequential = True`` (:mod:`.methods.sparsegpt`). Layers
reading the same tensor (Q, K, V) are one step. For each step, onnxruntime runs the calibration batches twice through
one session whose prunable weights and biases are inputs: once with the dense values (``x_d``), once with the values
pruned so far (``x_p``); the method's statistic accumulates both (no activations are stored: memory is the session
plus one ``K x K`` pair per layer, :data:`~.methods.sparsegpt.MAX_ROWS` rows per batch).

Bias: a Conv's or Gemm's third input, or the constant ``[N]`` operand of the one Add that follows a MatMul; refitted
only when that tensor is used by this layer alone.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sparse.passes import calibrate
from edge_sparse.passes.prune_masks import from_canonical, to_canonical

__all__ = ["find_biases", "reconstruct"]


def find_biases(model: onnx.ModelProto, layers) -> dict[str, str]:
    """``{layer name: bias tensor name}`` for layers whose bias is a constant only they use."""
    consts = {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node
                                                          if n.op_type == "Constant"}
    uses: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
    nodes = {}
    for idx, node in enumerate(model.graph.node):
        nodes[node.name or f"{node.op_type}#{idx}"] = node
    out = {}
    for layer in layers:
        node = nodes.get(layer.node)
        if node is None:
            continue
        cand = None
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
            cand = node.input[2] if beta == 1.0 else None
        elif node.op_type == "MatMul":
            users = uses.get(node.output[0], [])
            if len(users) == 1 and users[0][0].op_type == "Add":
                add, slot = users[0]
                cand = add.input[1 - slot]
        if cand and cand in consts and len(uses.get(cand, [])) == 1:
            out[layer.name] = cand
    return out


def _constant_values(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    names = set(names)
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] in names:
            out[n.output[0]] = numpy_helper.to_array(next(a for a in n.attribute if a.name == "value").t)
    return out


def reconstruct(model: onnx.ModelProto, layers, plan, method, data: dict[str, np.ndarray], batch: int | None = None,
                progress=None) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Prune the ``plan``'s layers of ``model`` (dense) with ``method`` sequentially on calibration ``data``.

    Returns (``{tensor name: new value}`` for the pruned weights and refitted biases, ``{layer: facts}`` with the
    layer's output error relative to the dense output on the calibration rows, before (mask only) and after the
    update)."""
    todo = [layer for layer in layers if layer.name in plan]
    biases = find_biases(model, todo)
    values = _constant_values(model, [layer.name for layer in todo] + list(biases.values()))
    dense_values = {k: v.copy() for k, v in values.items()}
    specs = calibrate.input_specs(model)
    graph_inputs = {s.name for s in specs}
    groups: dict[str, list] = {}
    for layer in todo:
        groups.setdefault(layer.activation, []).append(layer)
    facts = {}
    done = 0
    size = calibrate._batch_size(specs, batch)
    mask_name = calibrate.token_mask_input(specs, data)
    for act, group in groups.items():
        shared: dict[tuple, object] = {}           # Q, K and V see the same rows: one statistic for the three
        stats = {layer.name: shared.setdefault(_rows_key(layer), method.statistic(layer)) for layer in group}
        if act not in graph_inputs:
            # only the nodes this activation depends on; upstream of every pruned layer, x_p is x_d
            probe = _slice(model, act)
            evaluator = calibrate.Evaluator(probe, [n for n in values if n in _constant_names(probe)])
            wanted = {i.name for i in evaluator.session.get_inputs()}
            upstream_pruned = any(n in evaluator.weights and not np.array_equal(values[n], dense_values[n])
                                  for n in values)
        for feeds in calibrate._batches(data, size):
            if act in graph_inputs:
                xd = xp = feeds[act]
            else:
                xd = evaluator.session.run([act], _feeds(wanted, feeds, dense_values))[0]
                xp = evaluator.session.run([act], _feeds(wanted, feeds, values))[0] if upstream_pruned else xd
            tokens = feeds[mask_name] if mask_name else None
            for stat in shared.values():
                stat.update_pair(xp, xd if xp is not xd else None, tokens)
        for layer in group:
            stat = stats[layer.name].result()
            step = plan[layer.name]
            w = values[layer.name]
            canon = to_canonical(w, layer.op, layer.trans_b)
            bias_name = biases.get(layer.name)
            bias = values[bias_name].reshape(-1) if bias_name else None
            if bias is not None and bias.shape[0] != canon.shape[0]:
                bias, bias_name = None, None
            if (layer.conv or {}).get("auto_pad"):
                new_w, new_b = method.prune(layer, canon, step.pattern, step.sparsity, None), None
            else:
                new_w, new_b = method.reconstruct(layer, canon, bias, step.pattern, step.sparsity, stat)
            facts[layer.name] = {"rows": stat["rows"], "bias_refit": new_b is not None,
                                 "output_error": _relative_error(canon, bias, new_w, new_b, stat)}
            values[layer.name] = from_canonical(np.asarray(new_w, dtype=w.dtype), w.shape, layer.op, layer.trans_b)
            if new_b is not None:
                values[bias_name] = new_b.reshape(values[bias_name].shape).astype(values[bias_name].dtype)
            done += 1
            if progress is not None:
                progress.count(done, len(todo), "reconstructed layers")
    return values, facts


def _feeds(wanted: set[str], *parts: dict) -> dict:
    return {k: v for part in parts for k, v in part.items() if k in wanted}


def _constant_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}


def _subgraph_inputs(node: onnx.NodeProto):
    """Names a node's subgraphs (If / Loop / Scan bodies) may read from the enclosing graph (a superset)."""
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                  list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
            for inner in g.node:
                yield from (x for x in inner.input if x)
                yield from _subgraph_inputs(inner)


def _slice(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """``model`` cut down to the nodes and initializers that ``output`` depends on, with ``output`` as its only graph
    output (every graph input stays declared): a layer's input costs only the graph above it."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    todo, seen, keep = [output], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        i = producer.get(name)
        if i is not None and i not in keep:
            keep.add(i)
            todo.extend(x for x in graph.node[i].input if x)
            todo.extend(_subgraph_inputs(graph.node[i]))
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits or v.name in seen]    # an unused initializer-input goes
    cut = helper.make_graph([graph.node[i] for i in sorted(keep)], graph.name, inputs,
                            [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
                            [t for t in graph.initializer if t.name in seen],
                            value_info=[v for v in graph.value_info if v.name in seen])
    out = helper.make_model(cut, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def _rows_key(layer) -> tuple:
    """Layers with equal keys turn the same activation into the same rows (and so share a statistic)."""
    if layer.op != "Conv":
        return ("rows", layer.feature_axis)
    return ("conv", tuple(layer.weight_shape[2:]), repr(sorted((layer.conv or {}).items())))


def _relative_error(w_d, b_d, w, b, stat) -> float:
    """||W_d x_d + b_d - (W x_p + b)|| / ||W_d x_d + b_d|| over the calibration rows, from the second moments."""
    H, Hd = stat["H"], stat["Hd"]
    C = stat["C"] if stat["C"] is not None else H
    wd = np.hstack([w_d, (b_d if b_d is not None else np.zeros(len(w_d))).reshape(-1, 1)]).astype(np.float64)
    bb = b if b is not None else b_d
    wn = np.hstack([w, (bb if bb is not None else np.zeros(len(w))).reshape(-1, 1)]).astype(np.float64)
    ref = float(np.sum((wd @ Hd) * wd))             # sum_i w_i^T M w_i as a matmul (einsum's three-index loop is slow)
    err = ref - 2 * float(np.sum((wd @ C) * wn)) + float(np.sum((wn @ H) * wn))
    return float(np.sqrt(max(err, 0.0) / max(ref, 1e-30)))
