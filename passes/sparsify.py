"""Sparsify pass: route pruned constant weights of matmul / Gemm / 1x1 conv to sparse kernels, per layer.

Runs on the Relax module of ``from_onnx(..., keep_params_in_input=False)`` (weights are inline constants).
For each layer ``act(x @ W + b)`` -- ``R.matmul(x, C)`` or ``R.matmul(x, R.permute_dims(C))`` (Gemm transB), or
``R.nn.conv2d`` with a 1x1 stride-1 kernel, optionally followed by a constant bias add and a ReLU or GELU (ONNX
``Gelu`` or the Erf pattern of BERT exports) -- it measures the weight's sparsity in every format, estimates the
time of dense and of each format (bytes and flops, calibrated per target family; ``measure=True`` times the
candidates instead), and replaces the chosen layers by one ``call_tir`` to the family's kernel
(``family.make_sparse_kernel(KernelSpec, preset)``). The fused bias and activation go into the kernel's epilogue;
the bindings they replace become dead and are removed. Everything family-specific (calibration, peak flops, kernels
and their names, timing) comes from the preset's :class:`~edge_sparse.targets.family.TargetFamily`.

:class:`Sparsify` is a Relax module pass (``Sparsify(preset, mode=..., measure=..., weight_names=...)(mod)``); after
it ran, its ``layers`` attribute holds the per-layer report (one dict per candidate layer, dense ones included) that
goes into manifest.json. :func:`sparsify` runs it and returns ``(mod, layers)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from edge_sparse.util import nchw_as_rows, rewrite_functions, rows_as_nchw
import tvm

from edge_sparse import formats as F
from edge_sparse.formats import KernelSpec

__all__ = ["Sparsify", "sparsify", "time_dense", "find_layers", "estimate_us", "layer_estimate_us", "layer_time_us", "dense_layer_module", "Layer"]


# A sparse layer must be estimated this much faster than dense to be chosen in auto mode (model error margin).
_MARGIN = 1.15

_CALL_OVERHEAD_US = 1.0


@dataclasses.dataclass
class Layer:
    """One candidate layer found in the Relax function."""

    index: int
    op: str                      # "matmul" | "conv1x1"
    source_op: str               # "MatMul" | "Gemm" | "Conv"
    root: Any                    # the Relax Call whose binding the sparse call replaces (end of the fused chain)
    x: Any                       # the input Var
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: np.ndarray           # [K, N] float32
    weight_shape: tuple[int, ...]  # as stored in the model
    weight_sha1: str
    bias: np.ndarray | None      # [N]
    activation: str | None
    M: int
    K: int
    N: int                       # output channels
    spatial: int = 1             # conv1x1: H*W


# ------------------------------------------------------------------------------------------------ analysis
def _ops():
    import tvm

    get = tvm.ir.Op.get
    return {k: get(f"relax.{k}") for k in
            ("matmul", "add", "permute_dims", "reshape", "nn.conv2d", "nn.relu", "nn.gelu", "divide", "multiply",
             "erf")}


def _is_const(e) -> bool:
    import tvm

    return isinstance(e, tvm.ir.Constant)


def _const_np(e) -> np.ndarray:
    v = e.value if hasattr(e, "value") else e.data
    return v.numpy()


def _shape(e) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in e.ty.shape)
    except Exception:  # dynamic or non-tensor
        return None


def _scalar(e) -> float | None:
    if _is_const(e):
        a = _const_np(e)
        if a.size == 1:
            return float(a.reshape(()))
    return None


class _Graph:
    """Bindings of a Relax function: var -> value, and how many bindings (or the result) use each var."""

    def __init__(self, func):
        from tvm import relax

        self.value: dict[Any, Any] = {}
        self.uses: dict[Any, int] = {}
        self.order: list[Any] = []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value
                    self.order.append(b.var)
                    for v in relax.analysis.free_vars(b.value):
                        self.uses[v] = self.uses.get(v, 0) + 1
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] = self.uses.get(v, 0) + 1
        self.users: dict[Any, list[Any]] = {}
        for var in self.order:
            for v in relax.analysis.free_vars(self.value[var]):
                self.users.setdefault(v, []).append(var)

    def call(self, var, op) -> Any:
        """The value bound to ``var`` when it is a call of ``op``."""
        from tvm import relax

        if not isinstance(var, relax.Var):
            return None
        val = self.value.get(var)
        if val is not None and isinstance(val, relax.Call) and val.op.same_as(op):
            return val
        return None

    def only_user(self, var) -> Any:
        """The single binding var that uses ``var`` (None when used more than once, or by the function result)."""
        us = self.users.get(var, [])
        if self.uses.get(var, 0) == 1 and len(us) == 1:
            return us[0]
        return None


def _const_weight(g: _Graph, e, ops):
    """(W as stored, W as [K, N]) for a matmul's second operand, or None."""
    if _is_const(e):
        w = _const_np(e)
        return (w, w) if w.ndim == 2 else None
    pd = g.call(e, ops["permute_dims"])
    if pd is not None and _is_const(pd.args[0]):
        w = _const_np(pd.args[0])
        axes = pd.attrs.axes
        if w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
            return w, np.ascontiguousarray(w.T)
    return None


def _bias_vector(g: _Graph, e, N: int, conv: bool, ops) -> np.ndarray | None:
    """A constant bias that broadcasts along the output channels: [N] / [1, N] (matmul), [1, N, 1, 1] (conv)."""
    if not _is_const(e):
        r = g.call(e, ops["reshape"])
        if r is None or not _is_const(r.args[0]):
            return None
        b = _const_np(r.args[0])
        shape = _shape(e)
    else:
        b = _const_np(e)
        shape = b.shape
    if b.dtype != np.float32 or b.size != N or shape is None:
        return None
    if conv:
        ok = tuple(shape) in ((1, N, 1, 1), (N, 1, 1))
    else:
        ok = shape[-1] == N
    return np.ascontiguousarray(b.reshape(N)) if ok else None


def _match_epilogue(g: _Graph, var, N: int, conv: bool, ops):
    """Follow ``var`` through an optional bias add and ReLU/GELU; returns (root var, bias, activation)."""
    bias = None
    root = var
    nxt = g.only_user(root)
    if nxt is not None:
        add = g.call(nxt, ops["add"])
        if add is not None:
            other = add.args[1] if add.args[0].same_as(root) else add.args[0]
            b = _bias_vector(g, other, N, conv, ops)
            if b is not None and _shape(nxt) == _shape(root):
                bias, root = b, nxt
    # activation, possibly behind a reshape (ORT's basic optimisation turns a 3-D MatMul+Add into
    # Reshape-Gemm-Reshape, so the activation follows the reshape back to 3-D); elementwise, so it commutes
    starts = [root]
    nxt = g.only_user(root)
    if nxt is not None and g.call(nxt, ops["reshape"]) is not None:
        starts.append(nxt)
    for start in starts:
        nxt = g.only_user(start)
        if nxt is not None:
            for op_name in ("nn.relu", "nn.gelu"):
                c = g.call(nxt, ops[op_name])
                if c is not None:
                    if op_name == "nn.gelu" and str(getattr(c.attrs, "approximate", "none")) not in ("none", ""):
                        continue
                    return nxt, bias, "relu" if op_name == "nn.relu" else "gelu"
        gelu_root = _match_erf_gelu(g, start, ops)
        if gelu_root is not None:
            return gelu_root, bias, "gelu"
    return root, bias, None


def _match_erf_gelu(g: _Graph, b, ops):
    """x * 0.5 * (1 + erf(x / sqrt(2))) in the orders BERT-style exports produce; returns the last var or None."""
    users = g.users.get(b, [])
    if g.uses.get(b, 0) != 2 or len(users) != 2:
        return None
    inv_sqrt2 = 1 / math.sqrt(2)
    scaled = None
    for u in users:
        d = g.call(u, ops["divide"])
        if d is not None and d.args[0].same_as(b) and _close(_scalar(d.args[1]), math.sqrt(2)):
            scaled = u
        m = g.call(u, ops["multiply"])
        if m is not None:
            other = m.args[1] if m.args[0].same_as(b) else m.args[0]
            if _close(_scalar(other), inv_sqrt2):
                scaled = u
    if scaled is None:
        return None
    other_user = [u for u in users if not u.same_as(scaled)][0]
    e = g.only_user(scaled)
    if e is None or g.call(e, ops["erf"]) is None:
        return None
    a = g.only_user(e)
    ac = g.call(a, ops["add"]) if a is not None else None
    if ac is None or not _close(_scalar(ac.args[1] if ac.args[0].same_as(e) else ac.args[0]), 1.0):
        return None
    # (1 + erf) = a; the products b * a * 0.5 in the three associations exports use
    p = g.only_user(a)
    pc = g.call(p, ops["multiply"]) if p is not None else None
    if pc is None:
        return None
    other = pc.args[1] if pc.args[0].same_as(a) else pc.args[0]
    if other.same_as(b):                                   # y = (b * a) * 0.5
        y = g.only_user(p)
        yc = g.call(y, ops["multiply"]) if y is not None else None
        if yc is not None and _close(_scalar(yc.args[1] if yc.args[0].same_as(p) else yc.args[0]), 0.5):
            return y
        return None
    if _close(_scalar(other), 0.5):                        # y = b * (0.5 * a)
        y = g.only_user(p)
        yc = g.call(y, ops["multiply"]) if y is not None else None
        if yc is not None and y.same_as(other_user) and \
                (yc.args[0].same_as(b) or yc.args[1].same_as(b)):
            return y
        return None
    qc = g.call(other_user, ops["multiply"])               # y = (b * 0.5) * a
    if qc is not None and other.same_as(other_user) and g.only_user(other_user) is not None \
            and g.only_user(other_user).same_as(p):
        half = qc.args[1] if qc.args[0].same_as(b) else qc.args[0]
        if _close(_scalar(half), 0.5):
            return p
    return None


def _close(v: float | None, ref: float) -> bool:
    return v is not None and abs(v - ref) <= 1e-4 * max(1.0, abs(ref))


def _sha1(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def find_layers(func) -> list[Layer]:
    """Candidate layers of one Relax function, in program order."""
    ops = _ops()
    g = _Graph(func)
    layers: list[Layer] = []
    for var in g.order:
        val = g.value[var]
        mm = g.call(var, ops["matmul"])
        conv = g.call(var, ops["nn.conv2d"])
        if mm is not None:
            x = mm.args[0]
            got = _const_weight(g, mm.args[1], ops)
            xs, ys = _shape(x), _shape(var)
            if got is None or xs is None or ys is None or len(xs) < 2:
                continue
            stored, w = got
            if w.dtype != np.float32 or str(x.ty.dtype) != "float32":
                continue
            K, N = w.shape
            if xs[-1] != K:
                continue
            source = "Gemm" if not _is_const(mm.args[1]) else "MatMul"
            root, bias, act = _match_epilogue(g, var, N, False, ops)
            layers.append(Layer(len(layers), "matmul", source, g.value[root], x, xs, ys, w, stored.shape,
                                _sha1(stored), bias, act, int(np.prod(xs[:-1])), K, N))
        elif conv is not None:
            x, wc = conv.args[0], conv.args[1]
            xs, ys = _shape(x), _shape(var)
            if not _is_const(wc) or xs is None or ys is None or len(xs) != 4:
                continue
            a = conv.attrs
            w4 = _const_np(wc)
            if (w4.ndim != 4 or w4.shape[2:] != (1, 1) or int(a.groups) != 1 or w4.dtype != np.float32
                    or [int(s) for s in a.strides] != [1, 1] or any(int(p) for p in a.padding)
                    or [int(d) for d in a.dilation] != [1, 1] or str(a.data_layout) != "NCHW"
                    or str(a.kernel_layout) != "OIHW" or str(a.out_layout) not in ("NCHW", "")):
                continue
            N, K = w4.shape[:2]
            w = np.ascontiguousarray(w4[:, :, 0, 0].T)
            root, bias, act = _match_epilogue(g, var, N, True, ops)
            hw = xs[2] * xs[3]
            layers.append(Layer(len(layers), "conv1x1", "Conv", g.value[root], x, xs, _shape(root) or ys, w,
                                w4.shape, _sha1(w4), bias, act, xs[0], K, N, spatial=hw))
        del val
    return layers


# ------------------------------------------------------------------------------------------------ cost model
def _as_matmul(layer: Layer, family) -> bool:
    """Whether ``layer`` (a 1x1 conv) runs as a matmul over its B*H*W pixels: on a 1x1 map, or where the family's
    convolutions are channels-last (then the conv's NCHW input and output are a transpose away from the NHWC
    neighbours, and those transposes fuse into them instead of costing a strided copy each)."""
    return layer.op == "conv1x1" and (layer.spatial == 1 or family.conv_layout == "NHWC")


def _format_spec(layer: Layer, fmt: str, obj, family) -> KernelSpec:
    if isinstance(obj, F.BSR):
        R, nnz = obj.R, obj.nnzb
    else:
        R, nnz = 1, obj.nnz
    if _as_matmul(layer, family):
        return KernelSpec("matmul", layer.M * layer.spatial, layer.K, layer.N, fmt, R=R, nnz=nnz,
                          has_bias=layer.bias is not None, activation=layer.activation)
    if layer.op == "conv1x1":
        return KernelSpec("conv1x1", layer.M, layer.K, layer.spatial, fmt, R=R, nnz=nnz,
                          has_bias=layer.bias is not None, activation=layer.activation, cout=layer.N)
    return KernelSpec("matmul", layer.M, layer.K, layer.N, fmt, R=R, nnz=nnz, has_bias=layer.bias is not None,
                      activation=layer.activation)


def _rows(layer: Layer) -> int:
    return layer.M * (layer.spatial if layer.op == "conv1x1" else 1)


def estimate_us(layer: Layer, fmt: str, stored_bytes: int, stored_macs: int, preset) -> float:
    """Roofline-style estimate (us) of one layer in ``fmt`` ("dense" or a format) on ``preset``.

    bytes: weights as stored plus activations in and out; flops: 2 x stored multiply-adds x rows. The
    calibration table of the preset's family scales the preset's bandwidth (weight streaming) and peak flops per
    kernel kind.
    """
    from edge_sparse import targets

    family = targets.family_of(preset)
    fam = family.calibration
    dev = preset.device
    rows = _rows(layer)
    peak = family.peak_flops_per_us(preset)
    bw = float(dev.get("mem_bw_gbps", 10.0)) * 1e3                                                   # bytes / us
    act_bytes = 4 * rows * (layer.K + layer.N)
    flops = 2.0 * stored_macs * rows
    kind = "gemv" if rows == 1 else "gemm"
    eff = fam[kind].get(fmt, 0.1)
    if kind == "gemv":
        t = (stored_bytes + act_bytes) / (bw * eff)
    else:
        t = max((stored_bytes + act_bytes) / bw, flops / (peak * eff))
        if fmt != "dense" and layer.op == "matmul":
            t += 2 * act_bytes / bw       # in-kernel transposes of X and Y
    return t + _CALL_OVERHEAD_US


def _candidates(layer: Layer) -> dict[str, Any]:
    """Every format the weight converts to (N:M only when the pattern holds)."""
    out = {}
    for fmt in F.FORMATS:
        obj = F.convert(layer.weight, fmt)
        if obj is not None:
            out[fmt] = obj
    return out


def _stored_macs(obj) -> int:
    if isinstance(obj, F.BSR):
        return obj.nnzb * obj.R
    return obj.nnz


# ------------------------------------------------------------------------------------------------ measurement
def _dense_x_shape(layer: Layer, layout: str = "NCHW") -> tuple[int, ...]:
    if layer.op == "conv1x1" and layout == "NHWC":
        b, c, h, w = layer.x_shape
        return (b, h, w, c)
    return tuple(layer.x_shape)


def dense_layer_module(layer: Layer, layout: str = "NCHW"):
    """A Relax module of the layer alone in its dense form (matmul or 1x1 conv, bias, activation); a 1x1 conv in
    ``layout`` (a channels-last family runs the model's convs in NHWC: timing it in NCHW would add two transposes
    the compiled model does not have)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(_dense_x_shape(layer, layout)), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if layer.op == "conv1x1" and layout == "NHWC":
                w4 = layer.weight.reshape(1, 1, layer.K, layer.N).copy()
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w4), data_layout="NHWC", kernel_layout="HWIO"))
                if layer.bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(layer.bias.reshape(1, 1, 1, -1))))
            elif layer.op == "conv1x1":
                w4 = layer.weight.T.reshape(layer.N, layer.K, 1, 1).copy()
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w4)))
                if layer.bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(layer.bias.reshape(1, -1, 1, 1))))
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(layer.weight)))
                if layer.bias is not None:
                    y = bb.emit(relax.op.add(y, relax.const(layer.bias)))
            if layer.activation == "relu":
                y = bb.emit(relax.op.nn.relu(y))
            elif layer.activation == "gelu":
                y = bb.emit(relax.op.nn.gelu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def time_dense(layer: Layer, preset, family, repeats: int = 15, session=None) -> float:
    """Time (us) the layer's dense form through the family's normal build (its schedules)."""
    layout = family.conv_layout
    x = np.random.default_rng(0).standard_normal(_dense_x_shape(layer, layout)).astype(np.float32)
    return family.time_module(dense_layer_module(layer, layout), [x], preset, repeats=repeats, session=session)


def _kernel_args(layer: Layer, spec: KernelSpec, obj) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    if spec.op == "conv1x1":
        x = rng.standard_normal((spec.M, spec.K, spec.N)).astype(np.float32)
        y = np.zeros((spec.M, spec.cout, spec.N), np.float32)
    else:
        x = rng.standard_normal((spec.M, spec.K)).astype(np.float32)
        y = np.zeros((spec.M, spec.N), np.float32)
    bias = layer.bias if layer.bias is not None else np.zeros(layer.N, np.float32)
    return [x, *obj.arrays(), bias, y]


def layer_estimate_us(layer: Layer, fmt: str, obj, preset) -> float:
    """Cost-model time (us) of ``layer`` with its weight stored as ``obj`` in ``fmt`` ("dense": obj unused)."""
    if fmt == "dense":
        return estimate_us(layer, "dense", F.dense_bytes(layer.K, layer.N), layer.K * layer.N, preset)
    return estimate_us(layer, fmt, obj.nbytes, _stored_macs(obj), preset)


def layer_time_us(layer: Layer, fmt: str, obj, preset, session=None, repeats: int = 15) -> float | None:
    """Measured time (us) of ``layer`` in ``fmt`` with weight ``obj`` (dense: the family's schedules) on this machine
    or on an RPC ``session``; None when the family has no kernel for it."""
    from edge_sparse import targets

    family = targets.family_of(preset)
    if fmt == "dense":
        return time_dense(layer, preset, family, repeats=repeats, session=session)
    spec = _format_spec(layer, fmt, obj, family)
    pf = family.make_sparse_kernel(spec, preset)
    if pf is None:
        return None
    return family.time_kernel(pf, _kernel_args(layer, spec, obj), preset, repeats=repeats, session=session)


# ------------------------------------------------------------------------------------------------ rewrite
def _choose(layer: Layer, preset, family, mode: str, measure: bool, log, dense_times: dict) -> dict[str, Any]:
    """Decide one layer's format; returns its report entry plus the private keys _obj/_spec/_pf."""
    dense_b = F.dense_bytes(layer.K, layer.N)
    desc = F.describe(layer.weight)
    entry: dict[str, Any] = {
        "name": None, "op": layer.source_op, "kind": layer.op, "weight_shape": list(layer.weight_shape),
        "M": _rows(layer), "K": layer.K, "N": layer.N, "bias": layer.bias is not None, "activation": layer.activation,
        "sparsity": round(desc["element"], 4),
        "block_sparsity": {f: round(desc[f], 4) for f in ("bsr16x1", "bsr8x1", "bsr4x1", "csr")},
        "fits_2_4": bool(desc["2:4"]),
        "format": "dense", "kernel": "dense", "bytes_dense": dense_b, "bytes_sparse": None,
        "est_us_dense": round(estimate_us(layer, "dense", dense_b, layer.K * layer.N, preset), 2),
        "est_us_sparse": None, "measured": False, "reason": "",
    }
    make = family.make_sparse_kernel
    if mode == "auto":
        cands = _candidates(layer)
    else:
        obj = F.convert(layer.weight, mode)
        if obj is None:
            entry["reason"] = f"weight is not {mode} sparse"
            return entry
        cands = {mode: obj}
    est = {}
    specs = {}
    for fmt, obj in cands.items():
        spec = _format_spec(layer, fmt, obj, family)
        specs[fmt] = spec
        est[fmt] = estimate_us(layer, fmt, obj.nbytes, _stored_macs(obj), preset)
    # cheapest first; build kernels lazily (a family may decline a spec)
    order = sorted(est, key=est.get)
    chosen = None
    timings: dict[str, float] = {}
    if measure:
        if not family.can_time(preset):
            log(f"measure: kernels for target '{preset.name}' cannot be timed on this machine; using the cost model")
        else:
            # the dense time depends on shapes and epilogue only: layers of one shape share one measurement
            key = (layer.op, layer.x_shape, layer.K, layer.N, layer.bias is not None, layer.activation)
            try:
                if key not in dense_times:
                    dense_times[key] = time_dense(layer, preset, family)
                timings["dense"] = dense_times[key]
            except Exception as e:  # dense timing failed: compare sparse candidates against the model instead
                from edge_sparse.errors import raise_if_interrupted

                raise_if_interrupted()
                log(f"measure: dense timing failed for layer {layer.index}: {e}")
            best = est[order[0]]
            for fmt in order:
                if est[fmt] > 3 * best and fmt != order[0]:
                    continue
                pf = make(specs[fmt], preset)
                if pf is None:
                    continue
                timings[fmt] = family.time_kernel(pf, _kernel_args(layer, specs[fmt], cands[fmt]), preset)
            entry["measured"] = True
            entry["measured_us"] = {k: round(v, 2) for k, v in timings.items()}
    if timings and any(k != "dense" for k in timings):
        sparse_t = {k: v for k, v in timings.items() if k != "dense"}
        fmt = min(sparse_t, key=sparse_t.get)
        dense_t = timings.get("dense", entry["est_us_dense"])
        if mode != "auto" or sparse_t[fmt] * 1.05 < dense_t:
            chosen = fmt
        else:
            entry["reason"] = f"dense measured faster ({dense_t:.1f} us vs {fmt} {sparse_t[fmt]:.1f} us)"
    else:
        for fmt in order:
            if mode == "auto" and est[fmt] * _MARGIN >= entry["est_us_dense"]:
                entry["reason"] = (f"dense estimated faster ({entry['est_us_dense']:.1f} us vs best sparse "
                                   f"{fmt} {est[fmt]:.1f} us)")
                break
            chosen = fmt
            break
    if chosen is None:
        if not entry["reason"]:
            entry["reason"] = "no sparse kernel for this layer"
        return entry
    pf = make(specs[chosen], preset)
    if pf is None:
        entry["reason"] = f"no {chosen} kernel for this layer shape on {preset.name} ({family.name} family)"
        return entry
    entry.update(format=chosen, bytes_sparse=int(cands[chosen].nbytes),
                 est_us_sparse=round(est[chosen], 2), reason="")
    entry["kernel"] = family.kernel_name(specs[chosen], preset)
    entry["_obj"], entry["_spec"], entry["_pf"] = cands[chosen], specs[chosen], pf
    return entry


def _make_mutator():
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod, plans):
            super().__init__(mod)
            self.mod_ = mod
            self.plans = plans            # list of (root Call, Layer, entry)

        def _emit_sparse(self, layer: Layer, entry):
            spec: KernelSpec = entry["_spec"]
            obj = entry["_obj"]
            name = "".join(c if c.isalnum() else "_" for c in str(entry["kernel"]))
            gv = self.builder_.add_func(entry["_pf"], f"sparse_{name}")
            x = self.visit_expr(layer.x)
            # channels-last: a 1x1 conv's pixels are the matmul's rows; the transposes meet the pipeline's NHWC layout
            channels_last = spec.op == "matmul" and layer.op == "conv1x1" and layer.spatial > 1
            if spec.op == "conv1x1":
                b, c, h, w = layer.x_shape
                x2 = self.builder_.emit(relax.op.reshape(x, (b, c, h * w)))
                out_t = relax.TensorType((b, layer.N, h * w), "float32")
            elif channels_last:
                x2 = nchw_as_rows(self.builder_, x, spec.M, spec.K)
                out_t = relax.TensorType((spec.M, spec.N), "float32")
            else:
                x2 = x if len(layer.x_shape) == 2 and layer.x_shape[0] == spec.M else \
                    self.builder_.emit(relax.op.reshape(x, (spec.M, spec.K)))
                out_t = relax.TensorType((spec.M, spec.N), "float32")
            bias = layer.bias if layer.bias is not None else np.zeros(layer.N, np.float32)
            args = [x2] + [relax.const(a) for a in obj.arrays()] + [relax.const(bias)]
            y = self.builder_.emit(relax.call_tir(gv, args, out_t))
            if channels_last:
                b, n, h, w = layer.out_shape
                return rows_as_nchw(self.builder_, y, b, h, w, n)
            return relax.op.reshape(y, layer.out_shape)

        def visit_call_(self, call):
            for root, layer, entry in self.plans:
                if call.same_as(root):
                    return self._emit_sparse(layer, entry)
            return super().visit_call_(call)

        def transform(self):
            return rewrite_functions(self, self.mod_)

    return _Rewriter


@tvm.transform.module_pass(opt_level=0, name="edge_sparse.Sparsify")
class Sparsify:
    """Rewrite a module's pruned layers into sparse kernel calls for ``preset``; ``layers`` then holds the report.

    mode: ``auto`` (cost model or, with ``measure``, timing per layer), ``off``, or one format for every eligible
    layer (``bsr16x1``, ``bsr8x1``, ``bsr4x1``, ``csr``, ``2:4``; layers whose weight does not fit 2:4 stay dense).
    weight_names: ``{sha1 of the weight bytes: ONNX initializer name}`` for the report (``intake.weight_names``).
    """

    def __init__(self, preset, *, mode: str = "auto", measure: bool = False,
                 weight_names: dict[str, str] | None = None, log=None):
        from edge_sparse import targets
        from edge_sparse.errors import UserError

        if mode not in F.SPARSE_MODES:
            raise UserError(f"unknown sparse mode '{mode}'; choose one of {', '.join(F.SPARSE_MODES)}")
        self.preset = targets.get(preset) if isinstance(preset, str) else preset
        self.family = targets.family_of(self.preset)
        self.mode, self.measure = mode, measure
        self.weight_names = weight_names or {}
        self.log = log or (lambda msg: None)
        self.layers: list[dict[str, Any]] = []
        self.dense_times: dict[tuple, float] = {}   # layers of one shape and epilogue share one dense timing

    def transform_module(self, mod, _ctx):
        from tvm import relax

        self.layers = []
        if self.mode == "off":
            return mod
        plans = []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            for layer in find_layers(func):
                entry = _choose(layer, self.preset, self.family, self.mode, self.measure, self.log, self.dense_times)
                entry["name"] = self.weight_names.get(layer.weight_sha1) \
                    or f"{gv.name_hint}.{layer.source_op.lower()}_{layer.index}"
                if entry["format"] != "dense":
                    plans.append((layer.root, layer, entry))
                self.layers.append(entry)
        if plans:
            mod = _make_mutator()(mod, plans).transform()
            mod = relax.transform.DeadCodeElimination()(mod)
        for e in self.layers:
            for k in ("_obj", "_spec", "_pf"):
                e.pop(k, None)
        return mod


def sparsify(mod, preset, *, mode: str = "auto", measure: bool = False, weight_names: dict[str, str] | None = None,
             log=None):
    """Run :class:`Sparsify` on ``mod``; returns ``(mod, layers)``."""
    p = Sparsify(preset, mode=mode, measure=measure, weight_names=weight_names, log=log)
    return p(mod), p.layers
