"""The seams of docs/architecture.md hold: a target family defined here, outside targets/, compiles, runs and
benchmarks a model through the public API alone; no module outside targets/ (or a pruning method's own module)
names a family or a method."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_sparse import targets
from edge_sparse.targets.cpu import CPUFamily

ROOT = Path(__file__).resolve().parents[1]


class SecondCPU(CPUFamily):
    """A family under another name, with its own kernel names and energy meters (none: bench estimates)."""

    name = "test-second-cpu"
    description = "a CPU family defined in the tests"
    energy_meters = ()

    def kernel_name(self, spec, preset) -> str:
        return "second_" + super().kernel_name(spec, preset)


@pytest.fixture(scope="module")
def second_family():
    fam = targets.register_family(SecondCPU())
    yield fam
    targets.family._FAMILIES.pop(fam.name, None)


def test_a_family_defined_outside_targets_compiles_runs_and_benchmarks(second_family, tmp_path):
    from edge_sparse import bench, compile, load, prune
    from edge_sparse.models import synthetic

    src = tmp_path / "mlp.onnx"
    synthetic.save(synthetic.mlp(seq=4, d_in=64, hidden=128, d_out=64, seed=3), src)
    pruned = tmp_path / "mlp-pruned.onnx"
    prune(src, pruned, sparsity=0.8, pattern="16x1", default_skips=False, quiet=True)
    preset = dataclasses.replace(targets.get("host"), name="host-second", family=second_family.name)

    man = compile(pruned, preset, tmp_path / "art", sparse="bsr16x1", quiet=True)
    assert man["target"]["family"] == "test-second-cpu"
    kernels = {layer["kernel"] for layer in man["layers"] if layer["format"] != "dense"}
    assert kernels and all(k.startswith("second_") for k in kernels), man["layers"]

    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 64)).astype(np.float32)}
    got = load(tmp_path / "art").run(x)
    ref = ort.InferenceSession(str(pruned), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(next(iter(got.values())), ref, rtol=1e-4, atol=1e-4)

    result = bench(tmp_path / "art", repeat=5, warmup=1, inputs=x, energy="auto", quiet=True)
    run = result["runs"][0]
    assert run["latency"]["count"] == 5 and run["latency"]["median_ms"] > 0
    assert result["device"]["family"] == "test-second-cpu"
    assert run["energy"]["source"] == "estimate"           # the family names no meters


# What a family or method name looks like where code branches on it (not in prose or unrelated dict keys).
_FAMILY_BRANCH = re.compile(r"""(family\W{0,3}(==|!=|in\b)[^\n]*["'](cpu|opencl|cuda)["'])"""
                            r"""|(["'](cpu|opencl|cuda|aarch64)["']\s*(==|!=))|((==|!=)\s*["'](cpu|opencl|cuda|aarch64)["'])"""
                            r"""|\.family\s*(==|!=)|family_module""")
_METHOD_NAME = re.compile(r"wanda", re.IGNORECASE)


def _sources():
    for top in ("edge_sparse", "passes", "models", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_no_family_or_method_names_outside_their_modules():
    family_hits, method_hits = [], []
    for rel, text in _sources():
        for n, line in enumerate(text.splitlines(), 1):
            if _FAMILY_BRANCH.search(line) and "torch." not in line:   # (PyTorch's devices are not families)
                family_hits.append(f"{rel}:{n}: {line.strip()}")
            if rel != "passes/methods/wanda.py" and _METHOD_NAME.search(line):
                method_hits.append(f"{rel}:{n}: {line.strip()}")
    assert not family_hits, "\n".join(family_hits)
    assert not method_hits, "\n".join(method_hits)


def test_cuda_family_compiles_and_the_runtime_opens_its_device(tmp_path):
    """CUDA is a family like the others: compiled through the public API (no GPU needed to compile), its artifact
    asks the runtime for a CUDA device (this machine has none: one clear error), and bench's energy auto mode
    tries the family's meter (NVML)."""
    import tvm

    from edge_sparse import compile, load
    from edge_sparse.errors import UserError
    from edge_sparse.models import synthetic

    src = tmp_path / "mlp.onnx"
    synthetic.save(synthetic.mlp(seq=4, d_in=32, hidden=64, d_out=32, seed=1), src)
    man = compile(src, "cuda-h100", tmp_path / "art", quiet=True)
    assert man["target"]["family"] == "cuda" and man["library"] == "model.so"
    assert all(layer["format"] == "dense" for layer in man["layers"])
    assert targets.family_of(targets.get("cuda-h100")).energy_meters == ("nvml",)
    if tvm.cuda(0).exist:                               # pragma: no cover - GPU hosts
        load(tmp_path / "art").run({"x": np.zeros((1, 4, 32), np.float32)})
    else:
        with pytest.raises(UserError, match="no cuda device"):
            load(tmp_path / "art")
