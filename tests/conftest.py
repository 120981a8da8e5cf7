"""Shared fixtures: synthetic ONNX models on disk, a CLI runner, artifact builders cached per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TVM_BIND_THREADS", "0")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def synthetic_models(model_dir) -> dict[str, Path]:
    """mlp / cnn / transformer ONNX files (small enough to compile in seconds)."""
    from edge_sparse.models import synthetic

    built = {
        "mlp": synthetic.mlp(seq=32, d_in=128, hidden=256, d_out=64, layers=2),
        "cnn": synthetic.cnn(),
        "transformer": synthetic.transformer_block(seq=32),
    }
    paths = {}
    for name, m in built.items():
        paths[name] = model_dir / f"{name}.onnx"
        synthetic.save(m, paths[name])
    return paths


def ort_run(model_path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


def invoke(args, **kw):
    """Run the CLI in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from edge_sparse.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], **kw)
