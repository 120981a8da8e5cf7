"""OpenCL family (Adreno and Mali mobile GPUs): Relax pipeline, sparse GPU kernels, linking of the aarch64 host code.

``FAMILY`` is its :class:`~edge_sparse.targets.family.TargetFamily`.

Dense operators go through TVM's own GPU pipelines: for ``device = "adreno"`` the Adreno pipeline (dlight adreno
Conv2d/LayoutTransform/Pool2D rules, then dlight gpu rules; we add gpu Matmul to its Reduction/
GeneralReduction/Fallback, see ``_adreno_pipeline``), for everything else (Mali) the generic GPU pipeline (dlight gpu
Matmul/GEMV/Reduction/GeneralReduction/Fallback). The Adreno "texture" key variant is refused: it crashes or miscompiles CNNs with the
pinned TVM (TVM_NOTES). Sparse kernels (``targets.opencl.kernels``) arrive already scheduled (thread bindings,
``tirx.is_scheduled``), so dlight leaves them alone, and ``AnnotateTIROpPattern`` marks them opaque so fusion does too.

TVM's PyPI runtime has no OpenCL: the executables built here cannot run on this machine. ``edge_sparse.targets.opencl.check``
replays their OpenCL kernels on a real OpenCL runtime (PoCL, or a GPU's driver) through pyopencl (``check``).
"""
from __future__ import annotations

from pathlib import Path

from edge_sparse.errors import UserError
from edge_sparse.targets.family import TargetFamily

__all__ = ["OpenCLFamily", "FAMILY", "build", "export", "make_sparse_kernel", "relax_pipeline"]


def relax_pipeline(preset, *, tuning_db=None):
    """The Relax pipeline for this preset: TVM's generic GPU pipeline, or for Adreno TVM's Adreno pipeline whose
    dlight stage also gets the gpu Matmul rule (see ``_adreno_pipeline``)."""
    from tvm import relax

    target = preset.tvm_target()
    if "texture" in target.keys:
        raise UserError(f"target '{preset.name}': the Adreno 'texture' variant is not supported with TVM 0.27 "
                        f"(it crashes in conv2d legalisation); drop 'texture' from the target keys")
    if "adreno" in target.keys:
        return _adreno_pipeline(target)
    return relax.pipeline.get_default_pipeline(target)


def _adreno_pipeline(target):
    """TVM 0.27's Adreno pipeline (non-texture path: same passes, same order) with dlight's gpu Matmul rule ahead of
    its Reduction/GeneralReduction/Fallback rules.

    TVM's own Adreno pipeline schedules dense matmuls and 1x1 convs with the Reduction/Fallback rules (no tiling).
    Through NVIDIA's OpenCL on an H100 (not a mobile GPU; benchmarks/results/opencl_nvidia_h100.json), a 128x768x3072
    matmul took 2130 us that way and 240 us with the Matmul rule; 128x3072x768 2244 -> 713 us; a 256->256 1x1 conv on
    28x28 401 -> 151 us. Not yet measured on an Adreno GPU.
    The gpu GEMV rule is left out on purpose: on this pipeline it miscompiled PP-OCR cls's squeeze-excitation block
    (the fused 1x1 conv * broadcast multiply wrote 576 of its 9216 outputs; found by edge_sparse.targets.opencl.check).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.adreno import pipeline as adreno
    from tvm.s_tir import dlight as dl

    legalize = [
        tvm.tirx.transform.BindTarget(target),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        relax.transform.Normalize(),
        dl.ApplyDefaultSchedule(dl.adreno.Conv2d(), dl.adreno.LayoutTransform(), dl.adreno.Pool2D()),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
    ]

    @tvm.transform.module_pass(opt_level=0, name="EdgeSparseAdrenoPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(adreno.library_dispatch_passes(target) + legalize
                                           + adreno.dataflow_lower_passes(target) + adreno.finalize_passes(target))
            return seq(mod)

    return _pipeline


def build(mod, preset, *, tuning_db=None):
    """Compile a Relax module (after the sparsify pass) for an OpenCL preset.

    Instruments of the surrounding ``PassContext`` are kept, so ``edge_sparse.targets.opencl.check`` can watch the passes.
    ``tuning_db`` is accepted for interface parity; the GPU families use dlight's default schedules (no tuning).
    """
    import tvm

    target = preset.tvm_target()
    outer = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=3, config=dict(outer.config), instruments=list(outer.instruments)):
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(preset, tuning_db=tuning_db))


def make_sparse_kernel(spec, preset):
    """The GPU PrimFunc for a sparse layer described by ``spec`` (edge_sparse.formats.KernelSpec), or None."""
    from edge_sparse.targets.opencl import kernels

    return kernels.make_sparse_kernel(spec, preset)


def export(ex, out_dir: Path, preset) -> str:
    """Link the executable's aarch64 host code (the OpenCL source is embedded) into ``out_dir``, as the CPU family
    links (mali: ``cross``; adreno: ``ndk``). Where no NDK was found (``model.tar``), ``LINK.txt`` says how to link."""
    from edge_sparse.targets.cpu import export as link_host_code

    name = link_host_code(ex, out_dir, preset)
    if name == "model.tar":
        api = int(preset.link.get("api_level", 28))
        link = (f"mkdir -p objs && tar -xf model.tar -C objs && "
                f"$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android{api}-clang++ "
                f"-shared -fPIC -o model.so objs/*.o -lm")
        (Path(out_dir) / "LINK.txt").write_text(
            "ANDROID_NDK_HOME was not set when this artifact was compiled, so the aarch64 host objects are in\n"
            "model.tar. Link them on a machine with the Android NDK (r23 or newer), in this directory:\n\n"
            f"    {link}\n\nthen set \"library\": \"model.so\" in manifest.json (or recompile with ANDROID_NDK_HOME set).\n")
    return name


class OpenCLFamily(TargetFamily):
    """Mobile GPUs through OpenCL. The cost model's efficiencies are estimates until measured on a mobile GPU; peak
    flops come from the preset's ``gpu_gflops``. Kernels cannot be timed here (TVM's PyPI runtime has no OpenCL)."""

    name = "opencl"
    description = "OpenCL mobile GPUs (Adreno, Mali): TVM's GPU pipelines and our sparse GPU kernels"
    calibration = {
        "gemv": {"dense": 1.0, "bsr16x1": 0.8, "bsr8x1": 0.7, "bsr4x1": 0.5, "csr": 0.2, "2:4": 0.4},
        "gemm": {"dense": 0.5, "bsr16x1": 0.3, "bsr8x1": 0.25, "bsr4x1": 0.2, "csr": 0.05, "2:4": 0.1},
    }
    offloads = True
    has_sparse_kernels = True

    def build(self, mod, preset, *, tuning_db=None):
        return build(mod, preset, tuning_db=tuning_db)

    def export(self, ex, out_dir, preset) -> str:
        return export(ex, out_dir, preset)

    def make_sparse_kernel(self, spec, preset):
        return make_sparse_kernel(spec, preset)

    def peak_flops_per_us(self, preset) -> float:
        return float(preset.device.get("gpu_gflops", 100.0)) * 1e3


FAMILY = OpenCLFamily()
