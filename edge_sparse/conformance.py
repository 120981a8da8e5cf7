"""ONNX backend node tests as a conformance suite: fetch the data, pick the eligible cases, run one case.

ONNX ships a conformance suite nobody on this team wrote: ``onnx/backend/test/data/node/test_*`` (``model.onnx`` and
``test_data_set_*/{input,output}_*.pb``). Current onnx wheels no longer carry the data; the ``onnx==1.14.1`` wheel
does (1,168 cases), so :func:`node_tests_dir` fetches that wheel with pip (a pinned file, checked by sha256) and
unpacks only the node-test folders into the cache (``$EDGE_SPARSE_NODE_TESTS``, else
``$EDGE_SPARSE_CACHE/onnx-node-tests-1.14.1`` or ``~/.cache/edge-sparse/...``). Nothing of it is committed.

A case is *eligible* (see :func:`eligibility`) when its model passes the ONNX checker, it has exactly one data set,
every graph input is a tensor of float32, int64 or bool with a fully static declared shape (rank 0 included) that
matches its data, and every graph output is a tensor. Each eligible case is compiled for a target through the
public ``compile`` API, run, and compared with the expected outputs (``RTOL``/``ATOL``, NaNs in the same places,
integer and bool outputs exactly); the same case through TVM's own importer and default pipeline is the baseline.

Outcomes: ``pass``, ``mismatch`` (ran, wrong numbers or shapes), ``unsupported`` (intake refused the model: one
:class:`UserError` line, what the user sees from the CLI), ``error`` (TVM failed after intake, reported as one
:class:`CompileError` line by the compile boundary) and ``crash`` (any other exception: a traceback, kept for the
report).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_sparse.errors import CompileError, UserError

__all__ = ["ONNX_VERSION", "RTOL", "ATOL", "Case", "node_tests_dir", "list_cases", "load_case", "eligibility",
           "compare", "run_ours", "run_tvm", "run_qemu", "Outcome"]

ONNX_VERSION = "1.14.1"
# One fixed wheel (the data is the same in every platform's wheel): every machine unpacks the same bytes.
_WHEEL = "onnx-1.14.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
_WHEEL_SHA256 = "4b9cd91b85cfbb0d6478f4a1a0aee4d95cf8839adc48c69130a0cf8452f21db4"
_PREFIX = "onnx/backend/test/data/node/"
RTOL = 1e-3
ATOL = 1e-4
INPUT_DTYPES = ("float32", "int64", "bool")


# ------------------------------------------------------------------------------------------------------ the data
def _cache_root() -> Path:
    from edge_sparse.bundle import cache_dir

    return cache_dir() / f"onnx-node-tests-{ONNX_VERSION}"


def _safe_member(name: str) -> str | None:
    """Path of a wheel member below the node-test prefix, or None (other members, absolute or '..' paths)."""
    if not name.startswith(_PREFIX) or name.endswith("/"):
        return None
    rel = name[len(_PREFIX):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        return None
    return rel


def node_tests_dir(*, quiet: bool | None = None) -> Path:
    """The folder holding the ``test_*`` node-test cases; fetched with pip and unpacked on first use."""
    from edge_sparse.progress import Progress

    override = os.environ.get("EDGE_SPARSE_NODE_TESTS")
    if override:
        root = Path(override)
        if not any(root.glob("test_*/model.onnx")):
            raise UserError(f"EDGE_SPARSE_NODE_TESTS={root} holds no test_*/model.onnx; unset it to fetch the "
                            f"node tests of onnx=={ONNX_VERSION}")
        return root
    root = _cache_root()
    if (root / ".complete").is_file():
        return root
    from edge_sparse.util import atomic_dir, sha256_file

    progress = Progress(quiet)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".node-tests-wheel-", dir=root.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311", "--dest", tmp, "--quiet", f"onnx=={ONNX_VERSION}"]
        with progress.step(f"downloading onnx=={ONNX_VERSION} for its node tests (15 MB, once)"):
            proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / _WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["pip found no such wheel"])[-1]
            raise UserError(f"could not download onnx=={ONNX_VERSION} for its node tests: {last}; check the network, "
                            f"or unpack {_PREFIX} of that wheel yourself and set EDGE_SPARSE_NODE_TESTS to it")
        digest = sha256_file(wheel)
        if digest != _WHEEL_SHA256:
            raise UserError(f"{_WHEEL} has sha256 {digest}, expected {_WHEEL_SHA256}; refusing to unpack it")
        with progress.step("unpacking the node tests"), atomic_dir(root) as data, zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                rel = _safe_member(info.filename)
                if rel is not None:
                    dest = data / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(info))
            (data / ".complete").write_text(f"{_WHEEL} {_WHEEL_SHA256}\n")
    return root


# ------------------------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass
class Case:
    name: str
    dir: Path
    inputs: dict[str, np.ndarray]          # graph inputs (not initializers) by name, in graph order
    expected: dict[str, np.ndarray]        # graph outputs by name, in graph order

    @property
    def model(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def ops(self) -> list[str]:
        import onnx

        return sorted({n.op_type for n in onnx.load(str(self.model), load_external_data=False).graph.node})


def list_cases(root: Path | None = None) -> list[str]:
    root = root or node_tests_dir()
    return sorted(p.parent.name for p in root.glob("test_*/model.onnx"))


def _read_tensor(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def _data_sets(case_dir: Path) -> list[Path]:
    return sorted(p for p in case_dir.glob("test_data_set_*") if p.is_dir())


def eligibility(case_dir: Path) -> str | None:
    """None when the case is eligible, else the reason it is not (see the module docstring)."""
    import onnx

    try:
        model = onnx.load(str(case_dir / "model.onnx"))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - any failure to load makes the case ineligible, with its reason
        return f"model does not pass the ONNX checker ({type(e).__name__})"
    sets = _data_sets(case_dir)
    if len(sets) != 1:
        return f"{len(sets)} data sets"
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    files = sorted(sets[0].glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) != len(graph_inputs):
        return f"{len(files)} input files for {len(graph_inputs)} graph inputs"
    for vi, f in zip(graph_inputs, files):
        if vi.type.WhichOneof("value") != "tensor_type":
            return f"input '{vi.name}' is a {vi.type.WhichOneof('value')}, not a tensor"
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        if dtype is None or np.dtype(dtype).name not in INPUT_DTYPES:
            return f"input '{vi.name}' is {np.dtype(dtype).name if dtype is not None else 'untyped'}"
        if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
            return f"input '{vi.name}' has no static shape"
        try:
            data = _read_tensor(f)
        except Exception as e:  # noqa: BLE001 - a data file that is not a tensor (sequence, optional)
            return f"{f.name} is not a tensor ({type(e).__name__})"
        if tuple(d.dim_value for d in tt.shape.dim) != data.shape:
            return f"input '{vi.name}' declares {[d.dim_value for d in tt.shape.dim]}, data is {list(data.shape)}"
    for vo in model.graph.output:
        if vo.type.WhichOneof("value") != "tensor_type":
            return f"output '{vo.name}' is a {vo.type.WhichOneof('value')}, not a tensor"
    outs = sorted(sets[0].glob("output_*.pb"))
    if len(outs) != len(model.graph.output):
        return f"{len(outs)} output files for {len(model.graph.output)} graph outputs"
    return None


def load_case(name: str, root: Path | None = None) -> Case:
    import onnx

    case_dir = (root or node_tests_dir()) / name
    model = onnx.load(str(case_dir / "model.onnx"))
    ds = _data_sets(case_dir)[0]
    inits = {i.name for i in model.graph.initializer}
    in_names = [i.name for i in model.graph.input if i.name not in inits]
    out_names = [o.name for o in model.graph.output]

    def read(prefix, names):
        files = sorted(ds.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        return {n: _read_tensor(f) for n, f in zip(names, files)}

    return Case(name, case_dir, read("input", in_names), read("output", out_names))


# ------------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class Outcome:
    status: str                      # pass | mismatch | unsupported | error | crash
    detail: str = ""                 # mismatch: what differs; unsupported/error: the error line; crash: last line
    traceback: str | None = None     # crash only
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {"status": self.status, "detail": self.detail, "seconds": round(self.seconds, 2)}
        if self.traceback:
            d["traceback"] = self.traceback
        return d


def compare(got: dict[str, np.ndarray] | list[np.ndarray], case: Case) -> str | None:
    """None when every output matches (floats within RTOL/ATOL with NaNs in place, others exactly), else why not."""
    got_list = list(got.values()) if isinstance(got, dict) else list(got)
    if len(got_list) != len(case.expected):
        return f"{len(got_list)} outputs, expected {len(case.expected)}"
    for (name, want), have in zip(case.expected.items(), got_list):
        have = np.asarray(have)
        if have.shape != want.shape:
            return f"output '{name}': shape {list(have.shape)}, expected {list(want.shape)}"
        if want.dtype.kind in "fc":
            if not np.allclose(have.astype(np.float64), want.astype(np.float64), rtol=RTOL, atol=ATOL,
                               equal_nan=True):
                err = np.abs(have.astype(np.float64) - want.astype(np.float64))
                return f"output '{name}': max abs error {np.nanmax(err) if err.size else 0:.3g}"
        elif not np.array_equal(have.astype(want.dtype), want):
            return f"output '{name}': {int((have.astype(want.dtype) != want).sum())} of {want.size} values differ"
        elif have.dtype != want.dtype and not (have.dtype.kind == want.dtype.kind):
            return f"output '{name}': dtype {have.dtype}, expected {want.dtype}"
    return None


def _outcome(fn, case: Case) -> Outcome:
    import time

    t0 = time.perf_counter()
    try:
        got = fn()
    except CompileError as e:
        return Outcome("error", str(e), seconds=time.perf_counter() - t0)
    except UserError as e:
        return Outcome("unsupported", str(e), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - every other failure is a crash the report must show
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return Outcome("crash", f"{type(e).__name__}: {lines[-1][:300]}", traceback.format_exc(),
                       time.perf_counter() - t0)
    why = compare(got, case)
    return Outcome("mismatch" if why else "pass", why or "", seconds=time.perf_counter() - t0)


def run_ours(case: Case, work: Path, target: str = "host") -> Outcome:
    """The case through ``edge_sparse.compile`` (the public API) and ``edge_sparse.load`` on this machine."""
    from edge_sparse import compiler, runtime

    def go():
        out = Path(work) / f"{case.name}-{target}"
        compiler.compile(str(case.model), target, out, force=True, quiet=True)
        return runtime.load(out).run(case.inputs)

    return _outcome(go, case)


def run_tvm(case: Case) -> Outcome:
    """The baseline: TVM's ONNX importer and default pipeline (``tvm.compile`` for ``llvm``), run by the Relax VM."""

    def go():
        import onnx
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        model = onnx.load(str(case.model))
        shapes = {k: list(v.shape) for k, v in case.inputs.items()}
        dtypes = {k: str(v.dtype) for k, v in case.inputs.items()}
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
        ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        dev = tvm.cpu(0)
        vm = relax.VirtualMachine(ex, dev)
        res = vm["main"](*[tvm.runtime.tensor(v, dev) for v in case.inputs.values()])
        flat = [res] if hasattr(res, "numpy") else list(res)
        return [r.numpy() for r in flat]

    return _outcome(go, case)


QEMU = ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu")


def run_qemu(case: Case, work: Path, target: str = "rpi4") -> Outcome:
    """The case compiled for an aarch64 preset as a bundle, run by the bundle's runner under qemu-aarch64."""
    from edge_sparse import compiler

    def go():
        out = Path(work) / f"{case.name}-{target}"
        compiler.compile(str(case.model), target, out, force=True, quiet=True, bundle=True)
        inputs, outputs = Path(work) / f"{case.name}-inputs.npz", Path(work) / f"{case.name}-outputs.npz"
        np.savez(inputs, **case.inputs)
        args = [str(out), "-o", str(outputs)] + (["-i", str(inputs)] if case.inputs else [])
        proc = subprocess.run([*QEMU, str(out / "bin" / "edge-sparse-run"), *args], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"runner under qemu exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        with np.load(outputs, allow_pickle=False) as z:
            return [z[n] for n in case.expected]

    return _outcome(go, case)


if __name__ == "__main__":  # pragma: no cover - fetch the data from a shell: python -m edge_sparse.conformance
    print(node_tests_dir())
