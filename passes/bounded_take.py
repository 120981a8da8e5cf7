"""Bounded gathers: every ``relax.take`` in fast mode becomes ``mode="clip"``.

TVM's ONNX importer lowers Gather to ``take(..., mode="fast")``, which reads memory at whatever index arrives: an
out-of-range token id read garbage or segfaulted (TVM warns: "Fast mode segfaults when there are out-of-bounds
indices"). Clipping costs one min/max per index and makes an out-of-bounds read impossible in generated code; the
runtime additionally rejects out-of-range integer inputs where the manifest records their range
(:func:`edge_sparse.intake.index_ranges`), so a bad id is an error, not a silently clipped answer.
"""
from __future__ import annotations

__all__ = ["bound_takes"]


def _make_mutator():
    import tvm
    from tvm import relax

    take_op = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class _BoundTakes(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.changed = 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(take_op) and str(call.attrs.mode) == "fast":
                self.changed += 1
                axis = call.attrs.axis
                return relax.op.take(call.args[0], call.args[1], None if axis is None else int(axis), mode="clip")
            return call

        def transform(self):
            for gv, func in self.mod_.functions_items():
                if isinstance(func, relax.Function):
                    self.builder_.update_func(gv, self.visit_expr(func))
            return self.builder_.get()

    return _BoundTakes


def bound_takes(mod):
    """``mod`` with every fast-mode ``take`` clipped to its axis (no out-of-bounds read is possible)."""
    return _make_mutator()(mod).transform()
