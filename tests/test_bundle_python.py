"""On-device Python: ``edge_sparse.runtime`` loads and runs an artifact with only numpy and the TVM runtime importable.

A subprocess blocks onnx, onnxruntime, click, torch and the rest of edge_sparse's build-side modules at import time,
then runs a host artifact and compares it with onnxruntime (run in this process; atol/rtol 1e-4). A clean venv with
just ``pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy`` was checked by hand the same way
(docs/deploy.md).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ort_run

BLOCKER = r"""
import sys, importlib.abc
BLOCKED = {"onnx", "onnxruntime", "onnx_ir", "click", "torch", "transformers", "xgboost"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED or name in ("edge_sparse.compiler", "edge_sparse.intake", "edge_sparse.cli"):
            raise ImportError(f"blocked on the device: {name}")
        return None
sys.meta_path.insert(0, Block())
import numpy as np
import edge_sparse.runtime as rt
m = rt.load(sys.argv[1])
x = np.load(sys.argv[2])["x"]
np.save(sys.argv[3], m.run({"x": x})["y"])
"""


@pytest.mark.slow
def test_runtime_needs_only_numpy_and_tvm(tmp_path):
    from edge_sparse import compiler
    from edge_sparse.models import synthetic

    onnx_path = tmp_path / "mlp.onnx"
    synthetic.save(synthetic.mlp(seq=3, d_in=16, hidden=32, d_out=8, seed=4), onnx_path)
    compiler.compile(str(onnx_path), "host", tmp_path / "art", sparse="off", force=True, quiet=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(tmp_path / "art"), str(tmp_path / "in.npz"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ort_run(onnx_path, {"x": x})[0], rtol=1e-4, atol=1e-4)
