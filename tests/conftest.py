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


def start_process_group(args: list[str]) -> "subprocess.Popen":
    """``python -m ARGS`` in a new session: TVM's rpc_server/rpc_tracker serve from a child (tvm.exec.popen_worker)
    that outlives a terminated parent; :func:`stop_process_group` ends the whole group."""
    import subprocess
    import sys

    env = dict(os.environ, TVM_BIND_THREADS="0")
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def stop_process_group(proc) -> None:
    """SIGTERM to the process group this test started (then SIGKILL), and wait for the leader."""
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:                                    # the leader is gone; the group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
    if proc.poll() is None:
        proc.wait()
