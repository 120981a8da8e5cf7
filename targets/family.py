"""The target-family interface: everything that differs between families of devices lives behind it.

A family (``cpu``: LLVM CPUs; ``opencl``: mobile GPUs; ``cuda``: NVIDIA GPUs) is a :class:`TargetFamily` subclass
in its own module ``targets/<name>/``, exposed there as ``FAMILY``; presets name their family (``family = "cpu"``).
Every other module asks the family object (``targets.family_of(preset)``) and never compares a family name.

What a family owns (override what differs; the base class holds the behaviour most families share):

- compiling: :meth:`~TargetFamily.build` (Relax pipeline + TIR pipeline -> Executable) and
  :meth:`~TargetFamily.export` (link into an artifact directory, returns the library's file name);
- sparse kernels: :meth:`~TargetFamily.make_sparse_kernel` (a scheduled PrimFunc for a ``KernelSpec``, or None to
  keep the layer dense) and :meth:`~TargetFamily.kernel_name` (catalogue name, recorded per layer in the manifest);
- the sparsify cost model: :attr:`~TargetFamily.calibration` (efficiency of each kernel kind relative to the
  preset's bandwidth / peak) and :meth:`~TargetFamily.peak_flops_per_us`;
- int8 kernels: :meth:`~TargetFamily.int8_kernels` (the kernel set ``passes/qdq.py`` routes quantized matmuls to, or
  None: TVM lowers the quantized ops itself);
- kernel timing for ``compile --measure`` and ``optimize`` (here or on an RPC ``session``):
  :meth:`~TargetFamily.can_time`, :meth:`~TargetFamily.time_kernel`, :meth:`~TargetFamily.time_module`;
- tuning: :attr:`~TargetFamily.supports_tuning` and :meth:`~TargetFamily.prepare_for_tuning`;
- energy: :attr:`~TargetFamily.energy_meters` (meters tried, in order, by ``bench --energy auto`` on the machine that
  runs the model) and :attr:`~TargetFamily.offloads` (a GPU family: the energy model adds the GPU's power).

The runtime needs no family: it picks its device from the manifest's TVM target (``runtime.open_device``).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["TargetFamily", "register_family", "get_family", "family_names"]

_FAMILIES: dict[str, TargetFamily] = {}
_LOADED = False


class TargetFamily:
    """Base class of a target family (see the module docstring for the contract)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # sparsify cost model: {"gemv" | "gemm": {"dense" | format: efficiency}}; only ratios to "dense" matter
    calibration: ClassVar[dict[str, dict[str, float]]] = {
        "gemv": {"dense": 1.0},
        "gemm": {"dense": 1.0},
    }
    supports_tuning: ClassVar[bool] = False
    energy_meters: ClassVar[tuple[str, ...]] = ("jetson", "pi5-pmic", "android", "rapl")
    offloads: ClassVar[bool] = False             # kernels run on an accelerator; the host thread only launches them
    has_sparse_kernels: ClassVar[bool] = False   # make_sparse_kernel may return kernels (optimize lists options)
    # the layout the family's pipeline runs convolutions in: "NHWC" routes a pruned 1x1 conv to the matmul kernels
    # over its B*H*W rows (no NCHW transposes between it and its channels-last neighbours); "NCHW" to conv1x1 kernels
    conv_layout: ClassVar[str] = "NCHW"

    # ------------------------------------------------------------------ compile
    def build(self, mod, preset, *, tuning_db: str | None = None):
        """Compile a Relax module (after the sparsify pass) for ``preset``; returns a ``relax.Executable``."""
        import tvm

        target = preset.tvm_target()
        with tvm.transform.PassContext(opt_level=3):
            return tvm.compile(mod, target=target, relax_pipeline=tvm.relax.pipeline.get_default_pipeline(target))

    def export(self, ex, out_dir: Path, preset) -> str:
        """Link ``ex`` into ``out_dir`` for the device; returns the library's file name (``model.so``)."""
        ex.export_library(str(Path(out_dir) / "model.so"))
        return "model.so"

    # ------------------------------------------------------------------ sparse kernels
    def make_sparse_kernel(self, spec, preset):
        """A scheduled PrimFunc (carrying ``formats.KERNEL_ATTR``) for ``spec``, or None: the layer stays dense."""
        return None

    def kernel_name(self, spec, preset) -> str:
        """The kernel's catalogue name, as the manifest and ``inspect`` show it."""
        return f"{self.name}_{spec.format}_{spec.op}".replace(":", "_")

    # ------------------------------------------------------------------ cost model
    def peak_flops_per_us(self, preset) -> float:
        """Peak float32 flops per microsecond of the whole device (all cores)."""
        dev = preset.device
        return float(dev.get("peak_gflops_per_core", 20.0)) * max(1, int(dev.get("cores", 1))) * 1e3

    def int8_kernels(self, preset):
        """The family's int8 kernel set for ``preset`` (see ``targets/cpu/int8.py``: packing, kernel factories,
        ``fits``), or None."""
        return None

    # ------------------------------------------------------------------ timing (compile --measure, optimize)
    def can_time(self, preset) -> bool:
        """Whether kernels for ``preset`` can be timed on this machine."""
        return False

    def time_kernel(self, prim_func, args: list, preset, repeats: int = 15, session=None) -> float:
        """Median microseconds of one kernel call with numpy ``args`` (outputs included), here or on an RPC
        ``session``."""
        raise NotImplementedError(f"family {self.name} cannot time kernels")

    def time_module(self, mod, inputs: list, preset, repeats: int = 15, session=None) -> float:
        """Median microseconds of ``main`` of a Relax module built by :meth:`build` with numpy ``inputs``."""
        raise NotImplementedError(f"family {self.name} cannot time modules")

    # ------------------------------------------------------------------ tuning
    def prepare_for_tuning(self, mod, preset):
        """The module as :meth:`build` has it where a tuning database is applied (when ``supports_tuning``)."""
        raise NotImplementedError(f"family {self.name} has no tuning support")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description}

    def __repr__(self) -> str:
        return f"<target family {self.name}>"


def register_family(family: TargetFamily) -> TargetFamily:
    """Make ``family`` (an instance) available to presets as ``family = "<family.name>"``."""
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    here = Path(__file__).parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.ispkg:
            module = importlib.import_module(f"edge_sparse.targets.{info.name}")
            fam = getattr(module, "FAMILY", None)
            if isinstance(fam, TargetFamily):
                _FAMILIES.setdefault(fam.name, fam)
    _LOADED = True


def family_names() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_FAMILIES))


def get_family(name: str) -> TargetFamily:
    from edge_sparse.errors import UserError, closest

    _load()
    fam = _FAMILIES.get(name)
    if fam is None:
        known = family_names()
        raise UserError(f"unknown target family '{name}'{closest(name, known)}; known: {', '.join(known)}")
    return fam
