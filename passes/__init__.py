"""Graph passes, one module per pass; the names below are the public facade (imported lazily, so pruning does not
load TVM and compiling does not load onnx-ir).

ONNX (onnx-ir ``InPlacePass`` classes, chained with ``onnx_ir.passes.Sequential``):
- :class:`PruneWeights`, :class:`AnnotateSparsity` (``prune.py``) with a pruning method from :mod:`.methods`.

Relax (TVM module passes):
- :class:`Sparsify` (``sparsify.py``): pruned constant weights -> the target family's sparse kernels.
- :func:`rewrite_qdq` (``qdq.py``): quantized matmuls -> int8 kernels; :func:`bound_takes` (``bounded_take.py``).
"""
from __future__ import annotations

_LAZY = {
    "PruneWeights": "prune", "AnnotateSparsity": "prune", "find_prunable_layers": "prune",
    "Sparsify": "sparsify", "rewrite_qdq": "qdq", "bound_takes": "bounded_take",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
