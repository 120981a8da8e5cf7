"""LLVM CPU family (x86-64 and AArch64): Relax pipeline, TIR pipeline, schedules, sparse kernels, linking, cost
model calibration, kernel timing and tuning. ``FAMILY`` is its :class:`~edge_sparse.targets.family.TargetFamily`.
"""
from __future__ import annotations

import os
from pathlib import Path

from edge_sparse.errors import UserError
from edge_sparse.formats import KERNEL_ATTR
from edge_sparse.targets.family import TargetFamily

__all__ = ["CPUFamily", "FAMILY", "build", "export", "make_sparse_kernel", "int8_kernels", "TIR_PIPELINE"]

# PrimFuncs carrying this attribute are hand-scheduled kernels (sparse kernels): the TIR pipeline compiles them with
# StorageRewrite disabled so that their small local accumulators stay in registers (TVM_NOTES: 5x in the prototype).
TIR_PIPELINE = "edge_sparse_cpu"


def _selective_tir_pipeline():
    import tvm
    from tvm import tirx
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    base, fin_host, fin_dev = default_s_tir_pipeline()

    @tvm.transform.module_pass(opt_level=0, name="EdgeSparseTIRPipeline")
    def _pipeline(mod, ctx):
        ours = {gv: f for gv, f in mod.functions_items()
                if isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs}
        rest = {gv: f for gv, f in mod.functions_items() if gv not in ours}
        out = {}
        if rest:
            out.update(dict(base(tvm.IRModule(rest, attrs=mod.attrs)).functions_items()))
        if ours:
            cfg = dict(ctx.config)
            cfg["tirx.disable_storage_rewrite"] = True
            with tvm.transform.PassContext(opt_level=ctx.opt_level, config=cfg):
                out.update(dict(base(tvm.IRModule(ours, attrs=mod.attrs)).functions_items()))
        return tvm.IRModule(out, attrs=mod.attrs)

    return _pipeline, fin_host, fin_dev


def make_sparse_kernel(spec, preset):
    """Sparse kernel PrimFunc for a ``edge_sparse.formats.KernelSpec`` (None keeps the layer dense): targets/cpu/sparse.py."""
    from edge_sparse.targets.cpu.sparse import make_sparse_kernel as _make

    return _make(spec, preset)


def int8_kernels(preset):
    """The int8 kernel set for ``preset`` (targets/cpu/int8.py): its ISA path, weight packing, kernel factories."""
    from edge_sparse.targets.cpu.int8 import Int8Kernels

    return Int8Kernels.for_preset(preset)


_REGISTERED = False


def _register_tir_pipeline() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from tvm.tirx.compilation_pipeline import register_tir_pipeline

        register_tir_pipeline(TIR_PIPELINE, _selective_tir_pipeline)
        _REGISTERED = True


# Convolutions are computed channels-last (NHWC data, HWIO weights): output channels are then the contiguous axis of
# both the output and the weights, so conv2d is a GEMM over (kh, kw, ci) that vectorises along channels, whatever the
# spatial size or stride. The weight transposes fold into the constants; the data transposes are cheap copies.
# conv1d likewise (NWC/WIO): in NCW its reduction ran along the contiguous axis, unvectorised (silero VAD's STFT conv
# took 0.2 ms; 0.01 ms channels-last).
CONV_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"], "relax.nn.conv1d": ["NWC", "WIO"],
                "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


def relax_passes(preset, *, tuning_db=None, lower: bool = True) -> list:
    """The passes of :func:`relax_pipeline` in order; ``lower=False`` stops after scheduling (for profiling)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edge_sparse.targets.cpu.guarded import ConvertConvLayout, FastMath, SplitWeightPrepack
    from edge_sparse.targets.cpu.rewrites import ChannelScaleIntoConv, ConvTransposeAsConv, VectorMathRewrite
    from edge_sparse.targets.cpu.schedules import ScheduleDense

    target = preset.tvm_target()
    passes = list(cpu.library_dispatch_passes(target))
    # sigmoid via exp (vectorised by FastMath below), Clip bounds as Relax ops (layout-transparent)
    passes += [VectorMathRewrite(), ConvTransposeAsConv(), ChannelScaleIntoConv()]
    # (the conversion transposes a tensor once per consumer: MobileNetV2's residual input was transposed twice)
    passes += [ConvertConvLayout(CONV_LAYOUTS), relax.transform.Normalize(), relax.transform.EliminateCommonSubexpr()]
    # exp/erf/tanh/softmax as polynomials that vectorise (LLVM turns vector exp into one libm call per lane)
    passes.append(FastMath())
    passes += list(cpu.legalize_passes(target))
    if tuning_db is not None:
        with target:  # the pass reads the current target when it is built
            passes.append(relax.transform.MetaScheduleApplyDatabase(str(tuning_db)))
    # constant weights may be repacked by the schedules (layout_free_buffers); the repacking is folded away
    passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    passes.append(ScheduleDense(preset))
    passes += [SplitWeightPrepack(), relax.transform.FoldConstant(),
               relax.transform.DeadCodeElimination()]
    if lower:
        passes += list(cpu.dataflow_lower_passes(target)) + list(cpu.finalize_passes(target))
    return passes


def relax_pipeline(preset, *, tuning_db=None):
    """The Relax pipeline for this preset: TVM's CPU phases with our schedule rules after fusion.

    library dispatch -> channels-last convs -> fast exp/erf/tanh -> legalize + fuse (TVM) -> [tuned schedules from
    ``tuning_db``] -> ``schedules.ScheduleDense`` for every PrimFunc still unscheduled -> weight repacking folded
    into the constants -> dataflow lowering + finalize (TVM).
    """
    import tvm

    target = preset.tvm_target()
    passes = relax_passes(preset, tuning_db=tuning_db)

    @tvm.transform.module_pass(opt_level=0, name="edge_sparse.CPURelaxPipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod, preset, *, tuning_db=None):
    """Compile a Relax module (after the sparsify pass) for a CPU preset."""
    import tvm

    _register_tir_pipeline()
    target = preset.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(preset, tuning_db=tuning_db),
                           tir_pipeline=TIR_PIPELINE)


def export(ex, out_dir: Path, preset) -> str:
    """Link the executable into ``out_dir``: ``model.so`` (host or cross g++) or ``model.tar`` (objects to link)."""
    from edge_sparse.targets import cross_compiler_or_error

    out_dir = Path(out_dir)
    kind = preset.link.get("kind", "host")
    if kind == "host":
        ex.export_library(str(out_dir / "model.so"))
        return "model.so"
    if kind == "cross":
        cxx = cross_compiler_or_error(preset)
        ex.export_library(str(out_dir / "model.so"), fcompile=_cross_compiler(cxx, preset))
        return "model.so"
    if kind == "ndk":
        ndk = os.environ.get("ANDROID_NDK_HOME")
        if ndk:
            from tvm.support import ndk as ndk_mod  # noqa: F401  (TVM's NDK helper reads TVM_NDK_CC)

            clang = _ndk_clang(Path(ndk), int(preset.link.get("api_level", 28)))
            ex.export_library(str(out_dir / "model.so"),
                              fcompile=_cross_compiler(str(clang), preset, options=["-shared", "-fPIC", "-lm"]))
            return "model.so"
        ex.export_library(str(out_dir / "model.tar"))
        return "model.tar"
    raise UserError(f"target '{preset.name}': unknown link kind '{kind}' (use host, cross or ndk)")


def _cross_compiler(cxx: str, preset, **kw):
    """TVM's cross compiler, answering the preset's target triple. TVM's own answer is the host compiler's triple
    (x86_64), which export_library uses for the packed-imports object of a module without compiled kernels (a model
    of only control flow and constants): the link then fails with "incompatible with aarch64 output"."""
    from tvm.support import cc

    fcompile = cc.cross_compiler(cxx, **kw)
    triple = preset.tvm_target().attrs.get("mtriple")
    if triple:
        fcompile.get_target_triple = lambda: str(triple)
    return fcompile


def _ndk_clang(ndk: Path, api: int) -> Path:
    cands = sorted(ndk.glob(f"toolchains/llvm/prebuilt/*/bin/aarch64-linux-android{api}-clang++"))
    if not cands:
        raise UserError(f"ANDROID_NDK_HOME={ndk} has no aarch64-linux-android{api}-clang++; point it at an NDK r23 or newer")
    return cands[0]


class CPUFamily(TargetFamily):
    """LLVM CPUs. Cost model calibration: the fraction of the preset's memory bandwidth (M = 1, weight streaming) or
    peak flops (M > 1) each kernel kind reaches, from benchmarks/sparse_kernels.py on the development host (x86-64
    AVX-512, its "calibration" output: sparse efficiency relative to the dense path; gemv 16x1 1.18, 8x1 1.22, 4x1
    0.90, csr 0.57, 2:4 0.37; gemm 16x1/8x1/4x1 0.66-0.68 over 50-90%, about 0.9 at 50% where the choice is close,
    csr 0.38, 2:4 0.24), capped at 1.0 for gemv (sparse weights that fit a cache level stream faster than the model's
    single bandwidth). AArch64 presets use the same ratios with their own bandwidth and peak flops."""

    name = "cpu"
    description = "LLVM CPUs (x86-64, AArch64): our dense schedule rules and sparse kernels"
    calibration = {
        "gemv": {"dense": 1.0, "bsr16x1": 1.0, "bsr8x1": 1.0, "bsr4x1": 0.9, "csr": 0.55, "2:4": 0.37},
        "gemm": {"dense": 0.55, "bsr16x1": 0.45, "bsr8x1": 0.44, "bsr4x1": 0.42, "csr": 0.2, "2:4": 0.13},
    }
    supports_tuning = True
    has_sparse_kernels = True
    conv_layout = CONV_LAYOUTS["relax.nn.conv2d"][0]

    def build(self, mod, preset, *, tuning_db=None):
        return build(mod, preset, tuning_db=tuning_db)

    def export(self, ex, out_dir, preset) -> str:
        return export(ex, out_dir, preset)

    def make_sparse_kernel(self, spec, preset):
        return make_sparse_kernel(spec, preset)

    def kernel_name(self, spec, preset) -> str:
        from edge_sparse.targets.cpu.sparse import kernel_name

        return kernel_name(spec, preset)

    def can_time(self, preset) -> bool:
        return preset.is_native

    def time_kernel(self, prim_func, args, preset, repeats: int = 15, session=None) -> float:
        from edge_sparse.kernel_timing import time_kernel
        from edge_sparse.targets.cpu.sparse import build_kernel

        return time_kernel(build_kernel(prim_func, preset), args, preset, session=session, repeats=repeats)

    def time_module(self, mod, inputs, preset, repeats: int = 15, session=None) -> float:
        from edge_sparse.kernel_timing import time_kernel

        return time_kernel(self.build(mod, preset), inputs, preset, session=session, relax=True, repeats=repeats)

    def int8_kernels(self, preset):
        return int8_kernels(preset)

    def prepare_for_tuning(self, mod, preset):
        """The module as :func:`relax_pipeline` has it where the tuning database is applied."""
        import tvm

        passes = relax_passes(preset, lower=False)
        names = [p.info.name for p in passes]
        # pass names differ between TVM builds: cut before our scheduler when the layout pass is not found
        stop = names.index("relax.AttachAttrLayoutFreeBuffers") if "relax.AttachAttrLayoutFreeBuffers" in names \
            else names.index("edge_sparse.ScheduleDense")
        with preset.tvm_target():
            return tvm.transform.Sequential(passes[:stop])(mod)


FAMILY = CPUFamily()
