"""CUDA family (NVIDIA GPUs): TVM's default CUDA pipeline (dlight GPU rules), no sparse kernels yet, the host code
linked for this machine. Measured energy comes from NVML (total GPU energy), which ``bench --energy auto`` opens for
artifacts of this family. The exported library carries CUDA C that TVM's CUDA loader compiles with NVRTC on load.

``FAMILY`` is its :class:`~edge_sparse.targets.family.TargetFamily`.
"""
from __future__ import annotations

from edge_sparse.targets.family import TargetFamily

__all__ = ["CUDAFamily", "FAMILY"]


class CUDAFamily(TargetFamily):
    """Dense only: every layer keeps TVM's GPU schedules (``make_sparse_kernel`` declines), so the sparsify pass leaves
    the model as is and says so per layer."""

    name = "cuda"
    description = "NVIDIA GPUs through TVM's default CUDA pipeline (dense; energy by NVML)"
    energy_meters = ("nvml",)
    offloads = True

    def peak_flops_per_us(self, preset) -> float:
        return float(preset.device.get("gpu_gflops", 1000.0)) * 1e3


FAMILY = CUDAFamily()
