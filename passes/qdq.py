"""QDQ rewrite pass: route quantized MatMul / Gemm / 1x1 Conv layers of an int8 ONNX model to our int8 kernels.

Runs on the Relax module of ``from_onnx(..., keep_params_in_input=False)``. Two import patterns are recognised:

- static QDQ (``quantize --scheme static``): ``R.matmul(R.dequantize(xq, s, zp), W)`` with ``W`` =
  ``R.dequantize(Wq, ws, 0)`` of a constant int8 weight (optionally behind ``R.permute_dims`` for Gemm transB);
  ``s``/``zp`` are constants. The float result goes on as before (the output Q/DQ pair stays in the graph), so an
  optional constant bias add and ReLU/GELU directly after the matmul are fused. The same for a 1x1 conv (stride 1,
  no padding, no groups, NCHW): ``R.nn.conv2d(R.dequantize(xq, s, zp), R.dequantize(Wq[N, K, 1, 1], ws, 0))`` with
  its QDQ bias (``reshape(dequantize(int32 bias))``) and a ReLU, as the GEMM ``X[pixels, K] @ W[K, N]`` (input
  permuted to NHWC, output back to NCHW). Other convs stay dequantize + float conv.
- dynamic (``quantize --scheme dynamic``, onnxruntime's DynamicQuantizeLinear + MatMulInteger):
  ``R.matmul(xq_i32 - zp_i32, Wq_i32 - 0, out_dtype="int32")`` -> ``astype(float32)`` -> ``multiply(s * ws)``
  [-> bias add] [-> ReLU/GELU]; ``s``/``zp`` are computed per call in the graph and passed to the kernel as tensors.
  A MatMulInteger whose int32 result is used as is maps to the kernel's int32 output.

Weights must be symmetric (zero point 0, which ``quantize`` guarantees) with K % 4 == 0; N is padded with zero
channels to a multiple of 16 (sliced off after the call); other layers stay on TVM's default lowering of the
imported ops. Each rewritten layer becomes one ``call_tir`` of
``targets.cpu.int8.int8_kernel`` (dense, or BSR over 16x4 blocks when the cost model says the zeros pay).

``rewrite_qdq(mod, preset, mode=...) -> (mod, layers)``: ``layers`` is the per-layer report for manifest.json
(dtype, scales, format, kernel).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edge_sparse.passes.sparsify import _const_np, _Graph, _is_const, _match_epilogue, _ops, _shape
from edge_sparse.util import nchw_as_rows, rewrite_functions, rows_as_nchw

__all__ = ["rewrite_qdq", "fuse_range_reductions", "int8_estimate_us", "int8_layer_time_us", "INT8_CALIBRATION",
           "INT8_MACS_PER_FP32", "R_INT8"]

R_INT8 = 16
# Relative cost of one stored 16x4 block in the sparse kernel against the dense kernel (index load, irregular X
# access), measured by benchmarks/int8.py ("calibration" in benchmarks/results/int8.json: MiniLM FFN shapes at
# 50-90%, median over them, host x86 VNNI, 1 thread); AArch64 presets use the same ratios.
INT8_CALIBRATION = {"gemv": 1.1, "gemm": 1.16}


def _ops_int8():
    import tvm

    get = tvm.ir.Op.get
    base = _ops()
    base.update({k: get(f"relax.{k}") for k in ("dequantize", "quantize", "astype", "subtract", "expand_dims")})
    return base


def _const_eval(g: _Graph, e, ops, depth: int = 0):
    """numpy value of ``e`` when it is a constant or a small chain of astype/subtract/expand_dims/permute over
    constants (how the importer spells MatMulInteger's weight minus its zero point); else None."""
    if _is_const(e):
        return _const_np(e)
    if depth > 6:
        return None
    for name in ("astype", "expand_dims", "permute_dims", "subtract", "reshape", "dequantize"):
        c = g.call(e, ops[name])
        if c is None:
            continue
        args = [_const_eval(g, a, ops, depth + 1) for a in (c.args[:1] if name == "reshape" else c.args)]
        if any(a is None for a in args):
            return None
        if name == "astype":
            return args[0].astype(str(c.attrs.dtype))
        if name == "reshape":
            shape = _shape(e)
            return None if shape is None else args[0].reshape(shape)
        if name == "dequantize":                         # (q - zp) * scale, scale/zp along attrs.axis
            q, sc, zp = args[0].astype(np.float32), args[1].astype(np.float32), args[2].astype(np.float32)
            bshape = [1] * q.ndim
            if q.ndim and sc.size > 1:
                bshape[int(c.attrs.axis) % q.ndim] = -1
            return ((q - zp.reshape(bshape if zp.size > 1 else ())) * sc.reshape(bshape if sc.size > 1 else ())
                    ).astype(np.float32)
        if name == "expand_dims":
            return np.expand_dims(args[0], tuple(int(a) for a in c.attrs.axis))
        if name == "permute_dims":
            axes = c.attrs.axes
            return np.transpose(args[0], None if axes is None else [int(a) for a in axes])
        return args[0] - args[1]
    return None


def _scalar_const(e) -> np.ndarray | None:
    if _is_const(e):
        a = _const_np(e)
        if a.size == 1:
            return a.reshape(())
    return None


def _static_weight(g: _Graph, e, ops):
    """(Wq[K, N] int8, scale[N] float32) of ``dequantize(Wq, ws, 0)`` (possibly transposed), or None."""
    transpose = False
    pd = g.call(e, ops["permute_dims"])
    if pd is not None:
        axes = pd.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        e, transpose = pd.args[0], True
    dq = g.call(e, ops["dequantize"])
    if dq is None or not _is_const(dq.args[0]):
        return None
    wq = _const_np(dq.args[0])
    ws, wz = _const_eval(g, dq.args[1], ops), _const_eval(g, dq.args[2], ops)
    if wq.dtype != np.int8 or wq.ndim != 2 or ws is None or wz is None or np.any(wz != 0):
        return None
    axis = int(dq.attrs.axis) % 2
    if transpose:
        wq, axis = wq.T, 1 - axis
    K, N = wq.shape
    ws = np.asarray(ws, np.float32).reshape(-1)
    if ws.size == 1:
        ws = np.full(N, ws[0], np.float32)
    elif ws.size != N or axis != 1:
        return None
    return np.ascontiguousarray(wq), ws


def _conv1x1_weight(g: _Graph, conv, ops):
    """(Wq[K, N] int8, scale[N] float32) of a static-QDQ 1x1 conv (stride 1, no padding, no groups, NCHW) whose
    weight is ``dequantize(Wq[N, K, 1, 1], ws, 0)``; None otherwise."""
    a = conv.attrs
    if (int(a.groups) != 1 or [int(v) for v in a.strides] != [1, 1] or any(int(v) for v in a.padding)
            or [int(v) for v in a.dilation] != [1, 1] or str(a.data_layout) != "NCHW"
            or str(a.kernel_layout) != "OIHW" or str(a.out_layout) not in ("NCHW", "")):
        return None
    dq = g.call(conv.args[1], ops["dequantize"])
    if dq is None or not _is_const(dq.args[0]):
        return None
    wq = _const_np(dq.args[0])
    ws, wz = _const_eval(g, dq.args[1], ops), _const_eval(g, dq.args[2], ops)
    if wq.dtype != np.int8 or wq.ndim != 4 or wq.shape[2:] != (1, 1) or ws is None or wz is None or np.any(wz != 0):
        return None
    N = wq.shape[0]
    ws = np.asarray(ws, np.float32).reshape(-1)
    if ws.size == 1:
        ws = np.full(N, ws[0], np.float32)
    elif ws.size != N or int(dq.attrs.axis) % 4 != 0:
        return None
    return np.ascontiguousarray(wq[:, :, 0, 0].T), ws


def _conv_epilogue(g: _Graph, var, N: int, ops):
    """(root, bias, act) after a conv: an optional constant bias (QDQ: ``reshape(dequantize(int32 bias))`` to
    [1, N, 1, 1]) and an optional ReLU directly after (in QDQ models the activation usually follows a Q/DQ pair and
    stays outside)."""
    root, bias = var, None
    nxt = g.only_user(var)
    add = g.call(nxt, ops["add"]) if nxt is not None else None
    if add is not None and _shape(nxt) == _shape(var):
        other = add.args[1] if add.args[0].same_as(var) else add.args[0]
        b = _const_eval(g, other, ops)
        if b is not None and b.size == N and b.shape in ((1, N, 1, 1), (N, 1, 1)):
            bias, root = np.ascontiguousarray(b.reshape(N), dtype=np.float32), nxt
    nxt = g.only_user(root)
    if nxt is not None and g.call(nxt, ops["nn.relu"]) is not None:
        return nxt, bias, "relu"
    return root, bias, None


def _dynamic_scale(g: _Graph, mult, root, N: int, ops):
    """(xscale var, wscale[N]) from ``multiply(float(acc), xs * ws)``; None when the pattern differs."""
    other = mult.args[1] if mult.args[0].same_as(root) else mult.args[0]
    sc = g.call(other, ops["multiply"])
    if sc is None:
        return None
    for a, b in ((sc.args[0], sc.args[1]), (sc.args[1], sc.args[0])):
        ws = _const_eval(g, b, ops)
        if ws is not None and _shape(a) == () and not _is_const(a):
            ws = np.asarray(ws, np.float32).reshape(-1)
            if ws.size == 1:
                ws = np.full(N, ws[0], np.float32)
            return (a, ws) if ws.size == N else None
    return None


class _Plan:
    conv = False                                 # a 1x1 conv (NCHW) rather than a matmul
    n_out = None                                 # output channels before padding N to the block (None: unpadded)

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _find(func, ops) -> list[_Plan]:
    g = _Graph(func)
    plans = []
    for var in g.order:
        mm = g.call(var, ops["matmul"])
        conv = g.call(var, ops["nn.conv2d"]) if mm is None else None
        if conv is not None:                     # static QDQ 1x1 conv: a GEMM over channels, rows = pixels
            xs, ys = _shape(conv.args[0]), _shape(var)
            dqx = g.call(conv.args[0], ops["dequantize"])
            got = _conv1x1_weight(g, conv, ops)
            if xs is None or ys is None or len(xs) != 4 or dqx is None or got is None:
                continue
            s, zp = _scalar_const(dqx.args[1]), _scalar_const(dqx.args[2])
            xq = dqx.args[0]
            if s is None or zp is None or str(xq.ty.dtype) not in ("uint8", "int8"):
                continue
            wq, ws = got
            K, N = wq.shape
            root, bias, act = _conv_epilogue(g, var, N, ops)
            plans.append(_Plan(kind="static", conv=True, var=var, root=g.value[root], xq=xq, x_shape=xs,
                               out_shape=_shape(root) or ys, M=xs[0] * xs[2] * xs[3], K=K, N=N, wq=wq, ws=ws,
                               bias=bias, act=act, xzp=np.array([int(zp)], np.int32),
                               xscale=np.array([float(s)], np.float32), zp_var=None, scale_var=None, out="float32"))
            continue
        if mm is None:
            continue
        xs, ys = _shape(mm.args[0]), _shape(var)
        if xs is None or ys is None or len(xs) < 2:
            continue
        K = xs[-1]
        M = int(np.prod(xs[:-1]))
        # static QDQ
        dqx = g.call(mm.args[0], ops["dequantize"])
        if dqx is not None:
            got = _static_weight(g, mm.args[1], ops)
            s, zp = _scalar_const(dqx.args[1]), _scalar_const(dqx.args[2])
            xq = dqx.args[0]
            if got is None or s is None or zp is None or str(xq.ty.dtype) not in ("uint8", "int8"):
                continue
            wq, ws = got
            N = wq.shape[1]
            root, bias, act = _match_epilogue(g, var, N, False, ops)
            plans.append(_Plan(kind="static", var=var, root=g.value[root], xq=xq, x_shape=xs,
                               out_shape=_shape(root) or ys, M=M, K=K, N=N, wq=wq, ws=ws, bias=bias, act=act,
                               xzp=np.array([int(zp)], np.int32), xscale=np.array([float(s)], np.float32),
                               zp_var=None, scale_var=None, out="float32"))
            continue
        # dynamic: MatMulInteger
        if str(var.ty.dtype) != "int32":
            continue
        sub = g.call(mm.args[0], ops["subtract"])
        if sub is None:
            continue
        ax, az = g.call(sub.args[0], ops["astype"]), g.call(sub.args[1], ops["astype"])
        if ax is None or az is None:
            continue
        xq, zp_var = ax.args[0], az.args[0]
        if str(xq.ty.dtype) not in ("uint8", "int8") or _shape(zp_var) not in ((), (1,)):
            continue
        w = _const_eval(g, mm.args[1], ops)
        if w is None or w.ndim != 2 or w.shape[0] != K or w.min() < -128 or w.max() > 127:
            continue
        wq = np.ascontiguousarray(w.astype(np.int8))
        N = wq.shape[1]
        nxt = g.only_user(var)
        cast = g.call(nxt, ops["astype"]) if nxt is not None else None
        common = dict(var=var, xq=xq, x_shape=xs, M=M, K=K, N=N, wq=wq, zp_var=zp_var, xzp=None, xscale=None)
        if cast is None:                                   # int32 result used as is
            plans.append(_Plan(kind="dynamic", root=mm, out_shape=ys, ws=np.ones(N, np.float32), bias=None,
                               act=None, scale_var=None, out="int32", **common))
            continue
        if str(cast.attrs.dtype) != "float32":
            continue
        mul_var = g.only_user(nxt)
        mult = g.call(mul_var, ops["multiply"]) if mul_var is not None else None
        sc = _dynamic_scale(g, mult, nxt, N, ops) if mult is not None else None
        if sc is None:
            continue
        root, bias, act = _match_epilogue(g, mul_var, N, False, ops)
        plans.append(_Plan(kind="dynamic", root=g.value[root], out_shape=_shape(root) or ys, ws=sc[1], bias=bias,
                           act=act, scale_var=sc[0], out="float32", **common))
    return plans


# int8 multiply-adds per cycle relative to float32 FMA lanes, per dot-product path: vpdpbusd and sdot do 4 int8 MACs
# per 32-bit lane; the Cortex-A72 NEON path (smull + saddlp + addp) needs 6 instructions per 4x4 block, about 2/3 of
# fmla's MACs per instruction; the generic widening path about half.
INT8_MACS_PER_FP32 = {"vnni": 4.0, "sdot": 4.0, "neon": 0.67, "generic": 0.5}


def int8_estimate_us(M: int, K: int, N: int, blocks: int, sparse: bool, preset, isa: str | None = None) -> float:
    """Roofline estimate (us) of one int8 layer on ``preset``: weights streamed once, the int8 MAC rate of the
    preset's dot-product path (``isa``; default: the one the preset's family picks)."""
    if isa is None:
        from edge_sparse import targets

        kernels = targets.family_of(preset).int8_kernels(preset)
        isa = kernels.isa if kernels is not None else "generic"
    dev = preset.device
    peak = float(dev.get("peak_gflops_per_core", 20.0)) * max(1, int(dev.get("cores", 1))) * 1e3      # flop/us
    peak *= INT8_MACS_PER_FP32.get(isa, 0.5)
    bw = float(dev.get("mem_bw_gbps", 10.0)) * 1e3
    kind = "gemv" if M == 1 else "gemm"
    factor = INT8_CALIBRATION[kind] if sparse else 1.0
    wbytes = blocks * (R_INT8 * 4 + (4 if sparse else 0))
    flops = 2.0 * M * blocks * R_INT8 * 4
    return max((wbytes + M * (K + 4 * N)) / bw, factor * flops / (peak * 0.5)) + 1.0


def int8_layer_time_us(M: int, K: int, N: int, wq: np.ndarray, sparse: bool, preset, *, activation=None,
                       bias: bool = False, session=None, repeats: int = 15) -> float:
    """Measured time (us) of the family's int8 kernel for ``Y[M, N] = Xq[M, K] @ wq[K, N]`` (uint8 activations,
    float output with the fused dequantize/bias/activation epilogue), dense or BSR over its blocks, on this machine
    or on an RPC ``session``."""
    from edge_sparse import targets

    family = targets.family_of(preset)
    kernels = family.int8_kernels(preset)
    packed = kernels.pack(wq, sparse)
    pf = kernels.kernel(M, K, N, packed.nblocks, x_dtype="uint8", out="float32", activation=activation)
    rng = np.random.default_rng(0)
    args = [rng.integers(0, 255, (M, K), dtype=np.uint8), *packed.arrays(), np.array([128], np.int32),
            np.array([0.02], np.float32), np.full(N, 0.01, np.float32), packed.wsum,
            (rng.standard_normal(N) if bias else np.zeros(N)).astype(np.float32), np.zeros((M, N), np.float32)]
    return family.time_kernel(pf, args, preset, repeats=repeats, session=session)


def _choose(plan: _Plan, preset, kernels, mode: str, measure: bool = False) -> dict[str, Any]:
    nbt = (plan.K // 4) * (plan.N // R_INT8)
    dens = kernels.block_density(plan.wq)
    sparse_blocks = max(1, int(round(dens * nbt)))
    est_d = int8_estimate_us(plan.M, plan.K, plan.N, nbt, False, preset, kernels.isa)
    est_s = int8_estimate_us(plan.M, plan.K, plan.N, sparse_blocks, True, preset, kernels.isa)
    out = {"isa": kernels.isa, "block_density": round(dens, 4), "est_us_dense": round(est_d, 2),
           "est_us_sparse": round(est_s, 2)}
    if mode == "auto" and measure and dens < 1.0:
        from edge_sparse import targets

        if targets.family_of(preset).can_time(preset):     # time both kernels here instead of trusting the model
            t = {sp: int8_layer_time_us(plan.M, plan.K, plan.N, plan.wq, sp, preset, activation=plan.act,
                                        bias=plan.bias is not None) for sp in (False, True)}
            out["measured_us"] = {"dense": round(t[False], 2), "int8_dense": round(t[False], 2),
                                  "int8_bsr16x4": round(t[True], 2)}
            out["sparse"] = t[True] * 1.05 < t[False]
            return out
    out["sparse"] = mode != "off" and (est_s * 1.05 < est_d if mode == "auto" else dens < 1.0)
    return out


def _pad_outputs(p: _Plan, n: int) -> None:
    """Widen plan ``p`` to ``n`` output channels (zero weights, unit scales, zero bias); ``n_out`` keeps the real
    count (N = 120 or 6625 in PP-OCR rec: the kernels store 16 output channels per block)."""
    extra = n - p.N
    p.n_out = p.N
    p.wq = np.ascontiguousarray(np.pad(p.wq, ((0, 0), (0, extra))))
    p.ws = np.concatenate([p.ws, np.ones(extra, np.float32)])
    if p.bias is not None:
        p.bias = np.concatenate([p.bias, np.zeros(extra, np.float32)])
    p.N = n


def _make_mutator():
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod, plans):
            super().__init__(mod)
            self.mod_ = mod
            self.plans = plans

        def _emit(self, p: _Plan):
            b = self.builder_
            x = self.visit_expr(p.xq)
            if p.conv:                           # NCHW -> rows of channels (pixels x C), the GEMM's X[M, K]
                x2 = nchw_as_rows(b, x, p.M, p.K)
            else:
                x2 = x if len(p.x_shape) == 2 else b.emit(relax.op.reshape(x, (p.M, p.K)))
            if p.zp_var is not None:
                zp = b.emit(relax.op.reshape(relax.op.astype(self.visit_expr(p.zp_var), "int32"), (1,)))
            else:
                zp = relax.const(p.xzp)
            if p.scale_var is not None:
                sc = b.emit(relax.op.reshape(self.visit_expr(p.scale_var), (1,)))
            else:
                sc = relax.const(p.xscale if p.xscale is not None else np.ones(1, np.float32))
            gv = b.add_func(p.pf, f"int8_{p.kernel}")
            bias = p.bias if p.bias is not None else np.zeros(p.N, np.float32)
            args = [x2] + [relax.const(a) for a in p.packed.arrays()] + [
                zp, sc, relax.const(p.ws.astype(np.float32)), relax.const(p.packed.wsum), relax.const(bias)]
            y = b.emit(relax.call_tir(gv, args, relax.TensorType((p.M, p.N), p.out)))
            if p.n_out is not None:              # drop the padding channels
                y = b.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[p.n_out]))
            if p.conv:
                n, _, h, w = p.x_shape
                return rows_as_nchw(b, y, n, h, w, p.n_out or p.N)
            return relax.op.reshape(y, p.out_shape)

        def visit_call_(self, call):
            for p in self.plans:
                if call.same_as(p.root):
                    return self._emit(p)
            return super().visit_call_(call)

        def transform(self):
            return rewrite_functions(self, self.mod_)

    return _Rewriter


def fuse_range_reductions(mod, kernels):
    """``R.max(x, axis=None)`` and ``R.min(x, axis=None)`` of one float tensor as a single vectorised pass
    (the family's ``minmax`` kernel). Dynamic quantization computes the range of every quantized activation
    this way; TVM lowers each full reduction to a scalar loop (about 100 us per 128x1536 on the host: a sixth of
    int8 MiniLM's time went there)."""
    import tvm
    from tvm import relax

    op_max, op_min = tvm.ir.Op.get("relax.max"), tvm.ir.Op.get("relax.min")

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.mod_ = m
            self.ranges = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not (call.op.same_as(op_max) or call.op.same_as(op_min)):
                return call
            x = call.args[0]
            shape = _shape(x)
            if call.attrs.axis is not None or bool(call.attrs.keepdims) or shape is None or len(shape) < 1 \
                    or str(x.ty.dtype) != "float32" or int(np.prod(shape)) < 64:
                return call
            key = x if isinstance(x, relax.Var) else None
            rng = self.ranges.get(key) if key is not None else None
            if rng is None:
                n = int(np.prod(shape))
                gv = self.builder_.add_func(kernels.minmax(n), "minmax")
                flat = self.builder_.emit(relax.op.reshape(x, (n,)))
                rng = self.builder_.emit(relax.call_tir(gv, [flat], relax.TensorType((2,), "float32")))
                if key is not None:
                    self.ranges[key] = rng
            i = 1 if call.op.same_as(op_max) else 0
            return relax.op.reshape(relax.op.strided_slice(rng, axes=[0], begin=[i], end=[i + 1]), ())

        def transform(self):
            return rewrite_functions(self, self.mod_)

    return _Fuse(mod).transform()


def rewrite_qdq(mod, preset, *, mode: str = "auto", measure: bool = False, log=None):
    """Rewrite the quantized matmuls of ``mod`` into int8 kernel calls for a CPU ``preset``; ``(mod, layers)``.

    mode: the ``--sparse`` mode; ``off`` keeps every int8 layer dense, ``auto`` picks BSR 16x4 per layer by the cost
    model (with ``measure``, by timing both kernels on this machine when the preset runs here), any other mode uses
    BSR 16x4 wherever a weight has a zero block.
    """
    from tvm import relax

    from edge_sparse import targets

    kernels = targets.family_of(preset).int8_kernels(preset)
    if kernels is None:                    # the family has no int8 kernels: TVM lowers the imported ops
        return mod, []
    ops = _ops_int8()
    plans, report = [], []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for i, p in enumerate(_find(func, ops)):
            entry = {"name": f"{gv.name_hint}.int8_{'conv1x1' if p.conv else 'matmul'}_{i}", "op": "MatMulInteger" if p.kind == "dynamic"
                     else "QDQ Conv 1x1" if p.conv else "QDQ MatMul", "kind": "conv1x1" if p.conv else "matmul", "dtype": "int8", "weight_shape": [p.K, p.N], "M": p.M, "K": p.K, "N": p.N,
                     "activation_dtype": str(p.xq.ty.dtype), "output_dtype": p.out,
                     "bias": p.bias is not None, "activation": p.act,
                     "scales": {"activation": "dynamic (per call)" if p.kind == "dynamic" else
                                {"scale": float(p.xscale[0]), "zero_point": int(p.xzp[0])},
                                "weight": {"per_channel": bool(np.ptp(p.ws) > 0), "min": float(p.ws.min()),
                                           "max": float(p.ws.max()), "zero_point": 0}},
                     "sparsity": round(float(np.mean(p.wq == 0)), 4)}
            if p.K % 4:
                entry.update(format="dense", kernel="tvm_default", reason=f"int8 kernels need K % 4 == 0 (K={p.K})")
                report.append(entry)
                continue
            if not kernels.fits(p.K, p.N):         # pad N with zero channels to the block; the call slices them off
                _pad_outputs(p, -(-p.N // kernels.R) * kernels.R)
                entry["padded_N"] = p.N
            ch = _choose(p, preset, kernels, mode, measure)
            p.packed = kernels.pack(p.wq, ch["sparse"])
            kname = f"{'gemv' if p.M == 1 else 'gemm'}_{ch['isa']}"
            p.kernel = f"{'bsr16x4' if ch['sparse'] else 'dense'}_{kname}"
            p.pf = kernels.kernel(p.M, p.K, p.N, p.packed.nblocks, x_dtype=str(p.xq.ty.dtype), out=p.out,
                                  activation=p.act)
            entry.update(format="int8_bsr16x4" if ch["sparse"] else "int8_dense", kernel=f"int8_{kname}",
                         block_sparsity=round(1 - ch["block_density"], 4), bytes_dense=p.K * p.N,
                         bytes_sparse=p.packed.nbytes if ch["sparse"] else None, est_us_dense=ch["est_us_dense"],
                         est_us_sparse=ch["est_us_sparse"], measured="measured_us" in ch, reason="")
            if "measured_us" in ch:
                entry["measured_us"] = ch["measured_us"]
            if not ch["sparse"] and mode != "off" and ch["block_density"] >= 1.0:
                entry["reason"] = "no empty 16x4 block"
            elif not ch["sparse"] and mode != "off":
                how, (td, ts) = ("measured", (ch["measured_us"]["dense"], ch["measured_us"]["int8_bsr16x4"])) \
                    if "measured_us" in ch else ("estimated", (ch["est_us_dense"], ch["est_us_sparse"]))
                entry["reason"] = (f"dense int8 {how} faster ({td:.1f} us vs bsr16x4 {ts:.1f} us; "
                                   f"{1 - ch['block_density']:.0%} of 16x4 blocks empty)")
            report.append(entry)
            plans.append(p)
    if plans:
        mod = _make_mutator()(mod, plans).transform()
        mod = fuse_range_reductions(mod, kernels)
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, report
