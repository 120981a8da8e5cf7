"""TVM passes of the CPU pipeline, applied only where their preconditions hold.

TVM's ``ConvertLayout`` infers a layout for every op of a function, whether or not any op asks for one, and its
inference fails on ops it does not model (``stack`` from a variadic Max/Min: "Invalid SLayout"; symbolic-shape
reshapes from Unsqueeze with negative axes and Unique's outputs: "Cannot convert when exactly one of the layouts is
unknown"). :func:`ConvertConvLayout` therefore converts only functions that hold an op with a desired layout.

TVM's ``SplitLayoutRewritePreproc`` moves weight-repacking blocks (marked by our schedules) out of their PrimFunc so
that they fold into constants; it requires every PrimFunc's root block to hold compute blocks, which extern-style
functions (scatter, unique, top-k, cumsum: one opaque block of loops) do not have. :func:`SplitWeightPrepack`
hands it only the PrimFuncs that hold a repacking block.

TVM's ``FastMathTransform`` reads ``call.op.name`` of every call and fails on calls of packed functions (an Expand
whose shape comes from a tensor calls ``vm.builtin.tensor_to_shape``): :func:`FastMath` rewrites only operator calls.
"""
from __future__ import annotations

from edge_sparse.util import rewrite_functions

import warnings

__all__ = ["ConvertConvLayout", "SplitWeightPrepack", "FastMath", "PREPACK_ANNOTATION"]

PREPACK_ANNOTATION = "meta_schedule.layout_rewrite_preproc"


def _calls_ops(func, names: set[str]) -> bool:
    from tvm import relax
    from tvm.ir import Op

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, Op) and e.op.name in names:
            found.append(e.op.name)

    relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def ConvertConvLayout(desired_layouts: dict[str, list[str]]):
    """``relax.transform.ConvertLayout(desired_layouts)`` on the Relax functions that call one of its ops.

    A function that holds such an op and an op whose layout inference fails (a CNN that also uses ``stack``) keeps
    its layout, with a warning: its convolutions then run in the model's own layout (correct, slower)."""
    import tvm
    from tvm import relax

    ops = set(desired_layouts)

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.ConvertConvLayout")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or not _calls_ops(func, ops):
                continue
            sub = tvm.IRModule({g: f for g, f in mod.functions_items()
                                if g.same_as(gv) or not isinstance(f, relax.Function)}, attrs=mod.attrs)
            try:
                converted = relax.transform.ConvertLayout(desired_layouts)(sub)
            except Exception as e:  # noqa: BLE001 - (InternalError or ValueError) TVM cannot infer some op's layout
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
                warnings.warn(f"{gv.name_hint}: channels-last conversion skipped, TVM's ConvertLayout failed "
                              f"({reason}); its convolutions keep the model's layout", stacklevel=1)
                continue
            for g, f in converted.functions_items():
                mod[g] = f
        return mod

    return _pass


def _has_prepack(func) -> bool:
    free = func.attrs.get("layout_free_buffers", []) if func.attrs else []
    return bool(len(free)) and PREPACK_ANNOTATION in func.script()


def SplitWeightPrepack():
    """``relax.transform.SplitLayoutRewritePreproc`` over the PrimFuncs that hold a weight-repacking block."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.SplitWeightPrepack")
    def _pass(mod, _ctx):
        untouched = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and not _has_prepack(f)}
        if len(untouched) == sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items()):
            return mod
        sub = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in untouched}, attrs=mod.attrs)
        out = relax.transform.SplitLayoutRewritePreproc()(sub)
        for gv, f in untouched.items():
            out[gv] = f
        return out

    return _pass


def FastMath():
    """exp / erf / tanh / softmax as TOPI's fast approximations (what ``relax.transform.FastMathTransform`` does),
    for operator calls only."""
    import tvm
    from tvm import relax, topi
    from tvm.ir import Op

    fast = {
        "relax.nn.softmax": lambda bb, call: bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis),
        "relax.exp": lambda bb, call: bb.call_te(topi.fast_exp, call.args[0]),
        "relax.erf": lambda bb, call: bb.call_te(topi.fast_erf, call.args[0]),
        "relax.tanh": lambda bb, call: bb.call_te(topi.fast_tanh, call.args[0]),
    }

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            if isinstance(call.op, Op) and call.op.name in fast:
                return fast[call.op.name](self.builder_, call)
            return super().visit_call_(call)

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.FastMath")
    def _pass(mod, _ctx):
        return rewrite_functions(_Rewriter(mod), mod)

    return _pass
