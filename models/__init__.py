"""Models: the zoo of real models (``get``, ``recipes``) and tiny synthetic builders (``synthetic``).

``edge_sparse.models.get("ppocr-rec")`` returns the path of a cached, sha256-checked ONNX file; see
:mod:`edge_sparse.models.zoo` for where each model comes from. ``edge_sparse.models.export`` (PyTorch -> ONNX)
needs the optional ``export`` extra (torch, onnxscript).
"""
from __future__ import annotations

from edge_sparse.models.zoo import Recipe, cache_root, get, recipes

__all__ = ["Recipe", "get", "recipes", "cache_root"]
