"""edge-sparse: prune ONNX models and compile them with sparse kernels for ARM CPUs and mobile GPUs.

The top-level names are imported lazily, so that ``import edge_sparse.runtime`` on a device needs only numpy and
the TVM runtime (no onnx, onnxruntime or click).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compile": ("edge_sparse.compiler", "compile"),
    "load": ("edge_sparse.runtime", "load"),
    "prune": ("edge_sparse.pruning", "prune"),
    "quantize": ("edge_sparse.quantization", "quantize"),
    "analyze": ("edge_sparse.pruning", "analyze"),
    "bench": ("edge_sparse.benchmark", "bench"),
    "tune": ("edge_sparse.tuning", "tune"),
    "UserError": ("edge_sparse.errors", "UserError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'edge_sparse' has no attribute {name!r}")
