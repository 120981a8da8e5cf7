"""Relax rewrites that let mobile-CNN epilogues vectorise and stay channels-last (run before ConvertLayout).

- ``sigmoid(x)`` becomes ``1 / (1 + exp(-x))``: TVM lowers ``tir.sigmoid`` to one scalar libm ``expf`` call per lane
  (EfficientNet's swish epilogue on a 112x112x96 map took 7.8 ms of a 9.4 ms block); written with ``exp``,
  ``FastMathTransform`` turns it into ``topi.fast_exp``, a range-reduced degree-5 polynomial on the exponent and
  mantissa that vectorises (inputs clamped to [-88.38, 88.38]; measured max relative error of the sigmoid below
  3e-7 over [-90, 90], see tests/test_coverage.py).
- ``Clip`` as the ONNX importer emits it (``call_tir`` of TE ``maximum`` / ``minimum`` PrimFuncs with a 0-d bound)
  becomes ``R.maximum`` / ``R.minimum`` with a constant: opaque ``call_tir``\\ s have no layout inference, so
  ConvertLayout wrapped every ReLU6 in two transposes back to NCHW and out of the conv's epilogue.
- ``conv2d_transpose`` whose kernel equals its stride (no overlap: DBNet's and U-Net's 2x2 / stride-2 upsamplers)
  becomes a 1x1 ``conv2d`` to ``co * kh * kw`` channels followed by a depth-to-space reshape: TVM legalises the
  transposed conv as a conv over a zero-dilated input, 4x the work with a per-lane test (PP-OCR det's two took
  4.4 ms; onnxruntime 0.5 ms), while the 1x1 conv is the packed GEMM of the conv rules.
- ``conv2d(h * g, W)`` with ``g`` one scale per input channel (squeeze-excitation's gate feeding the projection
  conv) becomes ``conv2d(h, W * g)``: scaling the small weight tensor instead of the feature map saves a full
  read and write of the map (zero padding stays zero under any scale).
"""
from __future__ import annotations

from edge_sparse.util import rewrite_functions

__all__ = ["VectorMathRewrite", "ConvTransposeAsConv", "ChannelScaleIntoConv", "scalar_bound_op"]


def scalar_bound_op(func) -> str | None:
    """``"maximum"`` / ``"minimum"`` when ``func`` is an elementwise ``max`` / ``min`` of its first parameter with its
    0-d second parameter (what ``topi.maximum(x, bound)`` builds), else None."""
    from tvm import tirx

    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    bufs = list(func.params)              # (TVM 0.27: a PrimFunc's parameters are its buffers)
    if any(not hasattr(b, "shape") for b in bufs) or len(bufs[1].shape) != 0:
        return None
    if [int(d) for d in bufs[0].shape] != [int(d) for d in bufs[2].shape]:
        return None
    from tvm.s_tir import Schedule
    from tvm.s_tir.dlight.analysis import get_root_block

    try:
        sch = Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
    except Exception:  # not a schedulable block function
        return None
    stores = [sch.get(b).body for b in blocks]
    if len(stores) != 1 or not isinstance(stores[0], tirx.BufferStore) or not stores[0].buffer.same_as(bufs[2]):
        return None
    value = stores[0].value
    kind = "maximum" if isinstance(value, tirx.Max) else "minimum" if isinstance(value, tirx.Min) else None
    if kind is None:
        return None
    a, b = value.a, value.b
    # (TVM 0.27 names a load "TensorLoad", its buffer ``source``)
    if not all(hasattr(v, "source") and hasattr(v, "indices") for v in (a, b)):
        return None
    if not (a.source.same_as(bufs[0]) and b.source.same_as(bufs[1])):
        return None
    # the load of x must be the identity access of the store (elementwise, no broadcast or transpose)
    if len(a.indices) != len(stores[0].indices) or any(not i.same_as(j) for i, j in zip(a.indices, stores[0].indices)):
        return None
    return kind


def VectorMathRewrite():  # noqa: N802 (a pass factory, named like TVM's)
    """The module pass described in the module docstring."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod = mod
            self.replaced: set = set()

        def scalar_constant(self, expr, depth: int = 0):
            """A 0-d bound as a Constant: the importer writes Clip's bounds as ``where(isnan(c), -inf, c)`` on
            constants. (Evaluated here: a module-wide FoldConstant broke dynamic Slice's shape function.)"""
            import numpy as np

            if isinstance(expr, relax.Var):
                expr = self.lookup_binding(expr)
            if isinstance(expr, tvm.ir.Constant) or depth > 4 or not isinstance(expr, relax.Call) \
                    or not isinstance(expr.op, tvm.ir.Op):
                return expr
            vals = [self.scalar_constant(a, depth + 1) for a in expr.args]
            if not all(isinstance(v, tvm.ir.Constant) and v.value.numpy().ndim == 0 for v in vals):
                return expr
            a = [v.value.numpy() for v in vals]
            if expr.op.name == "relax.isnan":
                return relax.const(np.isnan(a[0]), "bool")
            if expr.op.name == "relax.where":
                out = np.where(a[0], a[1], a[2])
                return relax.const(out.astype(a[1].dtype), str(a[1].dtype))
            return expr

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.sigmoid":
                x = call.args[0]
                dtype = x.ty.dtype
                if dtype not in ("float32", "float16"):
                    return call
                one = relax.const(1.0, dtype)
                return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(x))))
            if call.op.name == "relax.call_tir" and isinstance(call.args[0], relax.GlobalVar):
                args = call.args[1]
                if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
                    return call
                bound = self.scalar_constant(args.fields[1])
                if not isinstance(bound, tvm.ir.Constant) or bound.value.numpy().ndim != 0:
                    return call
                kind = scalar_bound_op(self.mod[call.args[0]])
                if kind is None:
                    return call
                op = relax.op.maximum if kind == "maximum" else relax.op.minimum
                self.replaced.add(call.args[0])
                return op(args.fields[0], bound)
            return call

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.VectorMathRewrite")
    def _pass(mod, _ctx):
        rewriter = _Rewriter(mod)
        out = rewrite_functions(rewriter, mod)
        # Drop only the bound PrimFuncs this pass made unused. (A module-wide DeadCodeElimination also dropped the
        # shape functions that dynamic-shape Relax code refers to by name: ONNX Slice past the end failed later.)
        used = set()
        for _, func in out.functions_items():
            if isinstance(func, relax.Function):
                used.update(relax.analysis.all_global_vars(func))
        for gv in rewriter.replaced:
            if gv not in used and gv in out.get_global_vars():
                del out[gv]
        return out

    return _pass


def _transpose_conv_as_conv(call, bb):
    """The rewrite of :func:`ConvTransposeAsConv` for one call, or None when it does not apply."""
    import numpy as np
    import tvm
    from tvm import relax

    a = call.attrs
    x, w = call.args
    if not isinstance(w, tvm.ir.Constant) or a.groups != 1 or a.data_layout != "NCHW" or a.kernel_layout != "IOHW" \
            or (a.out_layout or "NCHW") != "NCHW":
        return None
    if any(int(p) for p in a.padding) or any(int(p) for p in a.output_padding) or any(int(d) != 1 for d in a.dilation):
        return None
    wv = w.value.numpy()
    if wv.ndim != 4 or wv.dtype != np.float32 or getattr(x.ty, "dtype", None) != "float32":
        return None
    ci, co, kh, kw = wv.shape
    if (kh, kw) != tuple(int(s) for s in a.strides):
        return None
    shape = x.ty.shape if hasattr(x.ty, "shape") else None
    if shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    n, _, h, wd = (int(d) for d in shape)
    # out[n, o, y*kh + a, x*kw + b] = sum_i x[n, i, y, x] * W[i, o, a, b]: a 1x1 conv to channels (o, a, b)
    w1 = np.ascontiguousarray(wv.transpose(1, 2, 3, 0).reshape(co * kh * kw, ci, 1, 1))
    z = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), out_dtype="float32"))
    z = bb.emit(relax.op.reshape(z, (n, co, kh, kw, h, wd)))
    z = bb.emit(relax.op.permute_dims(z, [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(z, (n, co, h * kh, wd * kw))


def ConvTransposeAsConv():  # noqa: N802 (a pass factory, named like TVM's)
    """Module pass: non-overlapping ``conv2d_transpose`` as a 1x1 conv plus depth-to-space (module docstring)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d_transpose":
                rewritten = _transpose_conv_as_conv(call, self.builder_)
                return call if rewritten is None else rewritten
            return call

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.ConvTransposeAsConv")
    def _pass(mod, _ctx):
        return rewrite_functions(_Rewriter(mod), mod)

    return _pass


def _uses(func) -> dict:
    """How many times each Relax variable is used in ``func`` (binding sites excluded)."""
    from tvm import relax

    counts: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def ChannelScaleIntoConv():  # noqa: N802 (a pass factory, named like TVM's)
    """Module pass: a per-input-channel scale of a conv's input moved onto its constant weights (module docstring)."""
    import numpy as np
    import tvm
    from tvm import relax

    def _static(shape):
        return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod, uses):
            super().__init__(mod)
            self.uses = uses

        def channel_scaled(self, x, channels):
            """(h, g) when ``x`` is bound to ``h * g`` (either order) with g [1, C, 1, ...], used only here."""
            if not isinstance(x, relax.Var) or self.uses.get(x, 0) != 1:
                return None
            call = self.lookup_binding(x)
            if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.multiply":
                return None
            for h, g in (call.args, reversed(call.args)):
                hs, gs = getattr(h.ty, "shape", None), getattr(g.ty, "shape", None)
                if not (_static(hs) and _static(gs)) or len(hs) != len(gs) or len(hs) < 3 \
                        or getattr(g.ty, "dtype", None) != "float32":
                    continue
                if int(gs[1]) == channels and int(hs[1]) == channels and all(int(d) == 1 for i, d in enumerate(gs)
                                                                              if i != 1):
                    return h, g
            return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            a = call.attrs
            x, w = call.args
            if not isinstance(w, tvm.ir.Constant) or a.groups != 1 or a.data_layout != "NCHW" \
                    or a.kernel_layout != "OIHW" or getattr(x.ty, "dtype", None) != "float32":
                return call
            wshape = w.value.shape
            found = self.channel_scaled(x, int(wshape[1]))
            if found is None:
                return call
            h, g = found
            if int(np.prod([int(d) for d in wshape])) >= int(np.prod([int(d) for d in h.ty.shape])):
                return call   # (scaling the weights must be the cheaper side: not for a 1x1 map)
            w_scaled = self.builder_.emit(relax.op.multiply(w, g))   # [O, C, kh, kw] * [1, C, 1, 1]
            return relax.op.nn.conv2d(h, w_scaled, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                      groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                      out_layout=a.out_layout, out_dtype=a.out_dtype)

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.ChannelScaleIntoConv")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                rewriter = _Rewriter(mod, _uses(func))
                # (the replaced product is left unused: dropped here, before fusion could compute it anyway)
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(rewriter.visit_expr(func)))
                mod = rewriter.builder_.get()
        return mod

    return _pass
