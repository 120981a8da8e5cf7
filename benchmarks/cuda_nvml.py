"""NVML energy per inference of a CUDA-compiled model (issue 8's GPU check), reproducible in two steps.

1. Here (no GPU needed): ``python benchmarks/cuda_nvml.py build OUT`` compiles a synthetic MLP (x [1,128,384],
   384->1536->384 twice) with TVM's default CUDA pipeline (``{"kind": "cuda", "arch": "sm_90"}``) into an artifact
   directory ``OUT/mlp_cuda`` (manifest family ``cuda``) and writes ``OUT/mlp_big.onnx`` for the onnxruntime
   baseline. The exported library carries CUDA C; the CUDA loader compiles it with NVRTC when it is loaded.
2. On the GPU machine, with TVM's runtime only (the wheel without ``libtvm_compiler.so``, ``TVM_USE_RUNTIME_LIB=1``)
   or the full wheel: ``python benchmarks/cuda_nvml.py bench OUT/mlp_cuda --energy nvml --warmup 50 --min-seconds 5
   --compare OUT/mlp_big.onnx --json r.json`` -- any ``edge-sparse bench`` options. It loads the CUDA runtime
   sidecar and gives NVRTC the GPU's arch directly (TVM's default callback asks the compiler library for the
   current target, which a runtime-only install lacks), then runs ``edge-sparse bench``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["build", "device_bench"]


def build(out: Path, arch: str = "sm_90") -> Path:
    import tvm
    import tvm_ffi
    from tvm.relax.frontend.onnx import from_onnx

    from edge_sparse.artifact import sha256_file
    from edge_sparse.intake import load_model
    from edge_sparse.models import synthetic

    out.mkdir(parents=True, exist_ok=True)
    art = out / "mlp_cuda"
    if art.exists():
        raise SystemExit(f"error: {art} exists; remove it first")
    onnx_path = out / "mlp_big.onnx"
    synthetic.save(synthetic.mlp(batch=1, seq=128, d_in=384, hidden=1536, d_out=384, layers=2), onnx_path)
    intake = load_model(onnx_path)
    mod = from_onnx(intake.model, {i.name: i.shape for i in intake.inputs}, keep_params_in_input=False)
    target = {"kind": "cuda", "arch": arch}
    host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target=tvm.target.Target(target, host=host))
    seconds = time.perf_counter() - t0
    tmp = out / f".mlp_cuda.tmp-{os.getpid()}"
    tmp.mkdir()
    ex.export_library(str(tmp / "model.so"))
    manifest = {
        "schema_version": 1, "tool": {"name": "edge-sparse", "version": "0.1.0"},
        "tvm": {"version": tvm.__version__, "ffi_version": tvm_ffi.__version__},
        "target": {"name": f"cuda-{arch}", "description": "NVIDIA GPU, TVM's default CUDA pipeline (dlight rules)",
                   "family": "cuda", "arch": "x86_64", "target": target, "host": host,
                   # nominal H100 figures for the estimate only; NVML measures the real thing
                   "device": {"cores": 16, "idle_watts": 70.0, "active_watts_per_core": 5.0, "gpu_active_watts": 300.0},
                   "link": {"kind": "host"}, "source": "benchmarks/cuda_nvml.py"},
        "library": "model.so",
        "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in intake.inputs],
        "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": o.dtype} for o in intake.outputs],
        "source_model": {"name": onnx_path.name, "sha256": intake.source_sha256},
        "layers": [],
        "files": {"model.so": {"sha256": sha256_file(tmp / "model.so"), "bytes": (tmp / "model.so").stat().st_size}},
        "compile": {"seconds": round(seconds, 2), "sparse": "off", "threads": None, "tuning_db": None},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, art)
    print(f"{art}: CUDA artifact for {arch}; baseline model {onnx_path}")
    return art


def device_bench(argv: list[str]) -> None:
    import ctypes

    import tvm
    import tvm_ffi

    sidecar = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if sidecar.exists():  # registers the CUDA device API and module loader (the runtime-only import skips it)
        ctypes.CDLL(str(sidecar), mode=ctypes.RTLD_GLOBAL)
    if not tvm.cuda(0).exist:
        raise SystemExit("error: TVM finds no CUDA GPU (is libcudart on LD_LIBRARY_PATH?)")
    from tvm.support import nvcc

    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _cuda_compile(code):
        return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")

    from edge_sparse.cli import main

    main(["bench", *argv])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "build":
        build(Path(sys.argv[2]), *(sys.argv[3:4]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "bench":
        device_bench(sys.argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
