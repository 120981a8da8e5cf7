"""An ONNX graph as a trainable PyTorch module (for label-free distillation; needs the ``recover`` extra: torch).

:class:`OnnxModule` runs the graph's nodes in order with torch operators; chosen float constants (the weights and
biases of MatMul / Gemm / Conv, LayerNormalization and BatchNormalization scales and shifts, constant operands of
Add / Mul) are ``nn.Parameter``s, everything else is a buffer. Weights that hold exact zeros (pruned) carry a
mask that :meth:`OnnxModule.apply_masks` re-applies, so training never brings a pruned weight back.

Why not ``onnx2torch``: its last release (1.5.15, 2024) imports ``torchvision`` at import time (NMS and RoIAlign
converters), which drags a second large wheel and a torch version of its choosing into the optional extra; the zoo
needs 35 plain operators, which are below. A graph whose batch dimension is fixed at 1 (MiniLM's export) is run
per sample under ``torch.vmap``, so it still trains on batches.

Unsupported operators fail with one line naming the operator, the node and what is supported.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_sparse.errors import UserError

__all__ = ["OnnxModule", "require_torch", "SUPPORTED_OPS", "trainable_constants", "masked_constants"]

# where a float constant input is a learnable weight: op -> input slots
_TRAIN_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "LayerNormalization": (1, 2),
                "BatchNormalization": (1, 2), "Add": (0, 1), "Mul": (0, 1), "Sub": (0, 1)}
# pruned weights live here: a zero is a decision of the pruner and stays zero
_MASK_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,)}


def require_torch():
    try:
        import torch
    except ImportError:
        raise UserError("recover needs PyTorch: pip install 'edge-sparse[recover]'") from None
    return torch


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                out[node.output[0]] = numpy_helper.to_array(attr["value"].t)
            elif "value_float" in attr:
                out[node.output[0]] = np.array(attr["value_float"].f, np.float32)
            elif "value_floats" in attr:
                out[node.output[0]] = np.array(list(attr["value_floats"].floats), np.float32)
            elif "value_int" in attr:
                out[node.output[0]] = np.array(attr["value_int"].i, np.int64)
            elif "value_ints" in attr:
                out[node.output[0]] = np.array(list(attr["value_ints"].ints), np.int64)
            else:
                raise UserError(f"Constant node {node.name or node.output[0]} has no supported value attribute")
    return out


def _uses(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, slot))
    return uses


def trainable_constants(model: onnx.ModelProto) -> list[str]:
    """Float constants every use of which is a weight/bias slot (see the module docstring), graph order."""
    consts, uses = _constants(model), _uses(model)
    names = []
    for name, arr in consts.items():
        u = uses.get(name, [])
        if arr.dtype.kind != "f" or arr.size < 2 or not u:
            continue
        if all(slot in _TRAIN_SLOTS.get(node.op_type, ()) for node, slot in u):
            names.append(name)
    return names


def masked_constants(model: onnx.ModelProto) -> list[str]:
    """Trainable constants that are MatMul/Gemm/Conv weights holding exact zeros (their zeros stay zero)."""
    consts, uses = _constants(model), _uses(model)
    out = []
    for name in trainable_constants(model):
        if any(slot in _MASK_SLOTS.get(node.op_type, ()) for node, slot in uses[name]) and not np.all(consts[name]):
            out.append(name)
    return out


_DTYPES = None


def _torch_dtype(onnx_type: int):
    import torch

    global _DTYPES
    if _DTYPES is None:
        _DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
                   onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
                   onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
                   onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.INT8: torch.int8}
    if onnx_type not in _DTYPES:
        raise UserError(f"Cast to ONNX type {onnx.TensorProto.DataType.Name(onnx_type)} is not supported")
    return _DTYPES[onnx_type]


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(x, pads, value=0.0):
    """ONNX pads [b1, b2, ..., e1, e2, ...] over the trailing spatial dims -> F.pad."""
    import torch.nn.functional as F

    n = len(pads) // 2
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads, value=value) if any(torch_pads) else x


def _axes(node, a, inputs, opset, slot=1, attr_opset=13):
    if opset >= attr_opset:
        return _ints(inputs[slot]) if len(inputs) > slot and inputs[slot] is not None else None
    return list(a["axes"]) if "axes" in a else None


def _op(node: onnx.NodeProto, inputs: list, opset: int, fix=None):
    """Outputs (a list) of one node; ``inputs`` are tensors (None for an empty name). ``fix`` maps the constant
    target shapes of Reshape / Expand / ConstantOfShape when the graph runs on other dimensions than it was exported
    for (a whole batch through a batch-1 graph, a trimmed sequence)."""
    fix = fix or (lambda shape: shape)
    import torch
    import torch.nn.functional as F

    t, a, x = node.op_type, _attrs(node), inputs[0] if inputs else None
    if t in ("Add", "Sub", "Mul", "Pow"):
        return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow}[t](x, inputs[1])]
    if t == "Div":
        if not x.is_floating_point() and not inputs[1].is_floating_point():
            return [torch.div(x, inputs[1], rounding_mode="trunc")]
        return [x / inputs[1]]
    unary = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Erf": torch.erf, "Sqrt": torch.sqrt, "Exp": torch.exp,
             "Tanh": torch.tanh, "Neg": torch.neg, "Abs": torch.abs, "Log": torch.log, "Identity": lambda v: v,
             "Reciprocal": torch.reciprocal}
    if t in unary:
        return [unary[t](x)]
    if t == "MatMul":
        return [torch.matmul(x, inputs[1])]
    if t == "Gemm":
        A, B = x, inputs[1]
        A = A.transpose(0, 1) if a.get("transA", 0) else A
        B = B.transpose(0, 1) if a.get("transB", 0) else B
        y = a.get("alpha", 1.0) * (A @ B)
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + a.get("beta", 1.0) * inputs[2]
        return [y]
    if t == "Conv":
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UserError(f"Conv {node.name}: auto_pad {a['auto_pad']} is not supported (export with explicit pads)")
        w = inputs[1]
        nd = w.dim() - 2
        pads = list(a.get("pads", [0] * 2 * nd))
        sym = pads[:nd] == pads[nd:]
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
        xin = x if sym else _pads(x, pads)
        b = inputs[2] if len(inputs) > 2 else None
        return [conv(xin, w, b, stride=list(a.get("strides", [1] * nd)), padding=pads[:nd] if sym else 0,
                     dilation=list(a.get("dilations", [1] * nd)), groups=a.get("group", 1))]
    if t == "BatchNormalization":
        return [F.batch_norm(x, inputs[3], inputs[4], inputs[1], inputs[2], training=False,
                             eps=a.get("epsilon", 1e-5))]
    if t == "LayerNormalization":
        axis = a.get("axis", -1) % x.dim()
        return [F.layer_norm(x, x.shape[axis:], inputs[1], inputs[2] if len(inputs) > 2 else None,
                             a.get("epsilon", 1e-5))]
    if t in ("Softmax", "LogSoftmax"):
        fn = torch.softmax if t == "Softmax" else torch.log_softmax
        axis = a.get("axis", -1 if opset >= 13 else 1) % x.dim()
        if opset >= 13 or axis == x.dim() - 1:
            return [fn(x, dim=axis)]
        shape = x.shape
        return [fn(x.reshape(int(np.prod(shape[:axis])), -1), dim=1).reshape(shape)]
    if t == "HardSigmoid":
        return [torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)]
    if t == "HardSwish":
        return [F.hardswish(x)]
    if t == "Clip":
        lo, hi = (a.get("min"), a.get("max")) if opset < 11 else (
            inputs[1] if len(inputs) > 1 else None, inputs[2] if len(inputs) > 2 else None)
        return [torch.clamp(x, min=lo, max=hi)]
    if t == "Cast":
        return [x.to(_torch_dtype(a["to"]))]
    if t == "Reshape":
        shape = fix(_ints(inputs[1]))
        shape = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if t == "Flatten":
        axis = a.get("axis", 1) % max(x.dim(), 1)
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if t == "Transpose":
        return [x.permute(list(a["perm"]) if "perm" in a else list(reversed(range(x.dim()))))]
    if t in ("Unsqueeze", "Squeeze"):
        axes = _axes(node, a, inputs, opset)
        if t == "Squeeze":
            if axes is None:
                return [x.squeeze()]
            for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
                x = x.squeeze(ax)
            return [x]
        rank = x.dim() + len(axes)
        for ax in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(ax)
        return [x]
    if t == "Concat":
        return [torch.cat([v for v in inputs if v is not None], dim=a["axis"])]
    if t == "Gather":
        axis = a.get("axis", 0) % x.dim()
        idx = inputs[1].long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        out = x.index_select(axis, idx.reshape(-1))
        return [out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]
    if t == "Shape":
        dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
        return [torch.tensor(dims, dtype=torch.int64, device=x.device)]
    if t == "Slice":
        if opset < 10:
            starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
        else:
            starts, ends = _ints(inputs[1]), _ints(inputs[2])
            axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
            steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = steps or [1] * len(starts)
        index = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st != 1:
                raise UserError(f"Slice {node.name}: steps other than 1 are not supported")
            n = x.shape[ax]
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[ax % x.dim()] = slice(s, e)
        return [x[tuple(index)]]
    if t in ("ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax"):
        axes = _axes(node, a, inputs, opset, attr_opset=13 if t == "ReduceSum" else 18)
        keep = bool(a.get("keepdims", 1))
        dims = list(range(x.dim())) if not axes else [ax % x.dim() for ax in axes]
        if t == "ReduceMean":
            return [x.mean(dim=dims, keepdim=keep)]
        if t == "ReduceSum":
            return [x.sum(dim=dims, keepdim=keep)]
        if t == "ReduceMax":
            return [x.amax(dim=dims, keepdim=keep)]
        return [torch.sqrt((x * x).sum(dim=dims, keepdim=keep))]
    if t == "GlobalAveragePool":
        return [x.mean(dim=list(range(2, x.dim())), keepdim=True)]
    if t in ("AveragePool", "MaxPool"):
        nd = x.dim() - 2
        k = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * nd))
        strides = list(a.get("strides", [1] * nd))
        ceil = bool(a.get("ceil_mode", 0))
        if t == "MaxPool":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            if pads[:nd] != pads[nd:]:
                return [fn(_pads(x, pads, -math.inf), k, strides, 0, ceil_mode=ceil)]
            return [fn(x, k, strides, pads[:nd], ceil_mode=ceil)]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        include = bool(a.get("count_include_pad", 0))
        if pads[:nd] != pads[nd:]:
            return [fn(_pads(x, pads), k, strides, 0, ceil_mode=ceil, count_include_pad=True)]
        return [fn(x, k, strides, pads[:nd], ceil_mode=ceil, count_include_pad=include)]
    if t == "Gelu":
        return [F.gelu(x, approximate="tanh" if a.get("approximate", b"none") in (b"tanh", "tanh") else "none")]
    if t == "Where":
        return [torch.where(x.bool(), inputs[1], inputs[2])]
    if t in ("Equal", "Less", "Greater"):
        return [{"Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt}[t](x, inputs[1])]
    if t == "Expand":
        return [x * torch.ones(fix(_ints(inputs[1])), dtype=x.dtype, device=x.device)]
    if t == "ConstantOfShape":
        value = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return [torch.full(fix(_ints(x)), value.reshape(-1)[0].item(), dtype=torch.from_numpy(value).dtype,
                           device=x.device)]
    raise UserError(f"operator {t} (node {node.name or node.output[0]}) is not supported by the ONNX->PyTorch "
                    f"converter; supported: {', '.join(SUPPORTED_OPS)}")


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater")
SUPPORTED_OPS = ("Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
                 "ConstantOfShape", "Conv", "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gelu",
                 "Gemm", "GlobalAveragePool", "Greater", "HardSigmoid", "HardSwish", "Identity", "LayerNormalization",
                 "Less", "Log", "LogSoftmax", "MatMul", "MaxPool", "Mul", "Neg", "Pow", "Reciprocal", "ReduceL2",
                 "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax",
                 "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where")


def _check_ops(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            raise UserError(f"operator {node.domain + '.' if node.domain else ''}{node.op_type} (node "
                            f"{node.name or node.output[0]}) is not supported by the ONNX->PyTorch converter; "
                            f"supported: {', '.join(SUPPORTED_OPS)}")


def _module_class():
    import torch
    from torch import nn

    class OnnxModule(nn.Module):
        """``forward(**inputs) -> {name: tensor}`` for the graph outputs plus the ``capture`` tensors."""

        def __init__(self, model: onnx.ModelProto, trainable=(), capture=()):
            super().__init__()
            _check_ops(model)
            self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
            self.nodes = [n for n in model.graph.node if n.op_type != "Constant"]
            inits = {i.name for i in model.graph.initializer}
            self.input_names = [i.name for i in model.graph.input if i.name not in inits]
            self.output_names = [o.name for o in model.graph.output]
            self.capture = [c for c in capture if c not in self.output_names]
            self.params = nn.ParameterDict()
            self.key = {}                               # constant name -> parameter/buffer key
            self.masks: dict[str, torch.Tensor] = {}
            trainable = set(trainable)
            for i, (name, arr) in enumerate(_constants(model).items()):
                key = f"c{i}"
                self.key[name] = key
                tensor = torch.from_numpy(np.array(arr, copy=True))
                if name in trainable:
                    self.params[key] = nn.Parameter(tensor.float() if arr.dtype == np.float64 else tensor)
                else:
                    self.register_buffer(key, tensor, persistent=False)
            # the graph's batch dimension: fixed at 1 -> per-sample under vmap
            dims = []
            for vi in model.graph.input:
                if vi.name in self.input_names:
                    d = vi.type.tensor_type.shape.dim
                    dims.append(d[0].dim_value if d and d[0].HasField("dim_value") else 0)
            self.per_sample = bool(dims) and all(d == 1 for d in dims)
            # fast path (set by the caller once it checked the outputs against the exact path, see
            # :meth:`set_fast`): a batch-1 graph runs a whole batch at once, and a sequence dimension exported as
            # ``seq_len`` may run trimmed; constant target shapes are mapped accordingly
            self.fast = False
            self.seq_len: int | None = None
            self.seq_inputs: tuple[str, ...] = ()

        def set_fast(self, fast: bool, seq_len: int | None = None, seq_inputs=()):
            """``fast``: run batches through the graph at once (no vmap); ``seq_len``: the exported length of axis 1
            of ``seq_inputs``, which the caller may trim (constant shapes holding it follow the trimmed length)."""
            self.fast, self.seq_len, self.seq_inputs = fast, seq_len, tuple(seq_inputs)

        def constant(self, name):
            key = self.key[name]
            return self.params[key] if key in self.params else getattr(self, key)

        def set_masks(self, names):
            for name in names:
                p = self.constant(name)
                self.masks[name] = (p.detach() != 0).to(p.dtype)

        @torch.no_grad()
        def apply_masks(self):
            for name, m in self.masks.items():
                p = self.constant(name)
                p.mul_(m.to(p.device))

        def _shape_maps(self, feeds: dict):
            """(fix, trim) for the fast path, (None, None) otherwise. ``fix`` maps constant target shapes (Reshape /
            Expand / ConstantOfShape): a leading 1 becomes the batch of a batch-1 graph, the exported sequence length
            the trimmed one. ``trim`` cuts a constant operand of an elementwise op that spans the exported length (a
            folded position embedding) to the trimmed length where the other operand has it."""
            if not self.fast:
                return None, None
            batch = next(iter(feeds.values())).shape[0] if self.per_sample else None
            seq = self.seq_len
            now = feeds[self.seq_inputs[0]].shape[1] if seq is not None and self.seq_inputs else seq
            trimmed = seq is not None and now != seq

            def fix(shape):
                out = list(shape)
                if batch is not None and out and out[0] == 1:
                    out[0] = batch
                if trimmed:
                    out = [now if i > 0 and d == seq else d for i, d in enumerate(out)]
                return out

            def trim(ins, const):
                live = [v for v, c in zip(ins, const) if v is not None and not c]
                if not live or not any(const):
                    return ins
                ref = max(live, key=lambda v: v.dim())
                out = []
                for v, c in zip(ins, const):
                    if c and v is not None:
                        for ax in range(1, min(v.dim(), ref.dim()) + 1):
                            if v.shape[-ax] == seq and ref.shape[-ax] == now:
                                v = v.narrow(v.dim() - ax, 0, now)
                    out.append(v)
                return out

            return fix, (trim if trimmed else None)

        def _run(self, feeds: dict):
            env = dict(feeds)
            fix, trim = self._shape_maps(feeds)
            for node in self.nodes:
                ins = [None if not n else (env[n] if n in env else self.constant(n)) for n in node.input]
                if trim is not None and node.op_type in _ELEMENTWISE:
                    ins = trim(ins, [bool(n) and n not in env for n in node.input])
                outs = _op(node, ins, self.opset, fix)
                for name, v in zip(node.output, outs):
                    env[name] = v
            return {n: env[n] for n in (*self.output_names, *self.capture)}

        def forward(self, **inputs):
            if not self.per_sample or self.fast:
                return self._run(inputs)
            names = list(inputs)

            def one(*xs):
                return self._run({n: x.unsqueeze(0) for n, x in zip(names, xs)})

            out = torch.vmap(one, randomness="error")(*(inputs[n] for n in names))
            return {k: v.squeeze(1) if v.dim() > 1 and v.shape[1] == 1 else v for k, v in out.items()}

        def named_constants(self, names):
            return {n: self.constant(n).detach().cpu().numpy() for n in names}

    return OnnxModule


def OnnxModule(model: onnx.ModelProto, trainable=(), capture=()):  # noqa: N802 (a class built on first use)
    """Build the torch module for ``model`` (``trainable``: constant names that become parameters)."""
    require_torch()
    return _module_class()(model, trainable, capture)
