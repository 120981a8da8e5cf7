"""NVML energy per inference of a CUDA-compiled model (issue 8's GPU check), reproducible in two steps.

1. Here (no GPU needed): ``python benchmarks/cuda_nvml.py build OUT`` compiles a synthetic MLP (x [1,128,384],
   384->1536->384 twice) with TVM's default CUDA pipeline (``{"kind": "cuda", "arch": "sm_90"}``) into an artifact
   directory ``OUT/mlp_cuda`` (the ``cuda`` family, preset ``cuda-h100``) and writes ``OUT/mlp_big.onnx`` for the onnxruntime
   baseline. The exported library carries CUDA C; the CUDA loader compiles it with NVRTC when it is loaded.
2. On the GPU machine, with TVM's runtime only (the wheel without ``libtvm_compiler.so``, ``TVM_USE_RUNTIME_LIB=1``)
   or the full wheel: ``python benchmarks/cuda_nvml.py bench OUT/mlp_cuda --energy nvml --warmup 50 --min-seconds 5
   --compare OUT/mlp_big.onnx --json r.json`` -- any ``edge-sparse bench`` options. It loads the CUDA runtime
   sidecar and gives NVRTC the GPU's arch directly (TVM's default callback asks the compiler library for the
   current target, which a runtime-only install lacks), then runs ``edge-sparse bench``.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["build", "device_bench"]


def build(out: Path, arch: str = "sm_90") -> Path:
    """Compile the synthetic MLP for the ``cuda-h100`` preset (``arch`` overrides its ``sm_90``) with the public
    compile API: the CUDA family's pipeline, a manifest like any other artifact's."""
    import dataclasses

    from edge_sparse import compile, targets
    from edge_sparse.models import synthetic

    out.mkdir(parents=True, exist_ok=True)
    art = out / "mlp_cuda"
    onnx_path = out / "mlp_big.onnx"
    synthetic.save(synthetic.mlp(batch=1, seq=128, d_in=384, hidden=1536, d_out=384, layers=2), onnx_path)
    base = targets.get("cuda-h100")
    preset = dataclasses.replace(base, name=f"cuda-{arch}", target={**base.target, "arch": arch},
                                 source="benchmarks/cuda_nvml.py")
    compile(onnx_path, preset, art, sparse="off")
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
