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
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    specs = calibrate.input_specs(model)
    graph_inputs = {s.name for s in specs}
    for act in dict.fromkeys(layer.activation for layer in todo):
        if act not in present and act not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    evaluator = calibrate.Evaluator(probe, list(values))
    groups: dict[str, list] = {}
    for layer in todo:
        groups.setdefault(layer.activation, []).append(layer)
    facts = {}
    done = 0
    size = calibrate._batch_size(specs, batch)
    for act, group in groups.items():
        stats = {layer.name: method.statistic(layer) for layer in group}
        for feeds in calibrate._batches(data, size):
            if act in graph_inputs:
                xd = xp = feeds[act]
            else:
                xd = evaluator.session.run([act], {**feeds, **dense_values})[0]
                xp = evaluator.session.run([act], {**feeds, **values})[0]
            for stat in stats.values():
                stat.update_pair(xp, xd if xp is not xd else None)
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


def _relative_error(w_d, b_d, w, b, stat) -> float:
    """||W_d x_d + b_d - (W x_p + b)|| / ||W_d x_d + b_d|| over the calibration rows, from the second moments."""
    H, Hd = stat["H"], stat["Hd"]
    C = stat["C"] if stat["C"] is not None else H
    wd = np.hstack([w_d, (b_d if b_d is not None else np.zeros(len(w_d))).reshape(-1, 1)]).astype(np.float64)
    bb = b if b is not None else b_d
    wn = np.hstack([w, (bb if bb is not None else np.zeros(len(w))).reshape(-1, 1)]).astype(np.float64)
    ref = np.einsum("ij,jk,ik->", wd, Hd, wd)
    err = ref - 2 * np.einsum("ij,jk,ik->", wd, C, wn) + np.einsum("ij,jk,ik->", wn, H, wn)
    return float(np.sqrt(max(err, 0.0) / max(ref, 1e-30)))
